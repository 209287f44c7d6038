// cuda_ops.cu — the CUDA backend: Ops on one GPU, driven through one stream.
//
// Memory: activation buffers (alloc), the matmul scratch and the KV cache are cudaMalloc'd on the Ops's
// GPU and freed with it. The KV cache is f16, one [cap, kv_dim] K and V array per (sequence slot, stage-local
// layer); each slot grows on its own.
// Weights: the model's Tensors point into the host mapping; upload() copies one to the GPU once and later
// calls find the copy by the tensor's host address (weight()), so the decoder passes the same Tensors to
// every backend. The engine uploads a stage's tensors at placement; anything not uploaded is copied on
// first use. RopeParams::freq_factors (a host pointer into the mapping) and AttnParams::sinks are looked up
// the same way. Mixture of experts: expert ids stay on the GPU (alloc_i32); router_topk, moe_matmul (routing
// and the grouped matmul on the device, matmul_moe.cu) and moe_combine never read them on the host, and
// moe_matmul shares the matmul scratch (grown on the first ubatch that needs more than upload() reserved,
// since the per-slot input of the down projection is k times a ubatch).
//
// Ordering: every op is enqueued on stream_ and returns at once. Nothing in the per-ubatch path blocks the
// host: no cudaDeviceSynchronize / cudaStreamSynchronize, no pageable-memory copies (token ids travel in
// the embedding kernel's parameters). The host waits only in to_host (the logits at the end of a prefill),
// kv_to_host, kv_reserve (when a slot outgrows its cache: geometric, so rarely), growth of the non-peer staging buffer (first send) and the
// destructor.
//
// Stage hand-off (pipeline/ring.h, DESIGN §5): a slot's event handle is a SlotEvent that records on the
// stream of whichever Ops records it (the cudaEvent is created on that GPU the first time), and
// event_wait makes this Ops's stream wait on it — cudaStreamWaitEvent accepts events of other GPUs. send()
// copies with cudaMemcpyPeerAsync when both GPUs can map each other's memory (peer access is enabled once
// per pair, when the second Ops of the pair is created or on first send); otherwise through a pinned host
// buffer: D2H on this stream, H2D on a copy stream of the destination GPU that waits for the D2H, and this
// stream waits for the H2D, so the "filled" event recorded after send() covers the whole copy.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <set>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/vision.cuh"
#include "backend/cuda/matmul.cuh"
#include "common.h"

namespace tp {

namespace {

double mib(size_t bytes) { return double(bytes) / double(1 << 20); }

// --- peer access, process-wide ----------------------------------------------------------------------------

std::mutex g_peer_mu;
std::map<std::pair<int, int>, bool> g_peer_ok;  // (lower, higher device) -> both directions enabled
std::multiset<int> g_live_devices;              // devices with a live CudaOps

bool enable_peer(int from, int to) {
  if (cudaSetDevice(from) != cudaSuccess) return false;
  const cudaError_t e = cudaDeviceEnablePeerAccess(to, 0);
  cudaGetLastError();  // cudaErrorPeerAccessAlreadyEnabled is fine; anything else means "no peer path"
  return e == cudaSuccess || e == cudaErrorPeerAccessAlreadyEnabled;
}

// Whether a and b can copy directly (enabling it the first time); leaves device `a` current.
bool ensure_peer(int a, int b) {
  std::lock_guard<std::mutex> lk(g_peer_mu);
  const std::pair<int, int> key(std::min(a, b), std::max(a, b));
  auto it = g_peer_ok.find(key);
  bool ok;
  if (it != g_peer_ok.end()) {
    ok = it->second;
  } else {
    int ab = 0, ba = 0;
    ok = cudaDeviceCanAccessPeer(&ab, a, b) == cudaSuccess && cudaDeviceCanAccessPeer(&ba, b, a) == cudaSuccess &&
         ab && ba && enable_peer(a, b) && enable_peer(b, a);
    cudaGetLastError();
    g_peer_ok[key] = ok;
  }
  cudaSetDevice(a);
  return ok;
}

// A ring slot's event (see the file comment).
struct SlotEvent {
  cudaEvent_t ev = nullptr;
  int device = -1;
};

// One sequence slot's KV cache: [cap, kv_dim] f16 K and V per stage-local layer.
struct KvSlot {
  std::vector<__half*> k, v;
  int64_t cap = 0;
};

// Pinned staging for sends to one GPU without peer access.
struct Staging {
  void* host = nullptr;  // pinned
  size_t bytes = 0;
  cudaStream_t copy_stream = nullptr;  // on the destination GPU
  cudaEvent_t d2h_done = nullptr;      // on this GPU
  cudaEvent_t h2d_done = nullptr;      // on the destination GPU
};

class CudaOps final : public Ops {
 public:
  CudaOps(int device, int64_t max_tokens) : device_(device), max_tokens_(max_tokens > 0 ? max_tokens : 1) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      cudaGetLastError();
      fail(TP_ERR_DEVICE, "cuda:%d: the CUDA runtime cannot start: %s (%s)", device_, cudaGetErrorName(e),
           cudaGetErrorString(e));
    }
    if (device_ < 0 || device_ >= n)
      fail(TP_ERR_DEVICE, "cuda:%d: no such GPU (%d visible)", device_, n);
    set_device();
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    peer_.assign(size_t(n), -1);
    std::vector<int> others;
    {
      std::lock_guard<std::mutex> lk(g_peer_mu);
      for (int d : g_live_devices)
        if (d != device_) others.push_back(d);
      g_live_devices.insert(device_);
    }
    for (int d : others) peer_[size_t(d)] = ensure_peer(device_, d) ? 1 : 0;  // before any buffer exists
  }

  ~CudaOps() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    for (auto& kv : staging_) {
      Staging& s = kv.second;
      cudaSetDevice(kv.first);
      if (s.copy_stream) {
        cudaStreamSynchronize(s.copy_stream);
        cudaStreamDestroy(s.copy_stream);
      }
      if (s.h2d_done) cudaEventDestroy(s.h2d_done);
      cudaSetDevice(device_);
      if (s.d2h_done) cudaEventDestroy(s.d2h_done);
      if (s.host) cudaFreeHost(s.host);
    }
    cudaSetDevice(device_);
    for (void* p : buffers_) cudaFree(p);
    for (auto& w : weights_) cudaFree(w.second);
    for (KvSlot& s : kv_) free_kv(s);
    cudaFree(scratch_);
    for (void* p : retired_) cudaFree(p);
    cudaStreamDestroy(stream_);
    cudaGetLastError();
    std::lock_guard<std::mutex> lk(g_peer_mu);
    auto it = g_live_devices.find(device_);
    if (it != g_live_devices.end()) g_live_devices.erase(it);
  }

  float* alloc(int64_t n) override {
    set_device();
    const size_t bytes = size_t(n > 0 ? n : 1) * sizeof(float);
    void* p = dmalloc(bytes, fmt("an activation buffer of %lld floats", (long long)n));
    buffers_.push_back(p);
    return static_cast<float*>(p);
  }

  int32_t* alloc_i32(int64_t n) override {
    set_device();
    const size_t bytes = size_t(n > 0 ? n : 1) * sizeof(int32_t);
    void* p = dmalloc(bytes, fmt("an expert-id buffer of %lld int32", (long long)n));
    buffers_.push_back(p);
    return static_cast<int32_t*>(p);
  }

  void upload(const Tensor& t) override {
    if (!t.present() || weights_.count(t.data)) return;
    set_device();
    const size_t bytes = size_t(t.rows) * size_t(t.row_bytes);
    void* d = dmalloc(bytes, fmt("weight %s", t.name ? t.name : "(unnamed)"));
    weights_[t.data] = d;
    check(cudaMemcpyAsync(d, t.data, bytes, cudaMemcpyHostToDevice, stream_), "weight upload (cudaMemcpyAsync)");
    if (t.rows > 1)  // a matrix: size the matmul scratch for a full ubatch now, not in the first ubatch
      scratch_reserve_ = std::max(scratch_reserve_, tp_matmul_cuda_scratch_bytes(t.type, t.cols, max_tokens_));
  }

  void kv_reserve(int seq, int64_t n_layers, int64_t kv_dim, int64_t n_pos) override {
    // Called by the stage thread before each job: when the slot is already large enough (the steady state)
    // it returns without waiting for the stream.
    const bool fits = kv_dim == kv_dim_ && seq < int(kv_.size()) && int64_t(kv_[size_t(seq)].k.size()) == n_layers &&
                      n_pos <= kv_[size_t(seq)].cap;
    if (fits && retired_.empty() && scratch_bytes_ >= scratch_reserve_) return;
    set_device();
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (kv_reserve)");
    for (void* p : retired_) cudaFree(p);
    retired_.clear();
    if (scratch_bytes_ < scratch_reserve_) grow_scratch(scratch_reserve_);
    if (kv_dim != kv_dim_) {  // a new layout: every slot starts over
      for (KvSlot& s : kv_) free_kv(s);
      kv_.clear();
      kv_dim_ = kv_dim;
    }
    if (seq >= int(kv_.size())) kv_.resize(size_t(seq) + 1);
    KvSlot& s = kv_[size_t(seq)];
    if (int64_t(s.k.size()) != n_layers) {
      free_kv(s);
      s.k.assign(size_t(n_layers), nullptr);
      s.v.assign(size_t(n_layers), nullptr);
    }
    if (n_pos <= s.cap) return;
    KvSlot grown;
    grown.cap = s.cap > 0 ? std::max(n_pos, 2 * s.cap) : n_pos;  // geometric growth across calls
    try {
      alloc_kv(grown, n_layers);
    } catch (const Error& e) {
      if (e.status() != TP_ERR_OUT_OF_MEMORY || grown.cap == n_pos) throw;
      grown.cap = n_pos;  // the doubled cache does not fit: try the exact size
      alloc_kv(grown, n_layers);
    }
    const size_t old_bytes = size_t(s.cap * kv_dim_) * sizeof(__half);
    for (int64_t l = 0; l < n_layers && old_bytes > 0; ++l) {
      check(cudaMemcpyAsync(grown.k[size_t(l)], s.k[size_t(l)], old_bytes, cudaMemcpyDeviceToDevice, stream_),
            "KV copy");
      check(cudaMemcpyAsync(grown.v[size_t(l)], s.v[size_t(l)], old_bytes, cudaMemcpyDeviceToDevice, stream_),
            "KV copy");
    }
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (kv_reserve)");
    free_kv(s);
    s = std::move(grown);
  }

  void embed(float* out, const Tensor& table, const int32_t* tokens, int64_t n, float scale) override {
    if (!tp_embed_cuda_supports(table.type))
      fail(TP_ERR_UNSUPPORTED, "cuda:%d: the CUDA embedding gather cannot decode %s (type %s)", device_,
           table.name ? table.name : "the embedding table", type_traits(int32_t(table.type)).name);
    set_device();
    check(tp_embed_cuda(out, weight(table), table.type, table.row_bytes, table.cols, tokens, n, scale, stream_),
          "embed launch");
  }

  void rms_norm(float* out, const float* in, const Tensor& w, int64_t rows, int64_t dim, float eps) override {
    set_device();
    check(tp_rms_norm_cuda(out, in, static_cast<const float*>(weight(w)), rows, dim, eps, stream_),
          "rms_norm launch");
  }

  void matmul(float* out, const Tensor& w, const float* in, int64_t n_tok) override {
    set_device();
    const void* dw = weight(w);
    const size_t need = tp_matmul_cuda_scratch_bytes(w.type, w.cols, n_tok);
    if (need > scratch_bytes_) grow_scratch(std::max(need, scratch_reserve_));
    const cudaError_t e = tp_matmul_cuda(out, dw, w.type, w.rows, w.cols, in, n_tok, scratch_, stream_);
    if (e != cudaSuccess) {
      cudaGetLastError();
      fail(TP_ERR_DEVICE, "cuda:%d: matmul launch failed: %s (%s: %s [%lld × %lld], %lld tokens)", device_,
           cudaGetErrorName(e), w.name ? w.name : "weight", type_traits(int32_t(w.type)).name, (long long)w.rows,
           (long long)w.cols, (long long)n_tok);
    }
  }

  void add_bias(float* x, const Tensor& b, int64_t rows) override {
    set_device();
    check(tp_add_bias_cuda(x, static_cast<const float*>(weight(b)), rows, b.cols, stream_), "add_bias launch");
  }

  void rope(float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t pos0, const RopeParams& p,
            const int32_t* pos) override {
    set_device();
    const float* ff = nullptr;
    if (p.freq_factors)
      ff = static_cast<const float*>(device_copy(p.freq_factors, size_t(p.n_rot / 2) * sizeof(float), "rope_freqs"));
    const TpRopeSections sec{{p.sections[0], p.sections[1], p.sections[2], p.sections[3]}};
    check(tp_rope_cuda(x, n_tok, n_heads, head_dim, pos0, pos, p.mode, sec, p.n_rot, p.base, p.freq_scale, ff, p.yarn,
                       stream_),
          "rope launch");
  }

  void kv_store(int seq, int layer, const float* k, const float* v, int64_t pos0, int64_t n_tok) override {
    const KvSlot& s = kv_slot(seq, layer, pos0 + n_tok, "kv_store");
    set_device();
    check(tp_kv_store_cuda(s.k[size_t(layer)], s.v[size_t(layer)], k, v, pos0, n_tok, kv_dim_, stream_),
          "kv_store launch");
  }

  void attention(float* out, const float* q, int seq, int layer, int64_t pos0, int64_t n_tok,
                 const AttnParams& p) override {
    const KvSlot& s = kv_slot(seq, layer, pos0 + n_tok, "attention");
    if (p.head_dim > kTpAttnMaxHeadDim)
      fail(TP_ERR_UNSUPPORTED, "cuda:%d: attention with head_dim %lld is not supported by the CUDA backend (at most "
           "%lld); use devices=\"cpu\"", device_, (long long)p.head_dim, (long long)kTpAttnMaxHeadDim);
    if (p.n_head_kv * p.head_dim != kv_dim_)
      fail(TP_ERR_INTERNAL, "cuda:%d: attention with %lld KV heads of %lld but the KV cache holds %lld per position",
           device_, (long long)p.n_head_kv, (long long)p.head_dim, (long long)kv_dim_);
    if (p.sinks.present() && (p.sinks.type != GgmlType::F32 || p.sinks.cols * p.sinks.rows != p.n_head))
      fail(TP_ERR_INTERNAL, "cuda:%d: attention sinks %s must be %lld f32 values (one per head), got %lld × %lld %s",
           device_, p.sinks.name ? p.sinks.name : "(unnamed)", (long long)p.n_head, (long long)p.sinks.rows,
           (long long)p.sinks.cols, type_traits(int32_t(p.sinks.type)).name);
    set_device();
    const float* sinks = p.sinks.present() ? static_cast<const float*>(weight(p.sinks)) : nullptr;
    check(tp_attention_cuda(out, q, s.k[size_t(layer)], s.v[size_t(layer)], pos0, n_tok, p.n_head, p.n_head_kv,
                            p.head_dim, p.kq_scale, p.n_swa, sinks, attn_kernel_, stream_),
          "attention launch");
  }

  void glu(float* out, const float* gate, const float* up, int64_t n, Activation act) override {
    set_device();
    check(tp_glu_cuda(out, gate, up, n, act, stream_), "glu launch");
  }

  void attention_seg(float* out, const float* q, const float* k, const float* v, int64_t n_tok, const AttnParams& p,
                     const int32_t* seg, int64_t n_seg) override {
    set_device();
    check(tp_attention_seg_cuda(out, q, k, v, n_tok, p.n_head, p.head_dim, p.kq_scale, seg, n_seg, stream_),
          "attention_seg launch");
  }

  void unary(float* out, const float* in, int64_t n, Activation act) override {
    set_device();
    check(tp_unary_cuda(out, in, n, act, stream_), "unary launch");
  }

  void router_topk(int32_t* ids, float* weights, const float* logits, int64_t n_tok, int64_t n_expert,
                   int64_t k) override {
    set_device();
    const cudaError_t e = tp_router_topk_cuda(ids, weights, logits, n_tok, n_expert, k, stream_);
    if (e != cudaSuccess) {
      cudaGetLastError();
      fail(TP_ERR_DEVICE, "cuda:%d: router_topk launch failed: %s (%lld tokens, top %lld of %lld experts)", device_,
           cudaGetErrorName(e), (long long)n_tok, (long long)k, (long long)n_expert);
    }
  }

  // Grouped over all experts in one launch sequence (matmul_moe.cu); the scratch grows here when a ubatch
  // needs more than upload() reserved (growth allocates without waiting; the old buffer retires).
  void moe_matmul(float* out, const Tensor& w, const Tensor& b, const float* in, bool in_per_slot, const int32_t* ids,
                  int64_t n_tok, int64_t k) override {
    const int64_t rows = w.mat_rows();
    if (b.present() && (b.type != GgmlType::F32 || b.cols * b.rows != w.mats * rows))
      fail(TP_ERR_INTERNAL, "cuda:%d: moe_matmul bias %s must be %lld × %lld f32, got %lld × %lld %s", device_,
           b.name ? b.name : "(unnamed)", (long long)w.mats, (long long)rows, (long long)b.rows, (long long)b.cols,
           type_traits(int32_t(b.type)).name);
    set_device();
    const void* dw = weight(w);
    const float* db = b.present() ? static_cast<const float*>(weight(b)) : nullptr;
    const size_t need = tp_moe_matmul_cuda_scratch_bytes(w.type, w.cols, w.mats, in_per_slot, n_tok, k);
    if (need > scratch_bytes_) grow_scratch(std::max(need, scratch_reserve_));
    const cudaError_t e = tp_moe_matmul_cuda(out, dw, w.type, w.mats, rows, w.cols, db, in, in_per_slot, ids, n_tok, k,
                                             scratch_, stream_);
    if (e != cudaSuccess) {
      cudaGetLastError();
      fail(TP_ERR_DEVICE,
           "cuda:%d: moe_matmul launch failed: %s (%s: %s, %lld experts of [%lld × %lld], %lld tokens × %lld "
           "experts each, %s input)",
           device_, cudaGetErrorName(e), w.name ? w.name : "weight", type_traits(int32_t(w.type)).name,
           (long long)w.mats, (long long)rows, (long long)w.cols, (long long)n_tok, (long long)k,
           in_per_slot ? "per-slot" : "per-token");
    }
  }

  void moe_combine(float* out, const float* y, const float* weights, int64_t n_tok, int64_t k, int64_t dim) override {
    set_device();
    const cudaError_t e = tp_moe_combine_cuda(out, y, weights, n_tok, k, dim, stream_);
    if (e != cudaSuccess) {
      cudaGetLastError();
      fail(TP_ERR_DEVICE, "cuda:%d: moe_combine launch failed: %s (%lld tokens × %lld experts × %lld)", device_,
           cudaGetErrorName(e), (long long)n_tok, (long long)k, (long long)dim);
    }
  }

  void add(float* out, const float* a, const float* b, int64_t n) override {
    set_device();
    check(tp_add_cuda(out, a, b, n, stream_), "add launch");
  }

  void to_host(float* dst, const float* src, int64_t n) override {
    set_device();
    check(cudaMemcpyAsync(dst, src, size_t(n) * sizeof(float), cudaMemcpyDeviceToHost, stream_), "to_host copy");
    check(cudaStreamSynchronize(stream_), "to_host (cudaStreamSynchronize)");
  }

  // From pageable memory: the runtime copies src to a staging buffer before it returns (so the caller may
  // reuse src at once) and the DMA runs in stream order. Only stage 0's embedding rows and the per-ubatch
  // position ids take this path: a few KiB to a few MiB per ubatch.
  void from_host(float* dst, const float* src, int64_t n) override {
    set_device();
    check(cudaMemcpyAsync(dst, src, size_t(n) * sizeof(float), cudaMemcpyHostToDevice, stream_), "from_host copy");
  }
  void from_host_i32(int32_t* dst, const int32_t* src, int64_t n) override {
    set_device();
    check(cudaMemcpyAsync(dst, src, size_t(n) * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
          "from_host_i32 copy");
  }

  void copy(float* dst, const float* src, int64_t n) override {
    set_device();
    check(cudaMemcpyAsync(dst, src, size_t(n) * sizeof(float), cudaMemcpyDeviceToDevice, stream_), "copy");
  }

  void send(float* dst, Ops& dst_ops, const float* src, int64_t n) override {
    auto* d = dynamic_cast<CudaOps*>(&dst_ops);
    if (!d) fail(TP_ERR_UNSUPPORTED, "cuda:%d: sending activations to a non-CUDA stage is not supported", device_);
    if (n <= 0) return;
    set_device();
    const size_t bytes = size_t(n) * sizeof(float);
    if (d->device_ == device_) {
      check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "send (device-to-device copy)");
    } else if (peer_usable(d->device_)) {
      check(cudaMemcpyPeerAsync(dst, d->device_, src, device_, bytes, stream_), "send (cudaMemcpyPeerAsync)");
    } else {
      send_staged(dst, d->device_, src, bytes);
    }
  }

  void* event_create() override { return new SlotEvent; }

  void event_destroy(void* h) override {
    auto* e = static_cast<SlotEvent*>(h);
    if (!e) return;
    if (e->ev) {
      cudaSetDevice(e->device);
      cudaEventDestroy(e->ev);
      cudaSetDevice(device_);
      cudaGetLastError();
    }
    delete e;
  }

  void event_record(void* h) override {
    auto* e = static_cast<SlotEvent*>(h);
    set_device();
    if (e->ev && e->device != device_) {  // recorded by another GPU before: events record on their own GPU only
      cudaSetDevice(e->device);
      cudaEventDestroy(e->ev);
      set_device();
      e->ev = nullptr;
    }
    if (!e->ev) {
      check(cudaEventCreateWithFlags(&e->ev, cudaEventDisableTiming), "cudaEventCreate");
      e->device = device_;
    }
    check(cudaEventRecord(e->ev, stream_), "cudaEventRecord");
  }

  void event_wait(void* h) override {
    auto* e = static_cast<SlotEvent*>(h);
    if (!e || !e->ev) return;  // never recorded: nothing to wait for
    set_device();
    check(cudaStreamWaitEvent(stream_, e->ev, 0), "cudaStreamWaitEvent");
  }

  // Trace timers: timing-enabled events on this stage's stream (read once the prefill has finished).
  void* timer_create() override {
    set_device();
    cudaEvent_t ev = nullptr;
    check(cudaEventCreate(&ev), "cudaEventCreate (timer)");
    return ev;
  }
  void timer_destroy(void* t) override {
    if (!t) return;
    set_device();
    cudaEventDestroy(static_cast<cudaEvent_t>(t));
    cudaGetLastError();
  }
  void timer_record(void* t) override {
    set_device();
    check(cudaEventRecord(static_cast<cudaEvent_t>(t), stream_), "cudaEventRecord (timer)");
  }
  double timer_seconds(void* from, void* to) override {
    set_device();
    check(cudaEventSynchronize(static_cast<cudaEvent_t>(to)), "cudaEventSynchronize (timer)");
    float ms = 0.0f;
    check(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(from), static_cast<cudaEvent_t>(to)),
          "cudaEventElapsedTime");
    return double(ms) / 1e3;
  }

  void kv_to_host(int seq, int layer, float* k, float* v, int64_t n_pos) override {
    if (n_pos <= 0) return;  // nothing cached yet (kv_digest of a fresh engine)
    const KvSlot& s = kv_slot(seq, layer, n_pos, "kv_to_host");
    set_device();
    std::vector<uint16_t> tmp(size_t(n_pos * kv_dim_));
    const size_t bytes = tmp.size() * sizeof(uint16_t);
    for (int which = 0; which < 2; ++which) {
      const __half* src = which == 0 ? s.k[size_t(layer)] : s.v[size_t(layer)];
      float* dst = which == 0 ? k : v;
      check(cudaMemcpyAsync(tmp.data(), src, bytes, cudaMemcpyDeviceToHost, stream_), "kv_to_host copy");
      check(cudaStreamSynchronize(stream_), "kv_to_host (cudaStreamSynchronize)");
      for (size_t i = 0; i < tmp.size(); ++i) dst[i] = f16_to_f32(tmp[i]);
    }
  }

  // Rounded on the host with f32_to_f16 (round to nearest even, like kv_store's __float2half_rn), then one
  // synchronous copy per array: it runs between prefills, never inside the pipeline.
  void kv_from_host(int seq, int layer, const float* k, const float* v, int64_t n_pos) override {
    if (n_pos <= 0) return;
    const KvSlot& s = kv_slot(seq, layer, n_pos, "kv_from_host");
    set_device();
    std::vector<uint16_t> tmp(size_t(n_pos * kv_dim_));
    for (int which = 0; which < 2; ++which) {
      const float* src = which == 0 ? k : v;
      for (size_t i = 0; i < tmp.size(); ++i) tmp[i] = f32_to_f16(src[i]);
      __half* dst = which == 0 ? s.k[size_t(layer)] : s.v[size_t(layer)];
      check(cudaMemcpyAsync(dst, tmp.data(), tmp.size() * sizeof(uint16_t), cudaMemcpyHostToDevice, stream_),
            "kv_from_host copy");
      check(cudaStreamSynchronize(stream_), "kv_from_host (cudaStreamSynchronize)");
    }
  }

  void set_attention_kernel(TpAttnKernel k) { attn_kernel_ = k; }

 private:
  void set_device() { check(cudaSetDevice(device_), "cudaSetDevice"); }

  // "cuda:1: rms_norm launch failed: cudaErrorInvalidValue"
  void check(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return;
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    fail(TP_ERR_DEVICE, "cuda:%d: %s failed: %s", device_, what, cudaGetErrorName(e));
  }

  void* dmalloc(size_t bytes, const std::string& what) {
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      cudaGetLastError();
      fail(TP_ERR_OUT_OF_MEMORY, "cuda:%d: out of memory allocating %.1f MiB for %s (%.1f MiB free)", device_,
           mib(bytes), what.c_str(), mib(free_b));
    }
    check(e, "cudaMalloc");
    return p;
  }

  // The device copy of a weight (uploading it on first use).
  const void* weight(const Tensor& t) {
    auto it = weights_.find(t.data);
    if (it != weights_.end()) return it->second;
    upload(t);
    return weights_.at(t.data);
  }

  // The device copy of `bytes` of host memory that never changes (model data), keyed by its address.
  const void* device_copy(const void* host, size_t bytes, const char* what) {
    auto it = weights_.find(host);
    if (it != weights_.end()) return it->second;
    void* d = dmalloc(bytes, what);
    weights_[host] = d;
    check(cudaMemcpyAsync(d, host, bytes, cudaMemcpyHostToDevice, stream_), "upload (cudaMemcpyAsync)");
    return d;
  }

  // A larger scratch; the old one may still be read by enqueued kernels, so it is freed at the next
  // kv_reserve (which waits for the stream) or with the Ops — never with a synchronizing cudaFree here.
  void grow_scratch(size_t bytes) {
    void* p = dmalloc(bytes, "the matmul scratch");
    if (scratch_) retired_.push_back(scratch_);
    scratch_ = p;
    scratch_bytes_ = bytes;
  }

  void alloc_kv(KvSlot& s, int64_t n_layers) {
    s.k.assign(size_t(n_layers), nullptr);
    s.v.assign(size_t(n_layers), nullptr);
    const size_t bytes = size_t(s.cap * kv_dim_) * sizeof(__half);
    try {
      for (int64_t l = 0; l < n_layers; ++l) {
        const std::string what = fmt("the KV cache (%lld layers × 2 × %lld positions × %lld f16 = %.1f MiB)",
                                     (long long)n_layers, (long long)s.cap, (long long)kv_dim_,
                                     mib(2 * size_t(n_layers) * bytes));
        s.k[size_t(l)] = static_cast<__half*>(dmalloc(bytes, what));
        s.v[size_t(l)] = static_cast<__half*>(dmalloc(bytes, what));
      }
    } catch (...) {
      free_kv(s);
      throw;
    }
  }

  void free_kv(KvSlot& s) {
    for (__half* p : s.k) cudaFree(p);
    for (__half* p : s.v) cudaFree(p);
    s.k.clear();
    s.v.clear();
    s.cap = 0;
  }

  const KvSlot& kv_slot(int seq, int layer, int64_t n_pos, const char* op) const {
    const bool ok_seq = seq >= 0 && size_t(seq) < kv_.size();
    const KvSlot* s = ok_seq ? &kv_[size_t(seq)] : nullptr;
    if (!s || layer < 0 || size_t(layer) >= s->k.size() || n_pos > s->cap)
      fail(TP_ERR_INTERNAL, "cuda:%d: %s of slot %d, layer %d up to position %lld, but the slot's KV cache holds %lld "
           "layers × %lld positions (kv_reserve first)", device_, op, seq, layer, (long long)n_pos,
           s ? (long long)s->k.size() : 0LL, s ? (long long)s->cap : 0LL);
    return *s;
  }

  bool peer_usable(int dst) {
    int8_t& s = peer_[size_t(dst)];
    if (s < 0) s = ensure_peer(device_, dst) ? 1 : 0;
    return s == 1;
  }

  void send_staged(float* dst, int dst_dev, const float* src, size_t bytes) {
    Staging& s = staging_[dst_dev];
    if (!s.copy_stream) {
      check(cudaEventCreateWithFlags(&s.d2h_done, cudaEventDisableTiming), "cudaEventCreate");
      check(cudaSetDevice(dst_dev), "cudaSetDevice");
      check(cudaStreamCreateWithFlags(&s.copy_stream, cudaStreamNonBlocking), "cudaStreamCreate");
      check(cudaEventCreateWithFlags(&s.h2d_done, cudaEventDisableTiming), "cudaEventCreate");
      set_device();
    }
    if (s.bytes < bytes) {
      if (s.host) {  // copies through the old buffer may be in flight: wait for them (not the steady state)
        check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (staging growth)");
        cudaFreeHost(s.host);
        s.host = nullptr;
        s.bytes = 0;
      }
      const cudaError_t e = cudaMallocHost(&s.host, bytes);
      if (e != cudaSuccess) {
        cudaGetLastError();
        s.host = nullptr;
        fail(TP_ERR_OUT_OF_MEMORY, "cuda:%d: cannot allocate %.1f MiB of pinned host memory for copies to cuda:%d: %s",
             device_, mib(bytes), dst_dev, cudaGetErrorName(e));
      }
      s.bytes = bytes;
    }
    check(cudaMemcpyAsync(s.host, src, bytes, cudaMemcpyDeviceToHost, stream_), "send (device-to-host staging copy)");
    check(cudaEventRecord(s.d2h_done, stream_), "cudaEventRecord");
    check(cudaSetDevice(dst_dev), "cudaSetDevice");
    check(cudaStreamWaitEvent(s.copy_stream, s.d2h_done, 0), "cudaStreamWaitEvent");
    check(cudaMemcpyAsync(dst, s.host, bytes, cudaMemcpyHostToDevice, s.copy_stream),
          "send (host-to-device staging copy)");
    check(cudaEventRecord(s.h2d_done, s.copy_stream), "cudaEventRecord");
    set_device();
    check(cudaStreamWaitEvent(stream_, s.h2d_done, 0), "cudaStreamWaitEvent");
  }

  int device_;
  int64_t max_tokens_;
  cudaStream_t stream_ = nullptr;
  TpAttnKernel attn_kernel_ = TpAttnKernel::Auto;
  std::vector<void*> buffers_;                        // alloc()
  std::unordered_map<const void*, void*> weights_;    // host address -> device copy
  void* scratch_ = nullptr;                           // matmul scratch
  size_t scratch_bytes_ = 0, scratch_reserve_ = 0;
  std::vector<void*> retired_;                        // outgrown scratch buffers, freed after a stream sync
  std::vector<KvSlot> kv_;                            // per sequence slot; only kv_reserve adds slots
  int64_t kv_dim_ = 0;
  std::vector<int8_t> peer_;                          // per GPU: -1 unknown, 0 staged copies, 1 peer copies
  std::map<int, Staging> staging_;                    // per destination GPU without peer access
};

}  // namespace

std::unique_ptr<Ops> make_cuda_ops(int device, int64_t max_tokens) {
  return std::make_unique<CudaOps>(device, max_tokens);
}

void cuda_ops_set_attention_kernel(Ops& ops, int kernel) {
  if (auto* c = dynamic_cast<CudaOps*>(&ops)) c->set_attention_kernel(TpAttnKernel(kernel));
}

}  // namespace tp

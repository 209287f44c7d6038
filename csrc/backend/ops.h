// ops.h — the seam between the model and the backends.
//
// The decoder layer (model/decoder.cpp) is written once against Ops; a backend implements the kernels on
// its own memory. All activation pointers are the backend's memory (host for cpu, device for cuda) and
// row-major: [n_tok, dim] means n_tok rows of dim contiguous floats. Weight Tensors come from the stage,
// which hands the backend its own copy when it has one. Ops also own the stage's KV cache, indexed by
// sequence slot and stage-local layer number, because its layout is the backend's business. Each slot grows
// on its own (kv_reserve), so an engine of many slots holds only what its sequences have used.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>

#include "model/config.h"
#include "model/weights.h"

namespace tp {

struct RopeParams {
  RopeMode mode = RopeMode::Norm;
  int64_t n_rot = 0;                    // rotated dims per head (pairs: n_rot/2; Vision: n_rot pairs)
  int32_t sections[4] = {0, 0, 0, 0};   // Mrope / Vision: pairs per position id t, h, w, e (model/config.h)
  float base = 10000.0f;
  float freq_scale = 1.0f;
  const float* freq_factors = nullptr;  // [n_rot/2] divisors (rope_freqs.weight) or null
  YarnParams yarn;                      // ext_factor 0: plain RoPE (model/config.h has the formula)
};

struct AttnParams {
  int64_t n_head = 0, n_head_kv = 0, head_dim = 0;
  float kq_scale = 1.0f;
  int64_t n_swa = 0;  // 0: full causal; else a query at p sees keys p - n_swa + 1 .. p
  // Optional [n_head] f32 sink logits (gpt-oss): head h's softmax denominator gains exp(sinks[h] - M), with M
  // the max over the row's scaled scores and sinks[h]; sinks take probability mass and add no value. The
  // sink is not multiplied by kq_scale.
  Tensor sinks;
};

class Ops {
 public:
  virtual ~Ops() = default;

  // Activation buffer of n floats in the backend's memory (freed with the Ops).
  virtual float* alloc(int64_t n) = 0;
  // Buffer of n int32 (expert ids) in the backend's memory (freed with the Ops).
  virtual int32_t* alloc_i32(int64_t n) = 0;

  // KV cache of sequence slot `seq` (>= 0) for n_layers stage-local layers of kv_dim floats per token, large
  // enough for n_pos positions. Grows (keeping contents) when called again with a larger n_pos; other slots
  // are untouched. Every slot of one Ops has the same n_layers and kv_dim.
  virtual void kv_reserve(int seq, int64_t n_layers, int64_t kv_dim, int64_t n_pos) = 0;

  // out[i] = table[tokens[i]] * scale                                 out: [n, table.cols]
  virtual void embed(float* out, const Tensor& table, const int32_t* tokens, int64_t n, float scale) = 0;
  // out[r] = in[r] / sqrt(mean(in[r]^2) + eps) * w                     in/out: [rows, dim], w: [dim] f32
  virtual void rms_norm(float* out, const float* in, const Tensor& w, int64_t rows, int64_t dim, float eps) = 0;
  // out[t][r] = sum_k W[r][k] * in[t][k]                              in: [n_tok, w.cols], out: [n_tok, w.rows]
  virtual void matmul(float* out, const Tensor& w, const float* in, int64_t n_tok) = 0;
  // x[r] += b                                                          x: [rows, b.cols]
  virtual void add_bias(float* x, const Tensor& b, int64_t rows) = 0;
  // Rotate each head of x in place.                                    x: [n_tok, n_heads, head_dim]
  // pos null: token i sits at position pos0 + i (Mrope / Vision: pos0 + i in t, h and w, 0 in e).
  // pos non-null (backend memory, section-major [4, n_tok]): token i's ids are t = pos[i], h = pos[n_tok + i],
  // w = pos[2 n_tok + i], e = pos[3 n_tok + i]; Norm / Neox use t only, and pos0 is ignored.
  // Mrope: Neox pairs (k, k + n_rot/2), pair k turned by the id and frequency rope_section() gives.
  // Vision (the Qwen2.5-VL vision encoder): call with n_rot = head_dim / 2 and sections {d/4, d/4, d/4, d/4}
  // for head_dim d; pairs (k, k + n_rot) for k in [0, n_rot), each section's frequencies restarting at
  // base^0 (ggml's GGML_ROPE_TYPE_VISION). Every head_dim entry is rotated.
  virtual void rope(float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t pos0, const RopeParams& p,
                    const int32_t* pos) = 0;
  // Store k, v ([n_tok, kv_dim]) for positions pos0.. of slot `seq`, stage-local layer `layer`.
  virtual void kv_store(int seq, int layer, const float* k, const float* v, int64_t pos0, int64_t n_tok) = 0;
  // Causal attention of q ([n_tok, n_head, head_dim], positions pos0..) against the cached keys/values
  // 0 .. pos0 + n_tok - 1 of slot `seq`, `layer`.                     out: [n_tok, n_head * head_dim]
  virtual void attention(float* out, const float* q, int seq, int layer, int64_t pos0, int64_t n_tok,
                         const AttnParams& p) = 0;
  // out = act(gate) * up (SwigluOai: the clamped form in model/config.h)  all: [n]
  virtual void glu(float* out, const float* gate, const float* up, int64_t n, Activation act) = 0;

  // --- mixture of experts (model/decoder.cpp ffn_moe). Slot i = t * k + j is token t's j-th expert.
  // Router: per token the k largest logits of [n_tok, n_expert], largest first (ties: lower expert first);
  // ids[i] = that expert, weights[i] = softmax over the token's k selected logits.   ids, weights: [n_tok*k]
  virtual void router_topk(int32_t* ids, float* weights, const float* logits, int64_t n_tok, int64_t n_expert,
                           int64_t k) = 0;
  // Grouped expert matmul, grouped so that each expert's weights are read once per call: for every slot,
  // out[i] = W_e · in[src] + b_e with e = ids[i], W_e = w.mat(e), b_e = row e of b (b may be absent) and
  // src = i when in_per_slot (in: [n_tok*k, w.cols]) else t = i / k (in: [n_tok, w.cols]).
  // out: [n_tok*k, w.mat_rows()]. Each slot's row equals matmul(W_e, that row) + b_e exactly.
  virtual void moe_matmul(float* out, const Tensor& w, const Tensor& b, const float* in, bool in_per_slot,
                          const int32_t* ids, int64_t n_tok, int64_t k) = 0;
  // out[t] = Σ_j weights[t*k + j] · y[t*k + j], summed j = 0, 1, .. in that order, each product rounded
  // (no FMA), so every backend gives the same bits.                   y: [n_tok*k, dim], out: [n_tok, dim]
  virtual void moe_combine(float* out, const float* y, const float* weights, int64_t n_tok, int64_t k,
                           int64_t dim) = 0;
  // Experts routed to since the last call (bench: how many experts a ubatch touches): router_topk calls and
  // the sum over calls of distinct experts chosen. Backends that cannot count cheaply return {-1, -1}.
  struct RouterStats {
    int64_t calls = 0, experts = 0;
  };
  virtual RouterStats take_router_stats() { return {-1, -1}; }
  // out = a + b                                                        all: [n]
  virtual void add(float* out, const float* a, const float* b, int64_t n) = 0;
  // Copy n floats from backend memory to the host (blocking).
  virtual void to_host(float* dst, const float* src, int64_t n) = 0;
  // Copy n floats / int32 from host memory into backend memory, in order with this backend's other work
  // (after the ops called before, before those called after). src may be reused once the call returns.
  virtual void from_host(float* dst, const float* src, int64_t n) = 0;
  virtual void from_host_i32(int32_t* dst, const int32_t* src, int64_t n) = 0;
  // Copy n floats between two buffers of this backend.
  virtual void copy(float* dst, const float* src, int64_t n) = 0;

  // --- vision encoder (model/vision.cpp): non-causal attention over explicit q/k/v and a plain activation.
  // Each query attends to the keys of its own segment only: token i in [seg[s], seg[s+1]) sees keys
  // seg[s] .. seg[s+1] - 1 (seg: n_seg + 1 increasing bounds from 0 to n_tok, backend memory; one segment =
  // full attention). softmax(q·k · kq_scale) · v per head; n_swa and sinks are unused, n_head_kv = n_head.
  //                     q, k, v: [n_tok, n_head * head_dim]             out: [n_tok, n_head * head_dim]
  virtual void attention_seg(float* out, const float* q, const float* k, const float* v, int64_t n_tok,
                             const AttnParams& p, const int32_t* seg, int64_t n_seg) = 0;
  // out = act(in): Silu or GeluTanh (ggml_gelu's tanh form)           all: [n] (out may alias in)
  virtual void unary(float* out, const float* in, int64_t n, Activation act) = 0;

  // Make a weight resident in the backend's memory before its first use (cuda: one device copy per Ops,
  // found again by the tensor's host address). Default: nothing to do — the cpu reads the mapping.
  virtual void upload(const Tensor& t) {}

  // --- stage hand-off (pipeline/ring.h). Defaults fit a backend whose work is done when the call returns.
  // Copy n floats from this backend's src into dst, a buffer of the next stage's backend.
  virtual void send(float* dst, Ops& dst_ops, const float* src, int64_t n) { copy(dst, src, n); }
  // Event handle for a ring slot (null when the backend needs none), recording and waiting on it.
  virtual void* event_create() { return nullptr; }
  virtual void event_destroy(void* ev) {}
  virtual void event_record(void* ev) {}
  virtual void event_wait(void* ev) {}
  // --- step timing for the trace. A timer marks a point in this backend's work order (by default the host
  // clock when the call is made; on cuda an event on the stream, so it times GPU work, not enqueueing);
  // timer_seconds(a, b) is the time from mark a to mark b, read after the work (it may wait for it).
  virtual void* timer_create() { return new double(0.0); }
  virtual void timer_destroy(void* t) { delete static_cast<double*>(t); }
  virtual void timer_record(void* t) {
    *static_cast<double*>(t) =
        std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  virtual double timer_seconds(void* from, void* to) {
    return *static_cast<double*>(to) - *static_cast<double*>(from);
  }
  // Copy of the KV cache of slot `seq`, stage-local `layer`, positions [0, n_pos), to host memory
  // ([n_pos, kv_dim] each).
  virtual void kv_to_host(int seq, int layer, float* k, float* v, int64_t n_pos) = 0;
  // The inverse (a loaded prefix cache): positions [0, n_pos) of slot `seq`, stage-local `layer` from host
  // f32 ([n_pos, kv_dim] each), stored with the same rounding as kv_store. kv_reserve(seq, .., n_pos) first.
  virtual void kv_from_host(int seq, int layer, const float* k, const float* v, int64_t n_pos) = 0;
};

// CPU backend with its own pool of n_threads worker threads.
std::unique_ptr<Ops> make_cpu_ops(int n_threads);

}  // namespace tp

// cpu_ops.cpp — the CPU backend: Ops on host memory, parallel over the stage's ThreadPool.
//
// Numerics follow ggml's CPU backend where it matters for matching llama.cpp (RMSNorm sums squares in
// double, then scales in f32) and are exact elsewhere (RoPE angles in double, GELU-tanh evaluated, not
// tabulated). The KV cache is f32, one [n_pos, kv_dim] K and V array per stage-local layer.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <list>
#include <new>
#include <vector>

#include "backend/cpu/kernels.h"
#include "common.h"
#include "quant/blocks.h"
#include "testing/fault_inject.h"

namespace tp {

namespace {

// out = act(gate) * up over [0, n). SiLU: g / (1 + e^-g); GELU-tanh: 0.5 g (1 + tanh(u)) = g / (1 + e^-2u)
// with u = sqrt(2/pi) (g + 0.044715 g^3), the same function without tanh's cancellation; SwigluOai (gpt-oss):
// g = min(g, 7), u = clamp(u, -7, 7), g / (1 + e^(-1.702 g)) * (u + 1). e^x is vexp (kernels.h, ≈ 1e-7
// relative), a vector at a time, the scalar tail through std::exp.
template <int W>
TP_VINLINE void glu_range_impl(float* out, const float* gate, const float* up, int64_t n, Activation act) {
  typedef typename VecT<W>::f vf;
  const float lim = kSwigluOaiLimit;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    vf g = vld<W>(gate + i), u = vld<W>(up + i);
    vf r;
    if (act == Activation::SwigluOai) {
      g = g < lim ? g : lim;
      u = u < lim ? u : lim;
      u = u > -lim ? u : -lim;
      r = g / (1.0f + vexp<W>(-kSwigluOaiAlpha * g)) * (u + 1.0f);
    } else {
      const vf z = act == Activation::Silu ? -g : -2.0f * (0.7978845608028654f * (g + 0.044715f * g * g * g));
      r = g / (1.0f + vexp<W>(z)) * u;
    }
    vst<W>(out + i, r);
  }
  for (; i < n; ++i) {
    float g = gate[i], u = up[i];
    if (act == Activation::SwigluOai) {
      g = std::min(g, lim);
      u = std::max(-lim, std::min(u, lim));
      out[i] = g / (1.0f + std::exp(-kSwigluOaiAlpha * g)) * (u + 1.0f);
      continue;
    }
    const float z = act == Activation::Silu ? -g : -2.0f * (0.7978845608028654f * (g + 0.044715f * g * g * g));
    out[i] = g / (1.0f + std::exp(z)) * u;
  }
}
TP_VEC_VARIANTS(glu_range, (float* out, const float* gate, const float* up, int64_t n, Activation act),
                (out, gate, up, n, act))

// The angle of pair k from its extrapolated angle θ_e (pos·base^(-2k/n_rot) [/ factor]): freq_scale·θ_e, or
// YaRN's blend of that with θ_e (config.h). The plain case keeps the product order the dense models had.
inline double rope_theta(double theta_e, int64_t k, const RopeParams& p) {
  const double interp = double(p.freq_scale) * theta_e;
  if (p.yarn.ext_factor == 0.0f) return interp;
  const float y = (float(k) - p.yarn.corr_low) / std::max(0.001f, p.yarn.corr_high - p.yarn.corr_low);
  const double ramp = double((1.0f - std::min(1.0f, std::max(0.0f, y))) * p.yarn.ext_factor);
  return interp * (1.0 - ramp) + theta_e * ramp;
}

// MemAvailable from /proc/meminfo in MiB, or -1 where it cannot be read.
double available_memory_mib() {
  FILE* f = std::fopen("/proc/meminfo", "r");
  if (!f) return -1;
  char line[256];
  double kib = -1;
  while (std::fgets(line, sizeof(line), f))
    if (std::sscanf(line, "MemAvailable: %lf kB", &kib) == 1) break;
  std::fclose(f);
  return kib < 0 ? -1 : kib / 1024.0;
}

class CpuOps final : public Ops {
 public:
  explicit CpuOps(int n_threads) : pool_(n_threads) {}

  float* alloc(int64_t n) override {
    alloc_fault_point(TP_ALLOC_ACTIVATION);
    buffers_.emplace_back(size_t(n > 0 ? n : 1));
    return buffers_.back().data();
  }

  int32_t* alloc_i32(int64_t n) override {
    alloc_fault_point(TP_ALLOC_ACTIVATION);
    ibuffers_.emplace_back(size_t(n > 0 ? n : 1));
    return ibuffers_.back().data();
  }

  void kv_reserve(int seq, int64_t n_layers, int64_t kv_dim, int64_t n_pos) override {
    if (seq >= int(kv_.size())) kv_.resize(size_t(seq) + 1);
    std::vector<std::vector<float>>& k = kv_[size_t(seq)].k;
    std::vector<std::vector<float>>& v = kv_[size_t(seq)].v;
    if (int64_t(k.size()) != n_layers) {
      k.assign(size_t(n_layers), {});
      v.assign(size_t(n_layers), {});
    }
    kv_dim_ = kv_dim;
    const size_t need = size_t(n_pos * kv_dim);
    if (n_layers == 0 || k[0].size() >= need) return;
    // Grow geometrically so that one-token prefills (generation) do not copy the cache every time.
    const size_t cap = k[0].capacity() >= need ? k[0].capacity() : std::max(need, k[0].capacity() + k[0].capacity() / 2);
    const double add_mib = double(cap - k[0].capacity()) * sizeof(float) * 2.0 * double(n_layers) / (1 << 20);
    const double avail_mib = available_memory_mib();
    // Checked up front: with overcommit a too-large vector is only discovered by the OOM killer.
    if (avail_mib >= 0 && add_mib > avail_mib)
      fail(TP_ERR_OUT_OF_MEMORY,
           "KV cache for %lld positions needs %.0f MiB more but only %.0f MiB of memory is available; use a "
           "shorter prompt or a smaller n_ctx, or split the layers over more stages",
           (long long)n_pos, add_mib, avail_mib);
    // Every layer's capacity first, then the sizes (which then cannot fail): a growth that fails part-way
    // leaves every size as it was, and the early return above (layer 0's size) stays true for all layers.
    for (int64_t l = 0; l < n_layers; ++l)
      for (std::vector<float>* kv : {&k[size_t(l)], &v[size_t(l)]}) {
        if (kv->capacity() >= cap) continue;
        alloc_fault_point(TP_ALLOC_KV_CACHE);
        kv->reserve(cap);
      }
    for (int64_t l = 0; l < n_layers; ++l) {
      k[size_t(l)].resize(need);
      v[size_t(l)].resize(need);
    }
  }

  void embed(float* out, const Tensor& table, const int32_t* tokens, int64_t n, float scale) override {
    const int64_t d = table.cols;
    pool_.parallel_for(n, 8, [&](int64_t b, int64_t e, int) {
      for (int64_t i = b; i < e; ++i) {
        float* o = out + i * d;
        dequantize_row(table.type, table.row(tokens[i]), o, d);
        if (scale != 1.0f)
          for (int64_t j = 0; j < d; ++j) o[j] *= scale;
      }
    });
  }

  void rms_norm(float* out, const float* in, const Tensor& w, int64_t rows, int64_t dim, float eps) override {
    const float* wf = w.f32();
    pool_.parallel_for(rows, 16, [&](int64_t b, int64_t e, int) {
      for (int64_t r = b; r < e; ++r) {
        const float* x = in + r * dim;
        float* y = out + r * dim;
        double ss = 0.0;
        for (int64_t j = 0; j < dim; ++j) ss += double(x[j]) * double(x[j]);
        const float scale = 1.0f / std::sqrt(float(ss / double(dim)) + eps);
        for (int64_t j = 0; j < dim; ++j) y[j] = (x[j] * scale) * wf[j];
      }
    });
  }

  void matmul(float* out, const Tensor& w, const float* in, int64_t n_tok) override {
    cpu_matmul(pool_, out, w, in, n_tok);
  }

  void add_bias(float* x, const Tensor& b, int64_t rows) override {
    const int64_t d = b.cols;
    const float* bf = b.f32();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < d; ++j) x[r * d + j] += bf[j];
  }

  void rope(float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t pos0, const RopeParams& p,
            const int32_t* pos) override {
    const bool multi = p.mode == RopeMode::Mrope || p.mode == RopeMode::Vision;
    if (multi && p.sections[0] + p.sections[1] + p.sections[2] + p.sections[3] <= 0)
      fail(TP_ERR_INTERNAL, "rope: multi-section mode with sections summing to 0");
    if (p.mode == RopeMode::Vision && 2 * p.n_rot != head_dim)
      fail(TP_ERR_INTERNAL, "rope: vision mode needs n_rot = head_dim / 2 (got %lld of %lld)", (long long)p.n_rot,
           (long long)head_dim);
    // Vision turns n_rot pairs (k, k + n_rot); the others n_rot/2 pairs, Neox/Mrope (k, k + n_rot/2).
    const int64_t half = p.mode == RopeMode::Vision ? p.n_rot : p.n_rot / 2;
    // Per-op: the frequency powers once; per position: cos/sin once, shared by every head.
    std::vector<double> pw(size_t(half > 0 ? half : 1));
    for (int64_t k = 0; k < half; ++k) pw[size_t(k)] = std::pow(double(p.base), -2.0 * double(k) / double(p.n_rot));
    pool_.parallel_for(n_tok, 1, [&](int64_t b, int64_t e, int) {
      thread_local std::vector<float> cs;
      if (int64_t(cs.size()) < 2 * half) cs.resize(size_t(2 * half));
      for (int64_t i = b; i < e; ++i) {
        // Position id s of token i: section-major pos, or pos0 + i (0 for e) without it.
        auto id = [&](int s) {
          return double(pos ? int64_t(pos[s * n_tok + i]) : s == 3 ? 0 : pos0 + i);
        };
        const double pos_t = id(0);
        for (int64_t k = 0; k < half; ++k) {
          double theta;
          if (multi) {
            int64_t j = k;
            const int s = rope_section(p.mode, p.sections, k, &j);
            theta = id(s) * pw[size_t(j)];
          } else {
            theta = pos_t * pw[size_t(k)];
          }
          if (p.freq_factors) theta /= double(p.freq_factors[k]);
          const double th = rope_theta(theta, k, p);
          cs[size_t(2 * k)] = float(std::cos(th)) * p.yarn.mscale;
          cs[size_t(2 * k + 1)] = float(std::sin(th)) * p.yarn.mscale;
        }
        for (int64_t h = 0; h < n_heads; ++h) {
          float* v = x + (i * n_heads + h) * head_dim;
          for (int64_t k = 0; k < half; ++k) {
            const int64_t ia = p.mode == RopeMode::Norm ? 2 * k : k;
            const int64_t ib = p.mode == RopeMode::Norm ? 2 * k + 1 : k + half;
            const float c = cs[size_t(2 * k)], s = cs[size_t(2 * k + 1)];
            const float a = v[ia], bb = v[ib];
            v[ia] = a * c - bb * s;
            v[ib] = a * s + bb * c;
          }
        }
      }
    });
  }

  void kv_store(int seq, int layer, const float* k, const float* v, int64_t pos0, int64_t n_tok) override {
    Slot& s = slot(seq, layer, pos0 + n_tok, "kv_store");
    memcpy(s.k[size_t(layer)].data() + pos0 * kv_dim_, k, size_t(n_tok * kv_dim_) * sizeof(float));
    memcpy(s.v[size_t(layer)].data() + pos0 * kv_dim_, v, size_t(n_tok * kv_dim_) * sizeof(float));
  }

  void kv_to_host(int seq, int layer, float* k, float* v, int64_t n_pos) override {
    if (n_pos <= 0) return;
    Slot& s = slot(seq, layer, n_pos, "kv_to_host");
    memcpy(k, s.k[size_t(layer)].data(), size_t(n_pos * kv_dim_) * sizeof(float));
    memcpy(v, s.v[size_t(layer)].data(), size_t(n_pos * kv_dim_) * sizeof(float));
  }

  void kv_from_host(int seq, int layer, const float* k, const float* v, int64_t n_pos) override {
    kv_store(seq, layer, k, v, 0, n_pos);
  }

  void attention(float* out, const float* q, int seq, int layer, int64_t pos0, int64_t n_tok,
                 const AttnParams& p) override {
    Slot& s = slot(seq, layer, pos0 + n_tok, "attention");
    cpu_attention(pool_, out, q, s.k[size_t(layer)].data(), s.v[size_t(layer)].data(), pos0, n_tok, p);
  }

  void glu(float* out, const float* gate, const float* up, int64_t n, Activation act) override {
    pool_.parallel_for((n + 4095) / 4096, 1, [&](int64_t b, int64_t e, int) {
      const int64_t lo = b * 4096, hi = e * 4096 < n ? e * 4096 : n;
      glu_range(out + lo, gate + lo, up + lo, hi - lo, act);
    });
  }

  void router_topk(int32_t* ids, float* weights, const float* logits, int64_t n_tok, int64_t n_expert,
                   int64_t k) override {
    router_stats_.experts += cpu_router_topk(pool_, ids, weights, logits, n_tok, n_expert, k);
    router_stats_.calls += 1;
  }

  void moe_matmul(float* out, const Tensor& w, const Tensor& b, const float* in, bool in_per_slot, const int32_t* ids,
                  int64_t n_tok, int64_t k) override {
    cpu_moe_matmul(pool_, moe_, out, w, b, in, in_per_slot, ids, n_tok, k);
  }

  void moe_combine(float* out, const float* y, const float* weights, int64_t n_tok, int64_t k, int64_t dim) override {
    cpu_moe_combine(pool_, out, y, weights, n_tok, k, dim);
  }

  void attention_seg(float* out, const float* q, const float* k, const float* v, int64_t n_tok, const AttnParams& p,
                     const int32_t* seg, int64_t n_seg) override {
    cpu_attention_seg(pool_, out, q, k, v, n_tok, p, seg, n_seg);
  }

  void unary(float* out, const float* in, int64_t n, Activation act) override { cpu_unary(pool_, out, in, n, act); }

  RouterStats take_router_stats() override {
    const RouterStats s = router_stats_;
    router_stats_ = {0, 0};
    return s;
  }

  void add(float* out, const float* a, const float* b, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
  }

  void to_host(float* dst, const float* src, int64_t n) override { memcpy(dst, src, size_t(n) * sizeof(float)); }
  void copy(float* dst, const float* src, int64_t n) override { memcpy(dst, src, size_t(n) * sizeof(float)); }
  void from_host(float* dst, const float* src, int64_t n) override { memcpy(dst, src, size_t(n) * sizeof(float)); }
  void from_host_i32(int32_t* dst, const int32_t* src, int64_t n) override {
    memcpy(dst, src, size_t(n) * sizeof(int32_t));
  }

 private:
  ThreadPool pool_;
  std::list<std::vector<float>> buffers_;  // list: pointers stay valid as buffers are added
  std::list<std::vector<int32_t>> ibuffers_;
  RouterStats router_stats_{0, 0};
  MoeBuffers moe_;
  // One sequence slot's cache: [n_pos, kv_dim] f32 K and V per stage-local layer.
  struct Slot {
    std::vector<std::vector<float>> k, v;
  };
  Slot& slot(int seq, int layer, int64_t n_pos, const char* op) {
    if (seq < 0 || size_t(seq) >= kv_.size() || layer < 0 || size_t(layer) >= kv_[size_t(seq)].k.size() ||
        int64_t(kv_[size_t(seq)].k[size_t(layer)].size()) < n_pos * kv_dim_)
      fail(TP_ERR_INTERNAL, "cpu: %s of slot %d, layer %d up to position %lld before kv_reserve", op, seq, layer,
           (long long)n_pos);
    return kv_[size_t(seq)];
  }
  std::vector<Slot> kv_;  // per sequence slot; only kv_reserve adds slots
  int64_t kv_dim_ = 0;
};

}  // namespace

std::unique_ptr<Ops> make_cpu_ops(int n_threads) { return std::make_unique<CpuOps>(n_threads); }

}  // namespace tp

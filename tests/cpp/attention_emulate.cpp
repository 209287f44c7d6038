// attention_emulate.cpp — runs the CUDA attention kernels' bodies on the CPU, no GPU needed.
//
// The bodies of csrc/backend/cuda/attention_mma.cuh (tensor cores) and attention_simple.cuh (f32) are
// compiled as host code with a small emulation of the CUDA execution model: one std::thread per CUDA
// thread of a CTA (CTAs run one after another), __syncthreads = a CTA barrier, warp shuffles exchanged
// through per-warp slots between two warp barriers, and mma.sync.m16n8k16.row.col.f32.f16.f16.f32 computed
// from the 32 lanes' fragment registers with the PTX ISA layouts (written here independently of the
// kernel). Each case compares every output element with a float64 reference on the same f16-rounded K/V;
// outputs start as NaN so an element the kernel forgets fails. What this proves: indexing, tiling, masking
// (causal, sliding window, GQA), fragment construction and the online softmax. What it cannot: timing,
// memory-model races, and the real instruction's rounding (the emulated mma accumulates in float).
//
// Build and run (tests/test_cuda_ops.py::test_attention_kernels_in_cpu_emulation does this):
//   g++ -std=c++17 -O2 -pthread -DTP_ATTN_EMULATE -Icsrc -I<cuda>/include tests/cpp/attention_emulate.cpp
// Exit status 0 when every case passes; one line per case on stdout.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

// ---- the CUDA execution model, emulated ------------------------------------------------------------------

#define __launch_bounds__(...)

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lk(mu_);
    const unsigned long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lk, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  unsigned long gen_ = 0;
};

struct Warp {
  Barrier bar{32};
  float f[32];
  uint32_t a[32][4], b[32][2];
};

struct Cta {
  explicit Cta(int threads) : bar(threads), warps(size_t(threads / 32)) {}
  Barrier bar;
  std::vector<Warp> warps;
};

thread_local uint3 threadIdx, blockIdx;
thread_local dim3 blockDim, gridDim;
thread_local Cta* g_cta = nullptr;

Warp& my_warp() { return g_cta->warps[threadIdx.x / 32]; }
int my_lane() { return int(threadIdx.x % 32); }

void __syncthreads() { g_cta->bar.wait(); }

float exchange(float v, int src) {
  Warp& w = my_warp();
  w.f[my_lane()] = v;
  w.bar.wait();
  const float r = w.f[src];
  w.bar.wait();
  return r;
}
float __shfl_xor_sync(unsigned, float v, int mask) { return exchange(v, my_lane() ^ mask); }
float __shfl_sync(unsigned, float v, int src) { return exchange(v, src); }

#include "backend/cuda/attention_mma.cuh"
#include "backend/cuda/attention_simple.cuh"

namespace tp {
namespace cuda {
namespace {

alignas(16) unsigned char smem[1 << 17];  // the CTA's dynamic shared memory (one CTA runs at a time)

float half_bits(uint32_t reg, int hi) {
  const unsigned short u = (unsigned short)(hi ? reg >> 16 : reg & 0xffff);
  return __half2float(__ushort_as_half(u));
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 from the PTX ISA fragment layouts: lane = 4g + t;
// A: a0 (g, 2t|2t+1), a1 (g+8, 2t|2t+1), a2 (g, 2t+8|2t+9), a3 (g+8, 2t+8|2t+9)  (low half = lower column)
// B: b0 (k = 2t|2t+1, n = g), b1 (k = 2t+8|2t+9, n = g)                           (low half = lower k)
// C: c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)
void emulated_mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  Warp& w = my_warp();
  const int lane = my_lane();
  w.a[lane][0] = a0, w.a[lane][1] = a1, w.a[lane][2] = a2, w.a[lane][3] = a3;
  w.b[lane][0] = b0, w.b[lane][1] = b1;
  w.bar.wait();
  float A[16][16], B[16][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L / 4, t = L % 4;
    for (int hi = 0; hi < 2; ++hi) {
      A[g][2 * t + hi] = half_bits(w.a[L][0], hi);
      A[g + 8][2 * t + hi] = half_bits(w.a[L][1], hi);
      A[g][2 * t + 8 + hi] = half_bits(w.a[L][2], hi);
      A[g + 8][2 * t + 8 + hi] = half_bits(w.a[L][3], hi);
      B[2 * t + hi][g] = half_bits(w.b[L][0], hi);
      B[2 * t + 8 + hi][g] = half_bits(w.b[L][1], hi);
    }
  }
  w.bar.wait();
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    c[e] += acc;
  }
}

void run_grid(dim3 grid, int threads, const std::function<void()>& body) {
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Cta cta(threads);
      std::vector<std::thread> ts;
      for (int tid = 0; tid < threads; ++tid)
        ts.emplace_back([&, tid] {
          threadIdx = make_uint3(unsigned(tid), 0, 0);
          blockIdx = make_uint3(bx, by, 0);
          blockDim = dim3(unsigned(threads));
          gridDim = grid;
          g_cta = &cta;
          body();
        });
      for (auto& t : ts) t.join();
    }
}

}  // namespace
}  // namespace cuda
}  // namespace tp

// ---- cases ------------------------------------------------------------------------------------------------

using tp::cuda::AttnArgs;

struct Case {
  bool mma;
  int head_dim, n_head, n_head_kv;
  int64_t pos0, n_tok, n_swa;
};

// float64 attention on the f16-rounded cache (what the kernels read); q as given.
std::vector<double> reference(const Case& c, const std::vector<float>& q, const std::vector<float>& k,
                              const std::vector<float>& v, float scale) {
  const int D = c.head_dim, group = c.n_head / c.n_head_kv, kv_dim = c.n_head_kv * D;
  std::vector<double> out(size_t(c.n_tok) * c.n_head * D);
  for (int64_t i = 0; i < c.n_tok; ++i)
    for (int h = 0; h < c.n_head; ++h) {
      const int64_t pos = c.pos0 + i, j0 = c.n_swa > 0 ? std::max<int64_t>(0, pos - c.n_swa + 1) : 0;
      const int kvh = h / group;
      std::vector<double> s(size_t(pos - j0 + 1));
      double mx = -INFINITY;
      for (int64_t j = j0; j <= pos; ++j) {
        double dot = 0;
        for (int d = 0; d < D; ++d)
          dot += double(q[size_t((i * c.n_head + h) * D + d)]) * k[size_t(j * kv_dim + kvh * D + d)];
        s[size_t(j - j0)] = dot * scale;
        mx = std::max(mx, s[size_t(j - j0)]);
      }
      double l = 0;
      for (double& x : s) l += (x = std::exp(x - mx));
      for (int d = 0; d < D; ++d) {
        double acc = 0;
        for (int64_t j = j0; j <= pos; ++j) acc += s[size_t(j - j0)] * v[size_t(j * kv_dim + kvh * D + d)];
        out[size_t((i * c.n_head + h) * D + d)] = acc / l;
      }
    }
  return out;
}

bool run_case(const Case& c, unsigned seed) {
  const int D = c.head_dim, kv_dim = c.n_head_kv * D;
  const int64_t n_pos = c.pos0 + c.n_tok;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> q(size_t(c.n_tok) * c.n_head * D), kf(size_t(n_pos) * kv_dim), vf(kf.size());
  for (float& x : q) x = nd(rng);
  std::vector<__half> kh(kf.size()), vh(kf.size());
  for (size_t i = 0; i < kf.size(); ++i) {
    kh[i] = __float2half_rn(nd(rng));
    vh[i] = __float2half_rn(nd(rng));
    kf[i] = __half2float(kh[i]);
    vf[i] = __half2float(vh[i]);
  }
  std::vector<float> out(q.size(), NAN);
  const float scale = 1.0f / std::sqrt(float(D));
  const AttnArgs a{out.data(), q.data(), kh.data(), vh.data(), c.pos0, c.n_tok, c.n_head, c.n_head_kv, D, c.n_swa,
                   scale};
  using namespace tp::cuda;
  if (c.mma) {
    const dim3 grid(unsigned((c.n_tok + kMmaRows - 1) / kMmaRows), unsigned(c.n_head));
    const float sl2 = scale * 1.4426950408889634f;
    std::function<void()> body;
    if (D == 64) body = [&] { attn_mma_body<64>(a, sl2); };
    if (D == 128) body = [&] { attn_mma_body<128>(a, sl2); };
    if (D == 256) body = [&] { attn_mma_body<256>(a, sl2); };
    run_grid(grid, kMmaWarps * 32, body);
  } else {
    const dim3 grid(unsigned((c.n_tok + kSimpleRows - 1) / kSimpleRows), unsigned(c.n_head));
    std::function<void()> body;
    if (D <= 32) body = [&] { attn_simple_body<1>(a); };
    else if (D <= 64) body = [&] { attn_simple_body<2>(a); };
    else if (D <= 128) body = [&] { attn_simple_body<4>(a); };
    else body = [&] { attn_simple_body<8>(a); };
    run_grid(grid, kSimpleWarps * 32, body);
  }
  const std::vector<double> ref = reference(c, q, kf, vf, scale);
  // Tolerances relative to max|v| (every output is a convex combination of v rows), measured here and
  // given 10× room: f32 kernel ≤ 4e-7 (f32 rounding of D-term dot products and softmax sums) -> 4e-6;
  // tensor cores ≤ 1.5e-4 (Q and P rounded to f16, 2^-11 relative each) -> 2e-3. Any indexing, fragment or
  // masking error moves outputs by O(max|v|).
  double vmax = 0;
  for (float x : vf) vmax = std::max(vmax, double(std::fabs(x)));
  const double tol = (c.mma ? 2e-3 : 4e-6) * vmax;
  double worst = 0;
  size_t bad = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double d = std::fabs(double(out[i]) - ref[i]);
    if (!(d <= tol)) ++bad;  // NaN counts as bad
    if (d > worst || std::isnan(d)) worst = std::isnan(d) ? INFINITY : d;
  }
  std::printf("%s %-6s D=%3d heads=%d/%d pos0=%3lld n_tok=%3lld swa=%3lld  max|err|/max|v|=%.2e  %s\n",
              bad ? "FAIL" : "ok  ", c.mma ? "mma" : "simple", D, c.n_head, c.n_head_kv, (long long)c.pos0,
              (long long)c.n_tok, (long long)c.n_swa, worst / vmax, bad ? "" : "");
  return bad == 0;
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  std::vector<Case> cases = {
      // tensor cores: every head size, GQA 1/2/4, swa on/off, partial CTAs, history not a tile multiple
      {true, 64, 2, 2, 0, 1, 0},    {true, 64, 4, 1, 45, 7, 0},   {true, 64, 4, 2, 37, 83, 20},
      {true, 128, 2, 1, 0, 83, 0},  {true, 128, 4, 4, 70, 7, 16}, {true, 256, 2, 1, 21, 40, 0},
      {true, 256, 2, 2, 3, 70, 33},
      // tile edges on the masks: a tile starting at a warp's last row (pos0 ≡ 1 mod 16); a tile ending at
      // the first row's window start (pos0 - n_swa + 2 ≡ 0 mod the tile)
      {true, 64, 2, 1, 49, 30, 0},  {true, 256, 2, 1, 17, 20, 0},  {true, 64, 2, 1, 112, 40, 50},
      // f32 kernel: the same plus head sizes only it runs
      {false, 64, 4, 1, 45, 7, 0},  {false, 128, 2, 2, 37, 40, 20}, {false, 256, 2, 1, 0, 20, 0},
      {false, 64, 2, 1, 45, 30, 15}, {false, 32, 3, 1, 10, 83, 0},  {false, 80, 2, 1, 5, 17, 9},
      {false, 48, 2, 2, 0, 1, 0},
  };
  if (quick) cases.resize(3);
  int failed = 0;
  unsigned seed = 1;
  for (const Case& c : cases) failed += run_case(c, seed++) ? 0 : 1;
  std::printf("%d of %d cases failed\n", failed, int(cases.size()));
  return failed ? 1 : 0;
}

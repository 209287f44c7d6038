// matmul_f32.cpp — CPU matmul for float weights (F32/F16/BF16, and any type without int8 unpacking): rows
// decoded into a thread-local tile and multiplied with a register-blocked f32 kernel, compiled per ISA with
// target_clones (kernels.h). Each (row, token) is one fixed-order dot product, so results do not depend on
// the thread count or on how tokens are batched.
#include <cstring>
#include <vector>

#include "backend/cpu/kernels.h"
#include "quant/blocks.h"

namespace tp {

namespace {

constexpr int64_t kRowTile = 16;
constexpr int kVec = 16;

// NR rows of w (stride ldw) times NT rows of x (stride ldx), K elements; out[t * ldo + r].
template <int NR, int NT>
__attribute__((always_inline)) inline void dot_block(const float* w, int64_t ldw, const float* x, int64_t ldx,
                                                     int64_t K, float* out, int64_t ldo) {
  v16f acc[NR][NT];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = v16f{};
  int64_t k = 0;
  for (; k + kVec <= K; k += kVec) {
    v16f xv[NT];
    for (int t = 0; t < NT; ++t) memcpy(&xv[t], x + t * ldx + k, sizeof(v16f));
    for (int r = 0; r < NR; ++r) {
      v16f wv;
      memcpy(&wv, w + r * ldw + k, sizeof(v16f));
      for (int t = 0; t < NT; ++t) acc[r][t] += wv * xv[t];
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int t = 0; t < NT; ++t) {
      // Fixed-order horizontal sum, then the scalar tail.
      float s = 0.0f;
      for (int i = 0; i < kVec; ++i) s += acc[r][t][i];
      for (int64_t kk = k; kk < K; ++kk) s += w[r * ldw + kk] * x[t * ldx + kk];
      out[t * ldo + r] = s;
    }
  }
}

// Rows [0, nr) of a decoded tile against all n_tok tokens.
TP_CPU_CLONES void tile_times_tokens(const float* wt, int64_t nr, int64_t K, const float* x, int64_t n_tok,
                                     float* out, int64_t ldo) {
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) {
    int64_t t = 0;
    for (; t + 4 <= n_tok; t += 4) dot_block<4, 4>(wt + r * K, K, x + t * K, K, K, out + t * ldo + r, ldo);
    for (; t < n_tok; ++t) dot_block<4, 1>(wt + r * K, K, x + t * K, K, K, out + t * ldo + r, ldo);
  }
  for (; r < nr; ++r) {
    int64_t t = 0;
    for (; t + 4 <= n_tok; t += 4) dot_block<1, 4>(wt + r * K, K, x + t * K, K, K, out + t * ldo + r, ldo);
    for (; t < n_tok; ++t) dot_block<1, 1>(wt + r * K, K, x + t * K, K, K, out + t * ldo + r, ldo);
  }
}

}  // namespace

void cpu_matmul_f32(ThreadPool& pool, float* out, const Tensor& w, const float* in, int64_t n_tok) {
  const int64_t K = w.cols, N = w.rows;
  const int64_t n_tiles = (N + kRowTile - 1) / kRowTile;
  pool.parallel_for(n_tiles, 1, [&](int64_t b, int64_t e, int) {
    thread_local std::vector<float> tile;
    if (int64_t(tile.size()) < kRowTile * K) tile.resize(size_t(kRowTile * K));
    for (int64_t ti = b; ti < e; ++ti) {
      const int64_t r0 = ti * kRowTile;
      const int64_t nr = N - r0 < kRowTile ? N - r0 : kRowTile;
      for (int64_t r = 0; r < nr; ++r) dequantize_row(w.type, w.row(r0 + r), tile.data() + r * K, K);
      tile_times_tokens(tile.data(), nr, K, in, n_tok, out + r0, N);
    }
  });
}

}  // namespace tp

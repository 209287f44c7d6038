// matmul_f32.cpp — CPU matmul for float weights (F32/F16/BF16, and any type without int8 unpacking): rows
// decoded into a thread-local tile and multiplied with a register-blocked f32 kernel of the machine's vector
// width (kernels.h). Each (row, token) is one fixed-order dot product, so results do not depend on the thread
// count or on how tokens are batched (the lane count, and so the summation order, depends on the ISA).
#include <cstring>
#include <vector>

#include "backend/cpu/kernels.h"
#include "quant/blocks.h"

namespace tp {

namespace {

constexpr int64_t kRowTile = 16;

// NR rows of w (stride ldw) times NT rows of x (stride ldx), K elements; out[t * ldo + r].
template <int W, int NR, int NT>
TP_VINLINE void dot_block(const float* w, int64_t ldw, const float* x, int64_t ldx,
                                                     int64_t K, float* out, int64_t ldo) {
  typedef typename VecT<W>::f vf;
  vf acc[NR][NT];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = vf{};
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    vf xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = vld<W>(x + t * ldx + k);
    for (int r = 0; r < NR; ++r) {
      const vf wv = vld<W>(w + r * ldw + k);
      for (int t = 0; t < NT; ++t) acc[r][t] += wv * xv[t];
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int t = 0; t < NT; ++t) {
      // Fixed-order horizontal sum, then the scalar tail.
      float s = 0.0f;
      for (int i = 0; i < W; ++i) s += acc[r][t][i];
      for (int64_t kk = k; kk < K; ++kk) s += w[r * ldw + kk] * x[t * ldx + kk];
      out[t * ldo + r] = s;
    }
  }
}

// Rows [0, nr) of a decoded tile against all n_tok tokens.
template <int W>
TP_VINLINE void tile_times_tokens_impl(const float* wt, int64_t nr, int64_t K, const float* x, int64_t n_tok,
                                       float* out, int64_t ldo) {
  // Register blocking: 4 rows x 4 tokens of accumulators (16 vectors) on AVX-512's 32 registers, 2 x 4 with
  // AVX2's and SSE2's 16.
  constexpr int R = W == 16 ? 4 : 2;
  int64_t r = 0;
  for (; r + R <= nr; r += R) {
    int64_t t = 0;
    for (; t + 4 <= n_tok; t += 4) dot_block<W, R, 4>(wt + r * K, K, x + t * K, K, K, out + t * ldo + r, ldo);
    for (; t < n_tok; ++t) dot_block<W, R, 1>(wt + r * K, K, x + t * K, K, K, out + t * ldo + r, ldo);
  }
  for (; r < nr; ++r) {
    int64_t t = 0;
    for (; t + 4 <= n_tok; t += 4) dot_block<W, 1, 4>(wt + r * K, K, x + t * K, K, K, out + t * ldo + r, ldo);
    for (; t < n_tok; ++t) dot_block<W, 1, 1>(wt + r * K, K, x + t * K, K, K, out + t * ldo + r, ldo);
  }
}
TP_VEC_VARIANTS(tile_times_tokens,
                (const float* wt, int64_t nr, int64_t K, const float* x, int64_t n_tok, float* out, int64_t ldo),
                (wt, nr, K, x, n_tok, out, ldo))

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

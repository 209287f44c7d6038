// stage.cpp — one stage's share of a ubatch: embed (first), its layers, logits (last).
#include "pipeline/stage.h"

#include "common.h"

namespace tp {

void Stage::compute(const ModelConfig& c, const ModelWeights& w, bool first, bool last, const int32_t* tokens,
                    int64_t pos0, int64_t n_tok, bool all_rows, bool last_row, const std::atomic<bool>& stop) {
  if (first) embed_tokens(*ops, c, w, tokens, n_tok, x);
  for (int64_t il = layer_begin; il < layer_end; ++il) {
    if (stop.load(std::memory_order_relaxed)) fail(TP_ERR_CANCELLED, "stopped");
    current_layer = il;
    if (il == fail_at_layer) fail(TP_ERR_INTERNAL, "injected fault (testing aid)");
    decoder_layer(*ops, c, w, il, int(il - layer_begin), scratch, x, pos0, n_tok);
  }
  current_layer = -1;
  if (last && (all_rows || last_row)) {
    const int64_t rows = all_rows ? n_tok : 1;
    if (logits_rows < rows) {
      logits = ops->alloc(rows * c.n_vocab);
      logits_rows = rows;
    }
    output_logits(*ops, c, w, x + (all_rows ? 0 : (n_tok - 1) * c.n_embd), rows, normed, logits);
  }
}

}  // namespace tp

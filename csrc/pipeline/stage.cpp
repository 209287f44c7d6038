// stage.cpp — one stage's share of a ubatch: embed (first), its layers, logits (last).
#include "pipeline/stage.h"

#include "common.h"

namespace tp {

void Stage::compute(const ModelConfig& c, const ModelWeights& w, bool first, bool last, const UbatchInput& in,
                    bool all_rows, bool last_row, const std::atomic<bool>& stop) {
  const int64_t n_tok = in.n_tok;
  if (first) embed_inputs(*ops, c, w, in.tokens, in.embd, n_tok, x);
  const int32_t* pos = nullptr;
  if (in.pos) {
    if (!scratch.pos) fail(TP_ERR_INTERNAL, "position ids given to a stage without a position buffer");
    ops->from_host_i32(scratch.pos, in.pos, 4 * n_tok);
    pos = scratch.pos;
  }
  for (int64_t il = layer_begin; il < layer_end; ++il) {
    if (stop.load(std::memory_order_relaxed)) fail(TP_ERR_CANCELLED, "stopped");
    current_layer = il;
    if (il == fail_at_layer.load(std::memory_order_relaxed)) fail(TP_ERR_INTERNAL, "injected fault (testing aid)");
    decoder_layer(*ops, c, w, il, int(il - layer_begin), scratch, x, in.kv, n_tok, pos);
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

// stage.h — a pipeline stage: one device, a contiguous range of layers, their KV cache, and scratch.
//
// Stage 0 also embeds tokens; the last stage also produces logits. A stage's worker thread (scheduler.cpp)
// drives its Ops; the stage itself knows nothing of schedules.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "backend/ops.h"
#include "model/decoder.h"

namespace tp {

// One ubatch's inputs, host memory. Token i (of n_tok) is tokens[i] when >= 0, else row -1 - tokens[i] of embd
// ([*, n_embd] f32). pos: null (rope positions kv.pos0 + i) or this ubatch's ids, section-major [4, n_tok].
struct UbatchInput {
  const int32_t* tokens = nullptr;
  const float* embd = nullptr;
  const int32_t* pos = nullptr;
  KvPlace kv;  // the rows' sequence slot(s) and KV indices
  int64_t n_tok = 0;
};

struct Stage {
  int index = 0;
  std::string device;
  int64_t layer_begin = 0, layer_end = 0;  // [begin, end)
  std::unique_ptr<Ops> ops;
  LayerScratch scratch;
  float* x = nullptr;       // [ubatch, n_embd] residual stream of the ubatch being computed
  float* normed = nullptr;  // [ubatch, n_embd] output-norm rows (last stage)
  float* logits = nullptr;  // [logits_rows, n_vocab] (last stage)
  int64_t logits_rows = 0;
  int64_t current_layer = -1;  // layer being computed (for error messages)
  std::atomic<int64_t> fail_at_layer{-1};  // testing aid (tp_engine_inject_fault), set from any thread

  int64_t n_layers() const { return layer_end - layer_begin; }

  // Computes one ubatch in place on x (KV rows as in.kv says); the first stage embeds the inputs
  // first, every stage copies the position ids it needs into scratch.pos, the last stage leaves logits for
  // all rows (all_rows) or the last row (last_row) in `logits`. Checks `stop` between layers and throws
  // TP_ERR_CANCELLED when it is set.
  void compute(const ModelConfig& c, const ModelWeights& w, bool first, bool last, const UbatchInput& in,
               bool all_rows, bool last_row, const std::atomic<bool>& stop);
};

}  // namespace tp

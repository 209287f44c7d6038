// decoder.h — the forward pass, written once against Ops (GGUF_SPEC §5).
//
// A stage calls embed_tokens (first stage), decoder_layer for each of its layers, and output_logits (last
// stage). Architectures differ only by ModelConfig flags. Buffers are the backend's memory.
#pragma once

#include <cstdint>

#include "backend/ops.h"

namespace tp {

// Per-ubatch scratch for one stage, sized for up to `cap` tokens.
struct LayerScratch {
  int64_t cap = 0;
  float* h = nullptr;     // [cap, n_embd]   normed input of a sub-block
  float* q = nullptr;     // [cap, q_dim]
  float* k = nullptr;     // [cap, kv_dim]
  float* v = nullptr;     // [cap, v_dim]
  float* att = nullptr;   // [cap, q_dim]    attention output (heads concatenated)
  float* gate = nullptr;  // [cap, ff_width]  (MoE: [cap * n_expert_used, n_ff_exp])
  float* up = nullptr;    // [cap, ff_width]
  float* tmp = nullptr;   // [cap, n_embd]   projection output before the residual add
  int32_t* pos = nullptr;  // [4, cap]       the ubatch's rope position ids when explicit, section-major (t, h, w, e)
  // MoE only (null for dense models):
  float* router = nullptr;    // [cap, n_expert]              router logits
  int32_t* ids = nullptr;     // [cap * n_expert_used]        chosen experts, slot t*k + j
  float* weights = nullptr;   // [cap * n_expert_used]        their mixing weights
  float* experts = nullptr;   // [cap * n_expert_used, n_embd] each slot's expert output

  static LayerScratch make(Ops& ops, const ModelConfig& c, int64_t cap);
};

// x[i] = token_embd[tokens[i]] (× sqrt(n_embd) for gemma3).           x: [n, n_embd]
void embed_tokens(Ops& ops, const ModelConfig& c, const ModelWeights& w, const int32_t* tokens, int64_t n, float* x);

// Mixed input: x[i] = embed_tokens of tokens[i] when tokens[i] >= 0, else row -1 - tokens[i] of `embd` (host,
// [*, n_embd] f32), copied as it is: like llama.cpp, embedding rows are never scaled. Runs of token ids are
// embedded in one call and runs of consecutive rows copied in one, so an all-token input is embed_tokens.
void embed_inputs(Ops& ops, const ModelConfig& c, const ModelWeights& w, const int32_t* tokens, const float* embd,
                  int64_t n, float* x);

// Where a ubatch's rows live in the KV cache. A prefill ubatch: row i of sequence slot `seq` at KV index
// pos0 + i. A decode ubatch (rows != null): row i is the next token of slot rows[i].seq at KV index
// rows[i].pos, attending to its own slot's keys only; the rows' matmuls still run as one batch.
struct KvRow {
  int32_t seq = 0;
  int64_t pos = 0;
};
struct KvPlace {
  int32_t seq = 0;
  int64_t pos0 = 0;
  const KvRow* rows = nullptr;  // host [n_tok], or null
};

// One decoder layer in place on the residual stream x ([n_tok, n_embd]): the attention block, then the
// dense or the mixture-of-experts FFN block as ModelConfig says.
// il: the model's layer index (selects weights, SWA and RoPE base); kv_layer: stage-local KV layer.
// pos: the tokens' rope position ids (backend memory, section-major [4, n_tok]; Ops::rope) or null for
// kv.pos0 + i (a decode ubatch always gives them). Attention stays causal by KV index, whatever the rope
// positions.
void decoder_layer(Ops& ops, const ModelConfig& c, const ModelWeights& w, int64_t il, int kv_layer,
                   LayerScratch& s, float* x, const KvPlace& kv, int64_t n_tok, const int32_t* pos);

// logits[r] = output · RMSNorm(x[r]) · output_norm for the n_rows rows of x.   logits: [n_rows, n_vocab]
// `normed` is scratch of [n_rows, n_embd].
void output_logits(Ops& ops, const ModelConfig& c, const ModelWeights& w, const float* x, int64_t n_rows,
                   float* normed, float* logits);

}  // namespace tp

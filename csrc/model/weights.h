// weights.h — typed views of the model's tensors (zero-copy into the GGUF mapping) and their checks.
//
// A Tensor is a 2-D view [rows = ne1 * ne2, cols = ne0] of one GGUF tensor: each row is ne0 elements along
// the reduction dimension, stored as whole blocks of `type`. A 3-D expert tensor [ne0, ne1, n_expert] is
// `mats` = n_expert matrices of ne1 rows stacked: expert e's rows are e * rows/mats .. (e+1) * rows/mats - 1. Shapes are checked once at load against
// ModelConfig; after that the layer code trusts them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "quant/types.h"

namespace tp {

class GgufFile;

struct Tensor {
  const char* name = nullptr;  // points into the GgufFile's tensor table
  GgmlType type = GgmlType::F32;
  int64_t cols = 0;            // ne0: elements per row (reduction dim)
  int64_t rows = 1;            // ne1 * ne2 * ne3
  int64_t mats = 1;            // ne2: experts of a 3-D expert tensor (rows / mats rows each)
  int64_t row_bytes = 0;
  const void* data = nullptr;  // host pointer into the mapping (a backend may keep its own copy)

  bool present() const { return data != nullptr; }
  const uint8_t* row(int64_t r) const { return static_cast<const uint8_t*>(data) + r * row_bytes; }
  const float* f32() const { return static_cast<const float*>(data); }
  int64_t mat_rows() const { return rows / mats; }
  // The 2-D view of matrix e of a 3-D tensor.
  Tensor mat(int64_t e) const {
    Tensor t = *this;
    t.rows = mat_rows();
    t.mats = 1;
    t.data = row(e * t.rows);
    return t;
  }
};

struct LayerWeights {
  Tensor attn_norm;       // [n_embd] f32
  Tensor wq;              // [n_embd, n_head*head_dim] q4_K
  Tensor wk;              // [n_embd, n_head_kv*head_dim] q4_K
  Tensor wv;              // [n_embd, n_head_kv*head_dim] q4_K / q6_K
  Tensor wo;              // [n_head*head_dim, n_embd] q4_K
  Tensor bq, bk, bv;      // [q_dim], [kv_dim], [kv_dim] f32 (qwen2, gpt-oss)
  Tensor bo;              // [n_embd] f32 (gpt-oss)
  Tensor sinks;           // [n_head] f32 attention sink logits (gpt-oss)
  Tensor q_norm, k_norm;  // [head_dim] f32 (qwen3, gemma3)
  Tensor post_attn_norm;  // [n_embd] f32 (gemma3)
  Tensor ffn_norm;        // [n_embd] f32 (gpt-oss: post_attention_norm.weight, the FFN's input norm)
  Tensor gate;            // [n_embd, n_ff] q4_K
  Tensor up;              // [n_embd, n_ff] q4_K
  Tensor down;            // [n_ff, n_embd] q4_K / q6_K
  Tensor post_ffw_norm;   // [n_embd] f32 (gemma3)
  // Mixture of experts (gpt-oss), instead of gate/up/down:
  Tensor gate_inp;        // [n_embd, n_expert] f32 router
  Tensor gate_inp_b;      // [n_expert] f32
  Tensor gate_exps;       // [n_embd, n_ff_exp, n_expert] mxfp4 / q4_K / q5_0 / q8_0
  Tensor up_exps;         // [n_embd, n_ff_exp, n_expert]
  Tensor down_exps;       // [n_ff_exp, n_embd, n_expert]
  Tensor gate_exps_b;     // [n_ff_exp, n_expert] f32
  Tensor up_exps_b;       // [n_ff_exp, n_expert] f32
  Tensor down_exps_b;     // [n_embd, n_expert] f32
};

struct ModelWeights {
  Tensor tok_embd;     // [n_embd, n_vocab] q4_K / q6_K
  Tensor output_norm;  // [n_embd] f32
  Tensor output;       // [n_embd, n_vocab] q6_K; == tok_embd when tied
  Tensor rope_freqs;   // [n_rot/2] f32, optional (llama 3.1+)
  std::vector<LayerWeights> layers;
  int64_t n_params = 0;  // elements over all tensors in the file
};

// Finds every tensor the architecture needs, checks shapes and types, fills cfg.n_vocab and
// cfg.tied_output. Throws tp::Error naming the tensor, the expected and the found shape or type.
ModelWeights load_weights(const GgufFile& f, ModelConfig& cfg);

}  // namespace tp

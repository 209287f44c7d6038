// decoder.cpp — the decoder layer, top to bottom as in the papers (GGUF_SPEC §5.2–5.5): an attention block
// and one of two FFN blocks (dense, or mixture of experts for gpt-oss), each written once against Ops.
#include "model/decoder.h"

#include <cmath>

namespace tp {

LayerScratch LayerScratch::make(Ops& ops, const ModelConfig& c, int64_t cap) {
  LayerScratch s;
  s.cap = cap;
  s.h = ops.alloc(cap * c.n_embd);
  s.q = ops.alloc(cap * c.q_dim());
  s.k = ops.alloc(cap * c.kv_dim());
  s.v = ops.alloc(cap * c.v_dim());
  s.att = ops.alloc(cap * c.q_dim());
  s.gate = ops.alloc(cap * c.ff_width());
  s.up = ops.alloc(cap * c.ff_width());
  s.tmp = ops.alloc(cap * c.n_embd);
  s.pos = ops.alloc_i32(4 * cap);  // M-RoPE prompts and decode ubatches (one position per row)
  if (c.moe()) {
    s.router = ops.alloc(cap * c.n_expert);
    s.ids = ops.alloc_i32(cap * c.n_expert_used);
    s.weights = ops.alloc(cap * c.n_expert_used);
    s.experts = ops.alloc(cap * c.n_expert_used * c.n_embd);
  }
  return s;
}

void embed_tokens(Ops& ops, const ModelConfig& c, const ModelWeights& w, const int32_t* tokens, int64_t n, float* x) {
  const float scale = c.embed_scale ? std::sqrt(float(c.n_embd)) : 1.0f;
  ops.embed(x, w.tok_embd, tokens, n, scale);
}

void embed_inputs(Ops& ops, const ModelConfig& c, const ModelWeights& w, const int32_t* tokens, const float* embd,
                  int64_t n, float* x) {
  const int64_t E = c.n_embd;
  for (int64_t b = 0, e; b < n; b = e) {
    e = b + 1;
    if (tokens[b] >= 0) {
      while (e < n && tokens[e] >= 0) ++e;
      embed_tokens(ops, c, w, tokens + b, e - b, x + b * E);
    } else {
      while (e < n && tokens[e] < 0 && tokens[e] == tokens[e - 1] - 1) ++e;  // rows r, r+1, ...: one copy
      ops.from_host(x + b * E, embd + int64_t(-1 - tokens[b]) * E, (e - b) * E);
    }
  }
}

namespace {

// x += Wo · attention(RoPE(Wq h), RoPE(Wk h), Wv h) with h = RMSNorm(x).
void attention_block(Ops& ops, const ModelConfig& c, const ModelWeights& w, const LayerWeights& l, bool swa,
                     int kv_layer, LayerScratch& s, float* x, const KvPlace& kv, int64_t n_tok, const int32_t* pos) {
  const int64_t pos0 = kv.pos0;
  ops.rms_norm(s.h, x, l.attn_norm, n_tok, c.n_embd, c.norm_eps);
  ops.matmul(s.q, l.wq, s.h, n_tok);
  ops.matmul(s.k, l.wk, s.h, n_tok);
  ops.matmul(s.v, l.wv, s.h, n_tok);
  if (c.qkv_bias) {
    ops.add_bias(s.q, l.bq, n_tok);
    ops.add_bias(s.k, l.bk, n_tok);
    ops.add_bias(s.v, l.bv, n_tok);
  }
  if (c.qk_norm) {  // per-head RMSNorm over head_dim, before RoPE
    ops.rms_norm(s.q, s.q, l.q_norm, n_tok * c.n_head, c.head_dim, c.norm_eps);
    ops.rms_norm(s.k, s.k, l.k_norm, n_tok * c.n_head_kv, c.head_dim, c.norm_eps);
  }
  RopeParams rp;
  rp.mode = c.rope_mode;
  rp.n_rot = c.n_rot;
  for (int i = 0; i < 4; ++i) rp.sections[i] = c.rope_sections[i];
  rp.base = swa ? c.rope_base_swa : c.rope_base;
  rp.freq_scale = swa ? c.rope_freq_scale_swa : c.rope_freq_scale;
  rp.freq_factors = c.has_rope_freqs ? w.rope_freqs.f32() : nullptr;
  rp.yarn = swa ? c.yarn_swa : c.yarn;
  ops.rope(s.q, n_tok, c.n_head, c.head_dim, pos0, rp, pos);
  ops.rope(s.k, n_tok, c.n_head_kv, c.head_dim, pos0, rp, pos);

  AttnParams ap;
  ap.n_head = c.n_head;
  ap.n_head_kv = c.n_head_kv;
  ap.head_dim = c.head_dim;
  ap.kq_scale = c.kq_scale;
  ap.n_swa = swa ? c.n_swa : 0;
  ap.sinks = l.sinks;
  if (!kv.rows) {
    ops.kv_store(kv.seq, kv_layer, s.k, s.v, pos0, n_tok);
    ops.attention(s.att, s.q, kv.seq, kv_layer, pos0, n_tok, ap);
  } else {
    // Decode: each row is a one-token step of its own sequence, the same calls a one-token prefill makes,
    // so a row's attention does not depend on the other rows.
    const int64_t kvd = c.kv_dim(), vd = c.v_dim(), qd = c.q_dim();
    for (int64_t r = 0; r < n_tok; ++r) {
      const KvRow& row = kv.rows[r];
      ops.kv_store(row.seq, kv_layer, s.k + r * kvd, s.v + r * vd, row.pos, 1);
      ops.attention(s.att + r * qd, s.q + r * qd, row.seq, kv_layer, row.pos, 1, ap);
    }
  }

  ops.matmul(s.tmp, l.wo, s.att, n_tok);
  if (c.attn_out_bias) ops.add_bias(s.tmp, l.bo, n_tok);
  if (c.post_norms) ops.rms_norm(s.tmp, s.tmp, l.post_attn_norm, n_tok, c.n_embd, c.norm_eps);
  ops.add(x, x, s.tmp, n_tok * c.n_embd);
}

// x += down(act(gate h) * up h) with h = RMSNorm(x).
void ffn_dense(Ops& ops, const ModelConfig& c, const LayerWeights& l, LayerScratch& s, float* x, int64_t n_tok) {
  ops.rms_norm(s.h, x, l.ffn_norm, n_tok, c.n_embd, c.norm_eps);
  ops.matmul(s.gate, l.gate, s.h, n_tok);
  ops.matmul(s.up, l.up, s.h, n_tok);
  ops.glu(s.gate, s.gate, s.up, n_tok * c.n_ff, c.act);
  ops.matmul(s.tmp, l.down, s.gate, n_tok);
  if (c.post_norms) ops.rms_norm(s.tmp, s.tmp, l.post_ffw_norm, n_tok, c.n_embd, c.norm_eps);
  ops.add(x, x, s.tmp, n_tok * c.n_embd);
}

// x += Σ_j w_j · expert_{e_j}(h) over the k experts the router picks for each token (gpt-oss; llama.cpp's
// build_moe_ffn with softmax-of-the-top-k weights): logits = Wr h + br, e_j = the k largest, w = softmax of
// their logits; expert e: down_e(act(gate_e h + bg_e) * (up_e h + bu_e)) + bd_e. The expert matmuls are
// grouped by expert so each expert's weights stream once per ubatch, not once per token.
void ffn_moe(Ops& ops, const ModelConfig& c, const LayerWeights& l, LayerScratch& s, float* x, int64_t n_tok) {
  const int64_t k = c.n_expert_used;
  ops.rms_norm(s.h, x, l.ffn_norm, n_tok, c.n_embd, c.norm_eps);
  ops.matmul(s.router, l.gate_inp, s.h, n_tok);
  ops.add_bias(s.router, l.gate_inp_b, n_tok);
  ops.router_topk(s.ids, s.weights, s.router, n_tok, c.n_expert, k);
  ops.moe_matmul(s.gate, l.gate_exps, l.gate_exps_b, s.h, false, s.ids, n_tok, k);
  ops.moe_matmul(s.up, l.up_exps, l.up_exps_b, s.h, false, s.ids, n_tok, k);
  ops.glu(s.gate, s.gate, s.up, n_tok * k * c.n_ff_exp, c.act);
  ops.moe_matmul(s.experts, l.down_exps, l.down_exps_b, s.gate, true, s.ids, n_tok, k);
  ops.moe_combine(s.tmp, s.experts, s.weights, n_tok, k, c.n_embd);
  ops.add(x, x, s.tmp, n_tok * c.n_embd);
}

}  // namespace

void decoder_layer(Ops& ops, const ModelConfig& c, const ModelWeights& w, int64_t il, int kv_layer,
                   LayerScratch& s, float* x, const KvPlace& kv, int64_t n_tok, const int32_t* pos) {
  const LayerWeights& l = w.layers[size_t(il)];
  attention_block(ops, c, w, l, c.layer_swa[size_t(il)], kv_layer, s, x, kv, n_tok, pos);
  if (c.moe())
    ffn_moe(ops, c, l, s, x, n_tok);
  else
    ffn_dense(ops, c, l, s, x, n_tok);
}

void output_logits(Ops& ops, const ModelConfig& c, const ModelWeights& w, const float* x, int64_t n_rows,
                   float* normed, float* logits) {
  ops.rms_norm(normed, x, w.output_norm, n_rows, c.n_embd, c.norm_eps);
  ops.matmul(logits, w.output, normed, n_rows);
}

}  // namespace tp

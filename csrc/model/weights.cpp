// weights.cpp — tensor lookup and shape/type validation (GGUF_SPEC §1.4, §5 tensor names).
#include "model/weights.h"

#include "gguf/gguf.h"

namespace tp {

namespace {

struct Loader {
  const GgufFile& f;

  // Returns an empty Tensor when optional and absent; otherwise checks shape [cols, rows].
  Tensor get(const std::string& name, int64_t cols, int64_t rows, bool required = true) const {
    const GgufTensor* t = f.find_tensor(name);
    if (!t) {
      if (required)
        fail(TP_ERR_FORMAT, "%s: missing tensor '%s' (expected shape [%lld, %lld])", f.path().c_str(), name.c_str(),
             (long long)cols, (long long)rows);
      return Tensor{};
    }
    return view(*t, cols, rows);
  }

  // A 3-D expert tensor [cols, rows, n_expert]; every dimension is checked, not only their product.
  Tensor get3(const std::string& name, int64_t cols, int64_t rows, int64_t n_expert) const {
    const GgufTensor* t = f.find_tensor(name);
    if (!t)
      fail(TP_ERR_FORMAT, "%s: missing tensor '%s' (expected shape [%lld, %lld, %lld])", f.path().c_str(),
           name.c_str(), (long long)cols, (long long)rows, (long long)n_expert);
    if (t->ne[0] != cols || t->ne[1] != rows || t->ne[2] != n_expert || t->ne[3] != 1)
      fail(TP_ERR_FORMAT, "%s: tensor '%s' has shape [%lld, %lld, %lld, %lld], expected [%lld, %lld, %lld] "
           "(row length, rows per expert, experts)", f.path().c_str(), name.c_str(), (long long)t->ne[0],
           (long long)t->ne[1], (long long)t->ne[2], (long long)t->ne[3], (long long)cols, (long long)rows,
           (long long)n_expert);
    Tensor v = view(*t, cols, rows * n_expert);
    v.mats = n_expert;
    return v;
  }

  // Per-expert bias [n, n_expert] f32: row e is expert e's bias.
  Tensor get_bias2(const std::string& name, int64_t n, int64_t n_expert) const {
    const GgufTensor* t = f.find_tensor(name);
    if (t && (t->ne[0] != n || t->ne[1] != n_expert || t->ne[2] != 1 || t->ne[3] != 1))
      fail(TP_ERR_FORMAT, "%s: tensor '%s' has shape [%lld, %lld, %lld, %lld], expected [%lld, %lld] (one bias per "
           "expert)", f.path().c_str(), name.c_str(), (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2],
           (long long)t->ne[3], (long long)n, (long long)n_expert);
    Tensor v = get(name, n, n_expert);
    if (v.type != GgmlType::F32)
      fail(TP_ERR_UNSUPPORTED, "%s: tensor '%s' has type %s; biases must be F32", f.path().c_str(), name.c_str(),
           type_traits(int32_t(v.type)).name);
    return v;
  }

  Tensor view(const GgufTensor& t, int64_t cols, int64_t rows) const {
    const int64_t t_rows = t.ne[1] * t.ne[2] * t.ne[3];
    if (t.ne[0] != cols || t_rows != rows)
      fail(TP_ERR_FORMAT, "%s: tensor '%s' has shape [%lld, %lld], expected [%lld, %lld]", f.path().c_str(),
           t.name.c_str(), (long long)t.ne[0], (long long)t_rows, (long long)cols, (long long)rows);
    const TypeTraits tt = type_traits(t.type);
    if (!tt.supported)
      fail(TP_ERR_UNSUPPORTED,
           "%s: unsupported tensor type %s in tensor '%s' (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, "
           "Q8_0, Q4_K, Q5_K, Q6_K, MXFP4)",
           f.path().c_str(), tt.name, t.name.c_str());
    Tensor v;
    v.name = t.name.c_str();
    v.type = GgmlType(t.type);
    v.cols = cols;
    v.rows = rows;
    v.row_bytes = row_bytes(tt, cols);
    v.data = t.data;
    return v;
  }

  // Norm weights and biases are applied element-wise by the backends, which read them as f32.
  Tensor get_f32(const std::string& name, int64_t n, bool required = true) const {
    Tensor v = get(name, n, 1, required);
    if (v.present() && v.type != GgmlType::F32)
      fail(TP_ERR_UNSUPPORTED, "%s: tensor '%s' has type %s; norm weights and biases must be F32", f.path().c_str(),
           name.c_str(), type_traits(int32_t(v.type)).name);
    return v;
  }
};

}  // namespace

ModelWeights load_weights(const GgufFile& f, ModelConfig& c) {
  Loader L{f};
  ModelWeights w;
  for (const GgufTensor& t : f.tensors()) w.n_params += t.n_elements();

  const GgufTensor* emb = f.find_tensor("token_embd.weight");
  if (!emb) fail(TP_ERR_FORMAT, "%s: missing tensor 'token_embd.weight'", f.path().c_str());
  c.n_vocab = emb->ne[1];
  if (c.n_vocab <= 0) fail(TP_ERR_FORMAT, "%s: token_embd.weight has no rows", f.path().c_str());
  w.tok_embd = L.view(*emb, c.n_embd, c.n_vocab);
  w.output_norm = L.get_f32("output_norm.weight", c.n_embd);
  w.output = L.get("output.weight", c.n_embd, c.n_vocab, false);
  c.tied_output = !w.output.present();
  if (c.tied_output) w.output = w.tok_embd;
  if (c.arch == Arch::Llama) {
    w.rope_freqs = L.get_f32("rope_freqs.weight", c.n_rot / 2, false);
    c.has_rope_freqs = w.rope_freqs.present();
  }

  w.layers.resize(size_t(c.n_layer));
  for (int64_t il = 0; il < c.n_layer; ++il) {
    LayerWeights& l = w.layers[size_t(il)];
    const std::string b = "blk." + std::to_string(il) + ".";
    l.attn_norm = L.get_f32(b + "attn_norm.weight", c.n_embd);
    l.wq = L.get(b + "attn_q.weight", c.n_embd, c.q_dim());
    l.wk = L.get(b + "attn_k.weight", c.n_embd, c.kv_dim());
    l.wv = L.get(b + "attn_v.weight", c.n_embd, c.v_dim());
    l.wo = L.get(b + "attn_output.weight", c.q_dim(), c.n_embd);
    if (c.qkv_bias) {
      l.bq = L.get_f32(b + "attn_q.bias", c.q_dim());
      l.bk = L.get_f32(b + "attn_k.bias", c.kv_dim());
      l.bv = L.get_f32(b + "attn_v.bias", c.v_dim());
    }
    if (c.attn_out_bias) l.bo = L.get_f32(b + "attn_output.bias", c.n_embd);
    if (c.attn_sinks) l.sinks = L.get_f32(b + "attn_sinks.weight", c.n_head);
    if (c.qk_norm) {
      l.q_norm = L.get_f32(b + "attn_q_norm.weight", c.head_dim);
      l.k_norm = L.get_f32(b + "attn_k_norm.weight", c.head_dim);
    }
    if (c.post_norms) {
      l.post_attn_norm = L.get_f32(b + "post_attention_norm.weight", c.n_embd);
      l.post_ffw_norm = L.get_f32(b + "post_ffw_norm.weight", c.n_embd);
    }
    if (c.moe()) {
      l.ffn_norm = L.get_f32(b + "post_attention_norm.weight", c.n_embd);
      l.gate_inp = L.get(b + "ffn_gate_inp.weight", c.n_embd, c.n_expert);
      l.gate_inp_b = L.get_f32(b + "ffn_gate_inp.bias", c.n_expert);
      l.gate_exps = L.get3(b + "ffn_gate_exps.weight", c.n_embd, c.n_ff_exp, c.n_expert);
      l.up_exps = L.get3(b + "ffn_up_exps.weight", c.n_embd, c.n_ff_exp, c.n_expert);
      l.down_exps = L.get3(b + "ffn_down_exps.weight", c.n_ff_exp, c.n_embd, c.n_expert);
      l.gate_exps_b = L.get_bias2(b + "ffn_gate_exps.bias", c.n_ff_exp, c.n_expert);
      l.up_exps_b = L.get_bias2(b + "ffn_up_exps.bias", c.n_ff_exp, c.n_expert);
      l.down_exps_b = L.get_bias2(b + "ffn_down_exps.bias", c.n_embd, c.n_expert);
      continue;
    }
    l.ffn_norm = L.get_f32(b + "ffn_norm.weight", c.n_embd);
    l.gate = L.get(b + "ffn_gate.weight", c.n_embd, c.n_ff);
    l.up = L.get(b + "ffn_up.weight", c.n_embd, c.n_ff);
    l.down = L.get(b + "ffn_down.weight", c.n_ff, c.n_embd);
  }
  return w;
}

}  // namespace tp

// config.cpp — GGUF metadata → ModelConfig, per architecture (GGUF_SPEC §1.6, §5).
#include "model/config.h"

#include <algorithm>
#include <cmath>

#include "gguf/gguf.h"

namespace tp {

namespace {

// Integer hyperparameter that llama.cpp also accepts as a per-layer array; we need it uniform.
int64_t get_uniform_int(const GgufFile& f, const std::string& key, int64_t def, bool required) {
  const GgufValue* v = f.find(key);
  if (!v) {
    if (required) fail(TP_ERR_FORMAT, "%s: missing required key '%s'", f.path().c_str(), key.c_str());
    return def;
  }
  if (v->is_array()) {
    if (v->ai.empty()) fail(TP_ERR_FORMAT, "%s: key '%s' is an empty array", f.path().c_str(), key.c_str());
    for (int64_t x : v->ai)
      if (x != v->ai[0])
        fail(TP_ERR_UNSUPPORTED, "%s: key '%s' varies per layer (%lld vs %lld); only uniform values are supported",
             f.path().c_str(), key.c_str(), (long long)v->ai[0], (long long)x);
    return v->ai[0];
  }
  return f.get_int(key);
}

// llama.cpp's YaRN correction range (ggml_rope_yarn_corr_dims): the pair index whose wavelength fits
// n_ctx_orig / beta rotations, floored for beta_fast and ceiled for beta_slow, clamped to [0, n_rot - 1].
YarnParams yarn_params(int64_t n_rot, int64_t n_ctx_orig, float base, float freq_scale) {
  constexpr float kBetaFast = 32.0f, kBetaSlow = 1.0f;  // llama.cpp's defaults; gpt-oss uses them as-is
  auto corr_dim = [&](float n_rotations) {
    return float(n_rot) * std::log(float(n_ctx_orig) / (n_rotations * 2.0f * float(M_PI))) / (2.0f * std::log(base));
  };
  YarnParams y;
  y.ext_factor = 1.0f;
  y.corr_low = std::max(0.0f, std::floor(corr_dim(kBetaFast)));
  y.corr_high = std::min(float(n_rot - 1), std::ceil(corr_dim(kBetaSlow)));
  // llama.cpp sets attn_factor = get_mscale(factor) / (1 + 0.1 ln factor) = 1 and ggml's rope multiplies by
  // 1 + 0.1 ln(1 / freq_scale): the product is the YaRN magnitude correction.
  y.mscale = 1.0f + 0.1f * std::log(1.0f / freq_scale);
  return y;
}

// rope.dimension_sections (llama.cpp reads it with get_key_or_arr: 4 integers, or one repeated): pairs per
// position id. Sections past n_rot/2 pairs would never be reached, and an all-zero split has no sector, so
// both are format errors.
void read_rope_sections(const GgufFile& f, const std::string& key, ModelConfig& c) {
  const GgufValue* v = f.find(key);
  if (!v) fail(TP_ERR_FORMAT, "%s: missing required key '%s' (M-RoPE sections of a qwen2vl model)", f.path().c_str(),
               key.c_str());
  std::vector<int64_t> s;
  if (v->is_array() && v->elem_type != GgufValueType::STRING && v->af.empty()) s = v->ai;
  else if (v->is_int()) s.assign(4, v->i);
  if (s.size() != 4)
    fail(TP_ERR_FORMAT, "%s: key '%s' must be an array of 4 integers (t, h, w, e pairs), got %s of %lld entries",
         f.path().c_str(), key.c_str(), v->is_array() ? "an array" : "a non-integer value",
         (long long)(v->is_array() ? v->array_size() : 1));
  int64_t sum = 0;
  for (int64_t x : s) {
    if (x < 0 || x > c.n_rot / 2)
      fail(TP_ERR_FORMAT, "%s: key '%s' = [%lld, %lld, %lld, %lld] has an entry outside [0, n_rot/2 = %lld]",
           f.path().c_str(), key.c_str(), (long long)s[0], (long long)s[1], (long long)s[2], (long long)s[3],
           (long long)c.n_rot / 2);
    sum += x;
  }
  if (sum <= 0 || sum > c.n_rot / 2)
    fail(TP_ERR_FORMAT, "%s: key '%s' = [%lld, %lld, %lld, %lld] sums to %lld; it must be in [1, n_rot/2 = %lld]",
         f.path().c_str(), key.c_str(), (long long)s[0], (long long)s[1], (long long)s[2], (long long)s[3],
         (long long)sum, (long long)c.n_rot / 2);
  for (int i = 0; i < 4; ++i) c.rope_sections[i] = int32_t(s[size_t(i)]);
}

}  // namespace

ModelConfig load_config(const GgufFile& f) {
  ModelConfig c;
  c.arch_name = f.get_string("general.architecture");
  const std::string& a = c.arch_name;
  if (a == "llama") c.arch = Arch::Llama;
  else if (a == "qwen2") c.arch = Arch::Qwen2;
  else if (a == "qwen3") c.arch = Arch::Qwen3;
  else if (a == "gemma3") c.arch = Arch::Gemma3;
  else if (a == "gpt-oss") c.arch = Arch::GptOss;
  else if (a == "qwen2vl") c.arch = Arch::Qwen2VL;
  else
    fail(TP_ERR_UNSUPPORTED,
         "%s: unsupported architecture '%s' (supported: llama, qwen2, qwen3, gemma3, gpt-oss, qwen2vl)",
         f.path().c_str(), a.c_str());

  const std::string p = a + ".";
  c.n_embd = get_uniform_int(f, p + "embedding_length", 0, true);
  c.n_layer = get_uniform_int(f, p + "block_count", 0, true);
  c.n_ff = get_uniform_int(f, p + "feed_forward_length", 0, true);
  c.n_head = get_uniform_int(f, p + "attention.head_count", 0, true);
  c.n_head_kv = get_uniform_int(f, p + "attention.head_count_kv", c.n_head, false);
  c.n_ctx_train = get_uniform_int(f, p + "context_length", 0, true);
  if (c.n_embd <= 0 || c.n_layer <= 0 || c.n_ff <= 0 || c.n_head <= 0 || c.n_head_kv <= 0 || c.n_ctx_train <= 0)
    fail(TP_ERR_FORMAT,
         "%s: non-positive hyperparameter (embedding_length=%lld block_count=%lld feed_forward_length=%lld "
         "head_count=%lld head_count_kv=%lld context_length=%lld)",
         f.path().c_str(), (long long)c.n_embd, (long long)c.n_layer, (long long)c.n_ff, (long long)c.n_head,
         (long long)c.n_head_kv, (long long)c.n_ctx_train);
  // block_count sizes per-layer tables (here and in load_weights) before any tensor is looked up; every layer
  // has at least one tensor, so a count above the file's tensor count is corrupt (the fuzzer found 3.7e9).
  if (uint64_t(c.n_layer) > f.tensors().size())
    fail(TP_ERR_FORMAT, "%s: block_count %lld but the file holds only %llu tensors (at least one per layer)",
         f.path().c_str(), (long long)c.n_layer, (unsigned long long)f.tensors().size());
  if (c.n_head % c.n_head_kv != 0)
    fail(TP_ERR_FORMAT, "%s: head_count %lld is not a multiple of head_count_kv %lld", f.path().c_str(),
         (long long)c.n_head, (long long)c.n_head_kv);
  c.head_dim = f.get_int_or(p + "attention.key_length", c.n_embd / c.n_head);
  c.head_dim_v = f.get_int_or(p + "attention.value_length", c.head_dim);
  if (c.head_dim_v != c.head_dim)
    fail(TP_ERR_UNSUPPORTED, "%s: key_length %lld != value_length %lld is not supported", f.path().c_str(),
         (long long)c.head_dim, (long long)c.head_dim_v);
  if (c.head_dim <= 0 || c.head_dim % 2 != 0)
    fail(TP_ERR_FORMAT, "%s: head size %lld must be positive and even", f.path().c_str(), (long long)c.head_dim);
  c.n_rot = f.get_int_or(p + "rope.dimension_count", c.head_dim);
  if (c.n_rot <= 0 || c.n_rot > c.head_dim || c.n_rot % 2 != 0)
    fail(TP_ERR_FORMAT, "%s: rope.dimension_count %lld must be even and in [2, head size %lld]", f.path().c_str(),
         (long long)c.n_rot, (long long)c.head_dim);
  c.norm_eps = float(f.get_float_or(p + "attention.layer_norm_rms_epsilon", 1e-5));
  c.rope_base = float(f.get_float_or(p + "rope.freq_base", 10000.0));

  if (!(c.rope_base > 1.0f))
    fail(TP_ERR_FORMAT, "%s: rope.freq_base %g must be > 1", f.path().c_str(), double(c.rope_base));

  const GgufValue* st = f.find(p + "rope.scaling.type");
  bool yarn = false;
  if (st && st->type == GgufValueType::STRING && st->s != "none") {
    if (st->s != "linear" && st->s != "yarn")
      fail(TP_ERR_UNSUPPORTED, "%s: rope scaling '%s' is not supported (only none, linear and yarn)",
           f.path().c_str(), st->s.c_str());
    const double factor = f.get_float_or(p + "rope.scaling.factor", 1.0);
    if (!(factor > 0)) fail(TP_ERR_FORMAT, "%s: rope.scaling.factor %g must be > 0", f.path().c_str(), factor);
    c.rope_freq_scale = float(1.0 / factor);
    yarn = st->s == "yarn";
  }
  c.rope_base_swa = c.rope_base;
  c.rope_freq_scale_swa = c.rope_freq_scale;
  if (yarn) {
    const int64_t n_orig = f.get_int_or(p + "rope.scaling.original_context_length", c.n_ctx_train);
    if (n_orig <= 0)
      fail(TP_ERR_FORMAT, "%s: rope.scaling.original_context_length %lld must be > 0", f.path().c_str(),
           (long long)n_orig);
    c.yarn = yarn_params(c.n_rot, n_orig, c.rope_base, c.rope_freq_scale);
    c.yarn_swa = c.yarn;
  }
  c.kq_scale = 1.0f / std::sqrt(float(c.head_dim));
  c.layer_swa.assign(size_t(c.n_layer), false);

  switch (c.arch) {
    case Arch::GptOss: {
      c.rope_mode = RopeMode::Neox;
      c.qkv_bias = true;
      c.attn_out_bias = true;
      c.attn_sinks = true;
      c.act = Activation::SwigluOai;
      c.n_expert = get_uniform_int(f, p + "expert_count", 0, true);
      c.n_expert_used = get_uniform_int(f, p + "expert_used_count", 0, true);
      c.n_ff_exp = get_uniform_int(f, p + "expert_feed_forward_length", 0, true);
      if (c.n_expert <= 0 || c.n_ff_exp <= 0)
        fail(TP_ERR_FORMAT, "%s: expert_count %lld and expert_feed_forward_length %lld must be > 0",
             f.path().c_str(), (long long)c.n_expert, (long long)c.n_ff_exp);
      if (c.n_expert_used <= 0 || c.n_expert_used > c.n_expert)
        fail(TP_ERR_FORMAT, "%s: expert_used_count %lld must be in [1, expert_count %lld]", f.path().c_str(),
             (long long)c.n_expert_used, (long long)c.n_expert);
      // Sliding window on the even layers, full attention on the odd ones (llama.cpp's swa pattern 2).
      c.n_swa = get_uniform_int(f, p + "attention.sliding_window", 0, true);
      if (c.n_swa < 0) fail(TP_ERR_FORMAT, "%s: sliding_window %lld < 0", f.path().c_str(), (long long)c.n_swa);
      if (c.n_swa > 0)
        for (int64_t il = 0; il < c.n_layer; ++il) c.layer_swa[size_t(il)] = il % 2 == 0;
      break;
    }
    case Arch::Llama:
      c.rope_mode = RopeMode::Norm;
      if (c.n_rot != c.head_dim)
        fail(TP_ERR_UNSUPPORTED, "%s: llama with partial rotary dims (%lld of %lld) is not supported",
             f.path().c_str(), (long long)c.n_rot, (long long)c.head_dim);
      break;
    case Arch::Qwen2:
      c.rope_mode = RopeMode::Neox;
      c.qkv_bias = true;
      break;
    case Arch::Qwen2VL:
      c.rope_mode = RopeMode::Mrope;
      c.qkv_bias = true;
      read_rope_sections(f, p + "rope.dimension_sections", c);
      break;
    case Arch::Qwen3:
      c.rope_mode = RopeMode::Neox;
      c.qk_norm = true;
      break;
    case Arch::Gemma3: {
      c.rope_mode = RopeMode::Neox;
      c.qk_norm = true;
      c.post_norms = true;
      c.embed_scale = true;
      c.act = Activation::GeluTanh;
      // llama.cpp scales queries by 1/sqrt(n_embd/n_head) for the 27B model (62 layers), else 1/sqrt(head_dim).
      c.kq_scale = c.n_layer == 62 ? 1.0f / std::sqrt(float(c.n_embd / c.n_head)) : 1.0f / std::sqrt(float(c.head_dim));
      c.n_swa = f.get_int_or(p + "attention.sliding_window", 0);
      if (c.n_swa < 0) fail(TP_ERR_FORMAT, "%s: sliding_window %lld < 0", f.path().c_str(), (long long)c.n_swa);
      if (c.n_swa > 0) {
        for (int64_t il = 0; il < c.n_layer; ++il) c.layer_swa[size_t(il)] = (il % 6) < 5;  // every 6th is global
        c.rope_base_swa = 10000.0f;
        c.rope_freq_scale_swa = 1.0f;
      }
      break;
    }
  }
  return c;
}

}  // namespace tp

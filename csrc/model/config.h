// config.h — ModelConfig: every model dimension and architecture flag, read once from GGUF metadata.
//
// One place per fact: the decoder layer, the weight loader and the backends read dimensions from here and
// nowhere else. Architectures differ only by the flags below (STYLE rule 2); adding one means teaching
// config.cpp its metadata and flags, not writing a new layer.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "quant/types.h"  // TP_HD: rope_section is shared by the CPU backend and the CUDA kernel

namespace tp {

class GgufFile;

enum class Arch { Llama, Qwen2, Qwen3, Gemma3, GptOss, Qwen2VL };
// Norm: adjacent pairs (llama); Neox: half-offset pairs (k, k + n_rot/2) (HF rotate_half). The multi-section
// modes take up to four position ids per token (t, h, w, e; ggml's rope_multi): Mrope (Qwen2-VL text,
// GGML_ROPE_TYPE_MROPE) rotates Neox pairs; Vision (the Qwen2.5-VL vision encoder, GGML_ROPE_TYPE_VISION) is
// called with n_rot = head_dim/2 and rotates pairs (k, k + n_rot) for k in [0, n_rot). rope_section says
// which id and which frequency a pair takes.
enum class RopeMode { Norm, Neox, Mrope, Vision };
// SwigluOai (gpt-oss): g = min(g, 7), u = clamp(u, -7, 7), out = g·sigmoid(1.702·g)·(u + 1).
enum class Activation { Silu, GeluTanh, SwigluOai };
constexpr float kSwigluOaiAlpha = 1.702f, kSwigluOaiLimit = 7.0f;

// YaRN RoPE (llama.cpp's rope_yarn): pair k of n_rot/2 turns by θ = θ_i (1 - r_k) + θ_e r_k, where θ_e =
// pos·base^(-2k/n_rot) (extrapolated), θ_i = freq_scale·θ_e (interpolated) and r_k = ext_factor·(1 -
// clamp((k - corr_low) / max(0.001, corr_high - corr_low), 0, 1)); cos θ and sin θ are then scaled by
// mscale. ext_factor = 0 is plain RoPE (θ = θ_i, mscale 1).
struct YarnParams {
  float ext_factor = 0.0f;
  float mscale = 1.0f;
  float corr_low = 0.0f, corr_high = 0.0f;  // pair indices where the ramp starts / ends
};

// Multi-section RoPE: pair k lies in sector c = k mod (s0+s1+s2+s3) (sum > 0). Sectors [0, s0) turn by
// position id 0 (t), [s0, s0+s1) by id 1 (h), [s0+s1, s0+s1+s2) by id 2 (w), the rest by id 3 (e). The
// angle is pos_id · base^(-2j/n_rot): Mrope keeps j = k; Vision restarts j at each section (j = c minus the
// section's start: ggml's "independent sections"). Returns the id and sets *j.
TP_HD int rope_section(RopeMode mode, const int32_t* sections, int64_t k, int64_t* j) {
  const int64_t s0 = sections[0], s1 = s0 + sections[1], s2 = s1 + sections[2];
  const int64_t c = k % (s2 + sections[3]);
  const int id = c < s0 ? 0 : c < s1 ? 1 : c < s2 ? 2 : 3;
  const int64_t start = id == 0 ? 0 : id == 1 ? s0 : id == 2 ? s1 : s2;
  *j = mode == RopeMode::Vision ? c - start : k;
  return id;
}

struct ModelConfig {
  std::string arch_name;  // general.architecture
  Arch arch = Arch::Llama;

  int64_t n_vocab = 0;      // rows of token_embd
  int64_t n_embd = 0;       // hidden size
  int64_t n_layer = 0;
  int64_t n_head = 0;
  int64_t n_head_kv = 0;
  int64_t head_dim = 0;     // key/query head size (key_length)
  int64_t head_dim_v = 0;   // value head size (value_length)
  int64_t n_ff = 0;         // feed-forward hidden size
  int64_t n_ctx_train = 0;  // context_length
  int64_t n_rot = 0;        // rope.dimension_count (rotated dims per head)
  float norm_eps = 1e-5f;

  // RoPE. Global layers use rope_base/rope_freq_scale; sliding-window layers use the *_swa values.
  RopeMode rope_mode = RopeMode::Norm;
  float rope_base = 10000.0f;
  float rope_freq_scale = 1.0f;  // 1 / rope.scaling.factor for linear scaling
  float rope_base_swa = 10000.0f;
  float rope_freq_scale_swa = 1.0f;
  bool has_rope_freqs = false;  // llama 3.1+: per-dimension divisors in rope_freqs.weight
  YarnParams yarn, yarn_swa;     // rope.scaling.type = yarn (gpt-oss), per base; else ext_factor 0
  // qwen2vl: rope.dimension_sections, pairs per position id (t, h, w, e), summing to at most n_rot/2; rope_mode
  // is then Mrope and each token carries four position ids. All 0 for single-position models.
  int32_t rope_sections[4] = {0, 0, 0, 0};

  // Layer flags.
  bool qkv_bias = false;       // qwen2: bias after q/k/v projections
  bool qk_norm = false;        // qwen3, gemma3: per-head RMSNorm of q and k before RoPE
  bool post_norms = false;     // gemma3: RMSNorm of the attention and FFN outputs before the residual add
  bool embed_scale = false;    // gemma3: embeddings times sqrt(n_embd)
  bool tied_output = false;    // no output.weight: lm_head is token_embd
  bool attn_out_bias = false;  // gpt-oss: bias after attn_output
  bool attn_sinks = false;     // gpt-oss: per-head sink logit in the softmax denominator
  Activation act = Activation::Silu;
  float kq_scale = 1.0f;       // softmax(q·k * kq_scale)

  // Mixture of experts (gpt-oss): every layer's FFN is n_expert experts of n_ff_exp, n_expert_used chosen
  // per token by a router; 0 experts = the dense FFN of n_ff.
  int64_t n_expert = 0;
  int64_t n_expert_used = 0;
  int64_t n_ff_exp = 0;

  // Sliding-window attention (gemma3, gpt-oss): layer il is local when layer_swa[il]; a local query at position p
  // sees keys p - n_swa + 1 .. p.
  int64_t n_swa = 0;
  std::vector<bool> layer_swa;

  int64_t q_dim() const { return n_head * head_dim; }
  int64_t kv_dim() const { return n_head_kv * head_dim; }
  int64_t v_dim() const { return n_head_kv * head_dim_v; }
  bool moe() const { return n_expert > 0; }
  bool mrope() const { return rope_mode == RopeMode::Mrope; }
  // Widest FFN hidden activation of one token: n_ff, or the n_expert_used experts' n_ff_exp side by side.
  int64_t ff_width() const { return moe() && n_expert_used * n_ff_exp > n_ff ? n_expert_used * n_ff_exp : n_ff; }
};

// Reads and checks the configuration. Throws tp::Error (TP_ERR_UNSUPPORTED for an unknown architecture,
// TP_ERR_FORMAT for missing or inconsistent keys), naming the key and the values found.
ModelConfig load_config(const GgufFile& f);

}  // namespace tp

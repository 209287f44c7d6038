"""The gpt-oss (mixture-of-experts) part of the synthetic-model writer: inventory, keys, types, weights.

Owns the facts `writer.write_model` needs for arch "gpt-oss" and nothing else; the file writing, the
quantizers and the dense rules (use_more_bits, shape_fallback) stay in writer.py and are reused here.
The spec is what llama.cpp loads (src/models/openai-moe.cpp) and what its converter writes
(conversion/gpt_oss.py): biases on q/k/v/o and on every expert matrix, per-head attention sinks,
a router with bias, experts stored as 3-D tensors ne = [row, rows, n_expert], YaRN rope keys.

Expert weights (why they are not independent): with unrelated random experts the forward pass is chaotic
(a routing flip caused by rounding swaps a token's FFN output for an unrelated one, and two correct engines
then agree only at cosine 0.94-0.999), while trained experts are related. Each expert matrix is therefore
W_e = c·(S + 0.3·R_e) with one shared S and a per-expert R_e, all N(0, 1), c = gain/sqrt(fan_in·1.09)
(1.09 = 1 + 0.3², so an expert's output has rms = gain for an input of rms 1). gate/up get gain 3, so
about 1 % of gate values exceed the limit 7 and 2 % of up values leave [-7, 7]: the clamps of swiglu_oai
are exercised. down gets gain 1/6 to bring the activation (rms ≈ 6 for those inputs) back to rms ≈ 1.
(Measured on fixture model A, layer 0, expert 0, 2000 N(0, 1) inputs: gate > 7 for 1.0 %, |up| > 7 for
1.9 %, activation rms 6.4, expert output rms 1.05.)
Sinks are N(2, 1): exp(2) ≈ 7 against the ≈ 128 keys of a sliding window is a few percent of the
softmax mass, enough for a wrong sink to show in the logits.
"""

from __future__ import annotations

import math

import numpy as np

from .writer import SyntheticConfig, shape_fallback, use_more_bits

EXPERT_MATRICES = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
_EXPERT_GAIN = {"ffn_gate_exps.weight": 3.0, "ffn_up_exps.weight": 3.0, "ffn_down_exps.weight": 1.0 / 6.0}
_EXPERT_SPREAD = 0.3  # per-expert part relative to the shared one

# llama_ftype of LLAMA_FTYPE_MOSTLY_MXFP4_MOE (include/llama.h)
FILE_TYPE_MXFP4_MOE = 38

# gpt-oss defaults (openai/gpt-oss-20b config.json): YaRN factor 32 over 4096 original positions.
DEFAULTS = {
    "rms_eps": 1e-5,
    "rope_freq_base": 150000.0,
    "rope_scaling_factor": 32.0,
    "rope_orig_ctx": 4096,
    "sliding_window": 128,
    "head_dim": 64,
}


def tensor_shapes(cfg: SyntheticConfig) -> dict[str, tuple[int, ...]]:
    """GGUF shape (ne, innermost first) of every gpt-oss tensor, in the converter's file order."""
    d, hd, ne, ff = cfg.n_embd, cfg.head_dim, cfg.n_expert, cfg.n_ff_exp
    q_dim, kv_dim = cfg.n_head * hd, cfg.n_head_kv * hd
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (d, cfg.n_vocab)}
    for il in range(cfg.n_layer):
        b = f"blk.{il}."
        shapes[b + "attn_norm.weight"] = (d,)
        shapes[b + "attn_q.weight"] = (d, q_dim)
        shapes[b + "attn_q.bias"] = (q_dim,)
        shapes[b + "attn_k.weight"] = (d, kv_dim)
        shapes[b + "attn_k.bias"] = (kv_dim,)
        shapes[b + "attn_v.weight"] = (d, kv_dim)
        shapes[b + "attn_v.bias"] = (kv_dim,)
        shapes[b + "attn_output.weight"] = (q_dim, d)
        shapes[b + "attn_output.bias"] = (d,)
        shapes[b + "attn_sinks.weight"] = (cfg.n_head,)
        shapes[b + "post_attention_norm.weight"] = (d,)  # the FFN's input norm in gpt-oss
        shapes[b + "ffn_gate_inp.weight"] = (d, ne)
        shapes[b + "ffn_gate_inp.bias"] = (ne,)
        shapes[b + "ffn_gate_exps.weight"] = (d, ff, ne)
        shapes[b + "ffn_gate_exps.bias"] = (ff, ne)
        shapes[b + "ffn_up_exps.weight"] = (d, ff, ne)
        shapes[b + "ffn_up_exps.bias"] = (ff, ne)
        shapes[b + "ffn_down_exps.weight"] = (ff, d, ne)
        shapes[b + "ffn_down_exps.bias"] = (d, ne)
    shapes["output_norm.weight"] = (d,)
    shapes["output.weight"] = (d, cfg.n_vocab)
    return shapes


def tensor_type(cfg: SyntheticConfig, name: str, ne: tuple[int, ...], quant: str, expert_quant: str | None) -> str:
    """ggml type name of one gpt-oss tensor.

    quant "mxfp4": llama.cpp's MXFP4_MOE mix (what the converter writes): experts MXFP4, every other matrix
    Q8_0. quant "q4_k_m": llama.cpp's Q4_K_M rules (llama-quant.cpp) as they apply to gpt-oss: Q4_K by
    default, output Q6_K, attn_v and ffn_down_exps Q6_K on the use_more_bits layers, and for exactly
    8 experts (llama.cpp's Mixtral rule) attn_k/attn_v Q8_0 and attn_output Q5_K; the shape fallback
    then applies per tensor on ne0 (n_embd for gate/up, n_ff_exp for down). Any other quant is one type
    for every matrix. expert_quant, when given, overrides the three expert matrices only.
    Router, norms, biases and sinks are always F32 (llama.cpp never quantizes ffn_gate_inp).
    """
    if len(ne) < 2 or not name.endswith("weight") or name.endswith("ffn_gate_inp.weight"):
        return "F32"
    q = quant.upper()
    is_expert = name.endswith(EXPERT_MATRICES)
    if is_expert and expert_quant:
        return shape_fallback(expert_quant.upper(), ne[0])
    if q == "MXFP4":
        return "MXFP4" if is_expert else "Q8_0"
    if q != "Q4_K_M":
        return shape_fallback(q, ne[0])
    t = "Q4_K"
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight":
        t = "Q6_K"
    elif name.endswith(("attn_v.weight", "ffn_down_exps.weight")):
        t = "Q6_K" if use_more_bits(layer, cfg.n_layer) else "Q4_K"
    if cfg.n_expert == 8:
        if name.endswith(("attn_k.weight", "attn_v.weight")):
            t = "Q8_0"
        elif name.endswith("attn_output.weight"):
            t = "Q5_K"
    return shape_fallback(t, ne[0])


def owns(name: str) -> bool:
    """Tensors whose weights draw_tensor below decides (the rest follow writer.draw_tensor's rules)."""
    return name.endswith(EXPERT_MATRICES) or name.endswith("attn_sinks.weight")


def draw_tensor(name: str, ne: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """float32 weights of an expert matrix [n_expert, out, in] or of a layer's sinks [n_head]."""
    if name.endswith("attn_sinks.weight"):
        return (2.0 + rng.standard_normal(ne[0], dtype=np.float32)).astype(np.float32)
    fan_in, n_out, n_expert = ne
    shared = rng.standard_normal((1, n_out, fan_in), dtype=np.float32)
    own = rng.standard_normal((n_expert, n_out, fan_in), dtype=np.float32)
    c = _EXPERT_GAIN[name.split(".", 2)[2]] / math.sqrt(fan_in * (1.0 + _EXPERT_SPREAD**2))
    return (c * (shared + _EXPERT_SPREAD * own)).astype(np.float32)


def add_metadata(wr, cfg: SyntheticConfig) -> None:
    """The gpt-oss keys beyond the dense ones writer.write_model always writes (gguf.GGUFWriter `wr`)."""
    import gguf

    wr.add_expert_count(cfg.n_expert)
    wr.add_expert_used_count(cfg.n_expert_used)
    wr.add_expert_feed_forward_length(cfg.n_ff_exp)
    wr.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    wr.add_rope_scaling_factor(cfg.rope_scaling_factor)
    wr.add_rope_scaling_orig_ctx_len(cfg.rope_orig_ctx)

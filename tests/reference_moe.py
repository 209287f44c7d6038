"""Float64 numpy reference forward of gpt-oss (mixture of experts) — the oracle of the MoE prefill tests.

Like reference.py (whose rms_norm, softmax, KVCache and loading helpers it reuses) it owns nothing the engine
uses: the GGUF is read with the `gguf` package and every tensor dequantized with `gguf.quants.dequantize`,
then the forward pass runs in float64 top to bottom as llama.cpp defines gpt-oss (src/models/openai-moe.cpp):

    x = embd[tokens]
    per layer il:  h = rmsnorm(x)·attn_norm;  q, k, v = linear + bias;  RoPE NEOX with YaRN on q, k
                   attention (scale 1/sqrt(D), GQA, causal, sliding window on even layers, per-head sink
                   logit in the softmax denominator);  x += Wo·out + bo
                   h = rmsnorm(x)·post_attention_norm;  router logits = Wr·h + br;  top-k experts,
                   softmax over the k logits;  x += Σ_j w_j · (Wd_e·swiglu_oai(Wg_e·h + bg_e, Wu_e·h + bu_e)
                   + bd_e)
    logits = Wout·(rmsnorm(x)·output_norm)

Shapes in comments are numpy shapes: T = tokens in this call, S = tokens in the KV cache, H = query heads,
Hkv = KV heads, D = head_dim, E = experts, F = n_ff_exp. A weight with GGUF ne = [in, out] is W [out, in];
an expert tensor with ne = [in, out, E] is W [E, out, in].
Numeric shortcuts: none (YaRN's correction dims are computed in float64; llama.cpp uses float32, which
moves floor/ceil only when a dimension lands within float32 rounding of an integer).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import gguf
import numpy as np

from reference import KVCache, _meta, dequantize_tensor, rms_norm, softmax

SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # llama-graph.cpp, LLM_FFN_SWIGLU_OAI_MOE
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0  # llama.cpp's defaults; gpt-oss files carry no yarn_* keys


@dataclass(frozen=True)
class GptOssConfig:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int  # also the rotated dims (n_rot)
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    eps: float
    rope_base: float
    yarn_factor: float  # rope.scaling.factor (1/freq_scale)
    yarn_orig_ctx: int  # rope.scaling.original_context_length
    n_swa: int  # sliding window of the even layers (keys with q_pos - k_pos >= n_swa are hidden)

    def is_local(self, il: int) -> bool:
        return il % 2 == 0


# ----------------------------------------------------------------------------------------------------------
# primitives


def yarn_cos_sin(pos: np.ndarray, n_dims: int, base: float, factor: float, n_ctx_orig: int):
    """cos, sin [T, n_dims/2] of YaRN as ggml's rope_yarn computes them (ext_factor 1), mscale included.

    Pair k rotates by θ_k = θ_interp·(1 − ramp_k) + θ_extrap·ramp_k, θ_extrap = pos·base^(−2k/n_dims),
    θ_interp = θ_extrap/factor; ramp is 1 for the fast pairs below the β_fast correction dim (unscaled), 0
    above the β_slow one (fully interpolated), linear between. cos and sin are scaled by 1 + 0.1·ln(factor).
    """

    def corr_dim(n_rot: float) -> float:  # the pair index whose wavelength spans n_rot turns of n_ctx_orig
        return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(0.0, math.floor(corr_dim(YARN_BETA_FAST)))
    high = min(n_dims - 1.0, math.ceil(corr_dim(YARN_BETA_SLOW)))
    k = np.arange(n_dims // 2, dtype=np.float64)
    ramp = 1.0 - np.clip((k - low) / max(0.001, high - low), 0.0, 1.0)  # [n_dims/2]
    theta_extrap = pos.astype(np.float64)[:, None] * base ** (-2.0 * k / n_dims)[None, :]  # [T, n_dims/2]
    theta = theta_extrap / factor * (1.0 - ramp) + theta_extrap * ramp
    mscale = 1.0 + 0.1 * math.log(factor)
    return np.cos(theta) * mscale, np.sin(theta) * mscale


def rope_neox(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, heads, D] with pairs (x[i], x[i + D/2]) rotated by cos, sin [T, D/2]."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, D/2]
    return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)


def attention_with_sinks(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q_pos: np.ndarray,
    k_pos: np.ndarray,
    sinks: np.ndarray,
    kq_scale: float,
    n_swa: int,
) -> np.ndarray:
    """Causal GQA attention whose softmax has one extra logit per head. q [T, H, D], k/v [S, Hkv, D],
    sinks [H] -> [T, H·D].

    out = Σ_j exp(l_j − M) v_j / (Σ_j exp(l_j − M) + exp(s_h − M)), M = max(max_j l_j, s_h): the sink takes
    probability mass and gives no value. The sink is not multiplied by kq_scale. A key is visible iff
    k_pos ≤ q_pos and, with a sliding window, q_pos − k_pos < n_swa.
    """
    n_tok, n_head, d = q.shape
    group = n_head // k.shape[1]
    k = np.repeat(k, group, axis=1)  # [S, H, D]
    v = np.repeat(v, group, axis=1)  # [S, H, D]
    scores = np.einsum("thd,shd->hts", q, k) * kq_scale  # [H, T, S]
    dist = q_pos[:, None] - k_pos[None, :]  # [T, S]
    visible = dist >= 0
    if n_swa > 0:
        visible &= dist < n_swa
    scores = np.where(visible[None], scores, -np.inf)
    s = sinks[:, None, None]  # [H, 1, 1]
    m = np.maximum(scores.max(axis=-1, keepdims=True), s)  # [H, T, 1]
    e = np.exp(scores - m)  # [H, T, S]
    p = e / (e.sum(axis=-1, keepdims=True) + np.exp(s - m))
    return np.einsum("hts,shd->thd", p, v).reshape(n_tok, n_head * d)  # [T, H·D]


def swiglu_oai(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """gpt-oss's clamped GLU: g ≤ 7, u ∈ [−7, 7], g·sigmoid(1.702·g)·(u + 1)."""
    g = np.minimum(g, SWIGLU_LIMIT)
    u = np.clip(u, -SWIGLU_LIMIT, SWIGLU_LIMIT)
    return g / (1.0 + np.exp(-SWIGLU_ALPHA * g)) * (u + 1.0)


def route(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Router logits [T, E] -> (expert ids [T, k] by descending logit, ties to the lower id; their weights
    [T, k] = softmax over the k chosen logits only)."""
    ids = np.argsort(-logits, axis=-1, kind="stable")[:, :k]  # [T, k]
    return ids, softmax(np.take_along_axis(logits, ids, axis=-1))


# ----------------------------------------------------------------------------------------------------------
# model


class GptOssModel:
    def __init__(self, cfg: GptOssConfig, weights: dict[str, np.ndarray]):
        self.cfg = cfg
        self.w = weights  # name -> float64 array, numpy shape = reversed GGUF ne

    def _attention(self, il: int, x: np.ndarray, pos: np.ndarray, cache: KVCache) -> np.ndarray:
        """Attention block output Wo·out + bo [T, n_embd]; appends this chunk's K/V to the cache."""
        c, W = self.cfg, lambda n: self.w[f"blk.{il}.{n}"]
        T, D = x.shape[0], c.head_dim
        h = rms_norm(x, W("attn_norm.weight"), c.eps)  # [T, n_embd]
        q = (h @ W("attn_q.weight").T + W("attn_q.bias")).reshape(T, c.n_head, D)  # [T, H, D]
        k = (h @ W("attn_k.weight").T + W("attn_k.bias")).reshape(T, c.n_head_kv, D)  # [T, Hkv, D]
        v = (h @ W("attn_v.weight").T + W("attn_v.bias")).reshape(T, c.n_head_kv, D)  # [T, Hkv, D]
        cos, sin = yarn_cos_sin(pos, D, c.rope_base, c.yarn_factor, c.yarn_orig_ctx)
        q, k = rope_neox(q, cos, sin), rope_neox(k, cos, sin)

        cache.k[il] = np.concatenate([cache.k[il], k])  # [S, Hkv, D]
        cache.v[il] = np.concatenate([cache.v[il], v])  # [S, Hkv, D]
        k_pos = np.concatenate([cache.pos, pos])  # [S]
        n_swa = c.n_swa if c.is_local(il) else 0
        a = attention_with_sinks(
            q, cache.k[il], cache.v[il], pos, k_pos, W("attn_sinks.weight"), 1.0 / math.sqrt(D), n_swa
        )  # [T, H·D]
        return a @ W("attn_output.weight").T + W("attn_output.bias")  # [T, n_embd]

    def _moe(self, il: int, x: np.ndarray, routing: list | None = None) -> np.ndarray:
        """Mixture-of-experts block output [T, n_embd] of the residual x [T, n_embd]."""
        c, W = self.cfg, lambda n: self.w[f"blk.{il}.{n}"]
        h = rms_norm(x, W("post_attention_norm.weight"), c.eps)  # [T, n_embd]
        logits = h @ W("ffn_gate_inp.weight").T + W("ffn_gate_inp.bias")  # [T, E]
        ids, weights = route(logits, c.n_expert_used)  # [T, k], [T, k]
        if routing is not None:
            routing.append((logits, ids))
        out = np.zeros_like(x)  # [T, n_embd]
        for e in np.unique(ids):
            tok, slot = np.nonzero(ids == e)  # the tokens that chose expert e, and in which of their k slots
            he = h[tok]  # [n_e, n_embd]
            g = he @ W("ffn_gate_exps.weight")[e].T + W("ffn_gate_exps.bias")[e]  # [n_e, F]
            u = he @ W("ffn_up_exps.weight")[e].T + W("ffn_up_exps.bias")[e]  # [n_e, F]
            y = swiglu_oai(g, u) @ W("ffn_down_exps.weight")[e].T + W("ffn_down_exps.bias")[e]  # [n_e, n_embd]
            out[tok] += weights[tok, slot][:, None] * y
        return out

    def new_cache(self) -> KVCache:
        c = self.cfg
        empty = np.zeros((0, c.n_head_kv, c.head_dim))
        return KVCache(k=[empty] * c.n_layer, v=[empty] * c.n_layer)

    def forward_chunked(self, tokens, chunk: int, all_logits: bool = False, routing: list | None = None) -> np.ndarray:
        """Process the prompt `chunk` tokens at a time against an explicit KV cache (as the engine does).

        Returns logits of the last token [n_vocab] (or of every token [T, n_vocab] with all_logits).
        `routing`, when given a list, receives (router logits [T_chunk, E], expert ids [T_chunk, k]) per
        (chunk, layer), chunk-major — for tests that need to know how close a token was to a routing flip.
        """
        c = self.cfg
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1 or len(tokens) == 0 or chunk < 1:
            raise ValueError("forward: need a non-empty 1-D token list and chunk >= 1")
        if tokens.min() < 0 or tokens.max() >= c.n_vocab:
            raise ValueError(f"forward: token id out of range [0, {c.n_vocab})")
        cache, outs = self.new_cache(), []
        for start in range(0, len(tokens), chunk):
            pos = np.arange(start, min(start + chunk, len(tokens)))  # [T]
            x = self.w["token_embd.weight"][tokens[pos]]  # [T, n_embd]
            for il in range(c.n_layer):
                x = x + self._attention(il, x, pos, cache)
                x = x + self._moe(il, x, routing)
            cache.pos = np.concatenate([cache.pos, pos])
            outs.append(x if all_logits else x[-1:])
        h = rms_norm(np.concatenate(outs) if all_logits else outs[-1], self.w["output_norm.weight"], c.eps)
        logits = h @ self.w["output.weight"].T  # [T or 1, n_vocab]
        return logits if all_logits else logits[-1]

    def forward(self, tokens, all_logits: bool = False, routing: list | None = None) -> np.ndarray:
        """The whole prompt in one chunk: logits of the last token [n_vocab] (or [T, n_vocab])."""
        return self.forward_chunked(tokens, chunk=len(tokens), all_logits=all_logits, routing=routing)


# ----------------------------------------------------------------------------------------------------------
# loading


def load_gptoss_config(reader: gguf.GGUFReader) -> GptOssConfig:
    arch = _meta(reader, "general.architecture")
    if arch != "gpt-oss":
        raise ValueError(f"reference_moe: expected architecture 'gpt-oss', got {arch!r}")
    a = lambda k, d=None: _meta(reader, f"gpt-oss.{k}", d)
    n_embd, n_head = int(a("embedding_length")), int(a("attention.head_count"))
    head_dim = int(a("attention.key_length", n_embd // n_head))
    if int(a("attention.value_length", head_dim)) != head_dim:
        raise ValueError("reference_moe: key_length != value_length")
    if int(a("rope.dimension_count", head_dim)) != head_dim:
        raise NotImplementedError("reference_moe: partial rotary dims")
    if a("rope.scaling.type") != "yarn":
        raise NotImplementedError(f"reference_moe: rope scaling {a('rope.scaling.type')!r}, expected 'yarn'")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return GptOssConfig(
        n_vocab=int(emb.shape[1]),
        n_embd=n_embd,
        n_layer=int(a("block_count")),
        n_head=n_head,
        n_head_kv=int(a("attention.head_count_kv", n_head)),
        head_dim=head_dim,
        n_expert=int(a("expert_count")),
        n_expert_used=int(a("expert_used_count")),
        n_ff_exp=int(a("expert_feed_forward_length")),
        eps=float(a("attention.layer_norm_rms_epsilon")),
        rope_base=float(a("rope.freq_base")),
        yarn_factor=float(a("rope.scaling.factor")),
        yarn_orig_ctx=int(a("rope.scaling.original_context_length")),
        n_swa=int(a("attention.sliding_window")),
    )


def load_gptoss_model(path: str | os.PathLike) -> GptOssModel:
    reader = gguf.GGUFReader(os.fspath(path))
    cfg = load_gptoss_config(reader)
    weights = {t.name: dequantize_tensor(t) for t in reader.tensors}
    return GptOssModel(cfg, weights)

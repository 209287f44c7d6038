"""Float64 numpy reference forward of llama, qwen2, qwen3, gemma3 and qwen2vl — the oracle of every prefill test.

Owns nothing the engine uses: it reads a GGUF with the `gguf` package and dequantizes every tensor with
`gguf.quants.dequantize` (code we did not write), then runs the forward pass of GGUF_SPEC §5 in float64,
top to bottom like the paper. Shapes in comments are numpy shapes: T = tokens in this call, S = tokens in the
KV cache, H = query heads, Hkv = KV heads, D = head_dim. A weight with GGUF ne = [in, out] is the numpy
array W [out, in], so a projection of activations x [T, in] is x @ W.T.

Numeric shortcuts: none, except the one llama.cpp takes on purpose: Gemma's embedding scale is applied in
float32 (the product is then used in float64). Softmax subtracts the row max (exact in real arithmetic).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import gguf
import numpy as np

ROPE_NORM, ROPE_NEOX, ROPE_MROPE = "norm", "neox", "mrope"
_ROPE_MODE = {"llama": ROPE_NORM, "qwen2": ROPE_NEOX, "qwen3": ROPE_NEOX, "gemma3": ROPE_NEOX, "qwen2vl": ROPE_MROPE}
_GEMMA3_SWA_PATTERN = 6  # layer il is local (sliding window) iff il % 6 < 5
_GEMMA3_LOCAL_ROPE_BASE = 10000.0


@dataclass(frozen=True)
class RefConfig:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_rot: int  # rotated dims per head (≤ head_dim); the rest pass through
    eps: float
    rope_mode: str  # ROPE_NORM (adjacent pairs) | ROPE_NEOX (half-offset pairs)
    rope_base: float  # gemma3: global layers
    rope_freq_scale: float  # 1 / linear scaling factor (gemma3: global layers only)
    rope_base_swa: float  # gemma3 local layers
    n_swa: int  # gemma3 sliding window (keys with q_pos - k_pos >= n_swa are hidden); 0 = none
    rope_sections: tuple = ()  # qwen2vl: rotary pairs per position id (t, h, w, e)

    def is_local(self, il: int) -> bool:
        return self.n_swa > 0 and il % _GEMMA3_SWA_PATTERN < _GEMMA3_SWA_PATTERN - 1


# ----------------------------------------------------------------------------------------------------------
# primitives (GGUF_SPEC §5.1)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x [..., n] -> x / sqrt(mean(x²) + eps) · w   (over the last axis)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(
    x: np.ndarray,
    pos: np.ndarray,
    n_rot: int,
    base: float,
    freq_scale: float,
    mode: str,
    factors: np.ndarray | None,
) -> np.ndarray:
    """x [T, heads, D], pos [T] -> x, pairs rotated by θ_i = freq_scale·pos·base^(−2i/n_rot) / factors_i."""
    i = np.arange(n_rot // 2, dtype=np.float64)
    inv_freq = base ** (-2.0 * i / n_rot)  # [n_rot/2]
    if factors is not None:
        inv_freq = inv_freq / factors
    theta = freq_scale * pos.astype(np.float64)[:, None] * inv_freq[None, :]  # [T, n_rot/2]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]  # [T, 1, n_rot/2]
    if mode == ROPE_NORM:  # pairs (x[2i], x[2i+1])
        ia, ib = np.arange(0, n_rot, 2), np.arange(1, n_rot, 2)
    else:  # NEOX: pairs (x[i], x[i + n_rot/2])
        ia, ib = np.arange(0, n_rot // 2), np.arange(n_rot // 2, n_rot)
    a, b = x[..., ia], x[..., ib]
    out = x.copy()
    out[..., ia] = a * cos - b * sin
    out[..., ib] = a * sin + b * cos
    return out


def rope_multi(x: np.ndarray, pos4: np.ndarray, n_rot: int, base: float, sections, vision: bool) -> np.ndarray:
    """Multi-section RoPE (Qwen2-VL's M-RoPE, and the vision encoder's 2-D rope). x [T, heads, D], pos4 [4, T]
    position ids (t, h, w, e).

    The rotary pairs are dealt out to the four ids in blocks: pair i belongs to block i mod Σsections, and
    blocks [0, s_t) follow id t, the next s_h id h, then s_w id w, then s_e id e. M-RoPE (vision False) pairs
    (x[i], x[i + n_rot/2]) for i < n_rot/2 with θ = pos·base^(−2i/n_rot), as plain NEOX rope; the vision
    rope pairs (x[i], x[i + n_rot]) for i < n_rot (n_rot = D/2) and numbers the frequencies of each block
    from 0, θ = pos·base^(−2(i − block start)/n_rot).
    """
    n_pairs = n_rot if vision else n_rot // 2
    bounds = np.cumsum([0, *sections])  # block starts of t, h, w, e and the period
    out = x.copy()
    for i in range(n_pairs):
        blk = i % int(bounds[4])
        which = int(np.searchsorted(bounds[1:], blk, side="right"))  # 0 t, 1 h, 2 w, 3 e
        j = blk - bounds[which] if vision else i
        theta = pos4[which].astype(np.float64) * base ** (-2.0 * j / n_rot)  # [T]
        c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
        a, b = x[:, :, i], x[:, :, i + n_pairs]
        out[:, :, i] = a * c - b * s
        out[:, :, i + n_pairs] = a * s + b * c
    return out


def softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q_pos: np.ndarray,
    k_pos: np.ndarray,
    kq_scale: float,
    n_swa: int,
) -> np.ndarray:
    """Causal GQA attention. q [T, H, D], k/v [S, Hkv, D], positions [T] / [S] -> [T, H·D].

    Query head h reads KV head h // (H/Hkv) (contiguous groups, as HF repeat_kv). A key is visible iff
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
    p = softmax(scores)  # [H, T, S]
    return np.einsum("hts,shd->thd", p, v).reshape(n_tok, n_head * d)  # [T, H·D]


# ----------------------------------------------------------------------------------------------------------
# model


@dataclass
class KVCache:
    """Post-RoPE keys and values of every layer, appended chunk by chunk (as the engine's ubatches)."""

    k: list[np.ndarray] = field(default_factory=list)  # per layer [S, Hkv, D]
    v: list[np.ndarray] = field(default_factory=list)  # per layer [S, Hkv, D]
    pos: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # [S]


class RefModel:
    def __init__(self, cfg: RefConfig, weights: dict[str, np.ndarray]):
        self.cfg = cfg
        self.w = weights  # name -> float64 array, numpy shape = reversed GGUF ne

    def _rope_params(self, il: int) -> tuple[float, float]:
        """(base, freq_scale) of layer il: gemma3's local layers use their own base and no scaling."""
        c = self.cfg
        if c.is_local(il):
            return c.rope_base_swa, 1.0
        return c.rope_base, c.rope_freq_scale

    def _layer(self, il: int, x: np.ndarray, pos: np.ndarray, cache: KVCache, rope_pos=None) -> np.ndarray:
        """One decoder layer. x [T, n_embd] at positions pos [T]; appends this chunk's K/V to the cache.
        rope_pos [4, T]: M-RoPE position ids (qwen2vl; None: t = h = w = pos, e = 0). Causality follows pos."""
        c, b = self.cfg, f"blk.{il}."
        W = lambda n: self.w[b + n]
        T, D = x.shape[0], c.head_dim

        # --- attention
        h = rms_norm(x, W("attn_norm.weight"), c.eps)  # [T, n_embd]
        q = h @ W("attn_q.weight").T  # [T, H·D]
        k = h @ W("attn_k.weight").T  # [T, Hkv·D]
        v = h @ W("attn_v.weight").T  # [T, Hkv·D]
        if b + "attn_q.bias" in self.w:  # qwen2
            q, k, v = q + W("attn_q.bias"), k + W("attn_k.bias"), v + W("attn_v.bias")
        q = q.reshape(T, c.n_head, D)  # [T, H, D]
        k = k.reshape(T, c.n_head_kv, D)  # [T, Hkv, D]
        v = v.reshape(T, c.n_head_kv, D)  # [T, Hkv, D]
        if b + "attn_q_norm.weight" in self.w:  # qwen3, gemma3: per-head RMSNorm before RoPE
            q = rms_norm(q, W("attn_q_norm.weight"), c.eps)
            k = rms_norm(k, W("attn_k_norm.weight"), c.eps)
        base, freq_scale = self._rope_params(il)
        factors = self.w.get("rope_freqs.weight")  # llama 3.1+: θ_i divided by factor i
        if c.rope_mode == ROPE_MROPE:
            rp = rope_pos if rope_pos is not None else np.stack([pos, pos, pos, np.zeros_like(pos)])
            q = rope_multi(q, rp, c.n_rot, base, c.rope_sections, vision=False)
            k = rope_multi(k, rp, c.n_rot, base, c.rope_sections, vision=False)
        else:
            q = rope(q, pos, c.n_rot, base, freq_scale, c.rope_mode, factors)
            k = rope(k, pos, c.n_rot, base, freq_scale, c.rope_mode, factors)
        if c.arch == "gemma3":
            q = q * (1.0 / math.sqrt(D))  # f_attention_scale on Q, then kq_scale = 1 (27B would differ)
            kq_scale = 1.0
        else:
            kq_scale = 1.0 / math.sqrt(D)

        cache.k[il] = np.concatenate([cache.k[il], k])  # [S, Hkv, D]
        cache.v[il] = np.concatenate([cache.v[il], v])  # [S, Hkv, D]
        k_pos = np.concatenate([cache.pos, pos])  # [S]
        n_swa = c.n_swa if c.is_local(il) else 0
        a = attention(q, cache.k[il], cache.v[il], pos, k_pos, kq_scale, n_swa)  # [T, H·D]
        o = a @ W("attn_output.weight").T  # [T, n_embd]
        if c.arch == "gemma3":
            o = rms_norm(o, W("post_attention_norm.weight"), c.eps)
        x = x + o

        # --- feed-forward (gated)
        h = rms_norm(x, W("ffn_norm.weight"), c.eps)  # [T, n_embd]
        gate = h @ W("ffn_gate.weight").T  # [T, n_ff]
        up = h @ W("ffn_up.weight").T  # [T, n_ff]
        act = gelu_tanh(gate) if c.arch == "gemma3" else silu(gate)
        f = (act * up) @ W("ffn_down.weight").T  # [T, n_embd]
        if c.arch == "gemma3":
            f = rms_norm(f, W("post_ffw_norm.weight"), c.eps)
        return x + f

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [T] -> x [T, n_embd]."""
        x = self.w["token_embd.weight"][tokens]  # [T, n_embd]
        if self.cfg.arch == "gemma3":
            # llama.cpp scales in float32 (ggml_scale by sqrtf(n_embd)); the weights are exact f32 values
            x = (x.astype(np.float32) * np.float32(math.sqrt(self.cfg.n_embd))).astype(np.float64)
        return x

    def output(self, x: np.ndarray) -> np.ndarray:
        """Final norm and lm_head: x [T, n_embd] -> logits [T, n_vocab]."""
        h = rms_norm(x, self.w["output_norm.weight"], self.cfg.eps)
        w_out = self.w.get("output.weight", self.w["token_embd.weight"])  # tied when output is absent
        logits = h @ w_out.T  # [T, n_vocab]
        if "output.bias" in self.w:
            logits = logits + self.w["output.bias"]
        return logits

    def new_cache(self) -> KVCache:
        c = self.cfg
        empty = np.zeros((0, c.n_head_kv, c.head_dim))
        return KVCache(k=[empty] * c.n_layer, v=[empty] * c.n_layer)

    def forward_chunked(
        self, tokens, chunk: int, all_logits: bool = False, hidden: list | None = None
    ) -> np.ndarray:
        """Process the prompt `chunk` tokens at a time against an explicit KV cache (as the engine does).

        Returns logits of the last token [n_vocab] (or of every token [T, n_vocab] with all_logits).
        `hidden`, when given a list, receives the residual stream after each layer [T, n_embd].
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1 or len(tokens) == 0 or chunk < 1:
            raise ValueError("forward: need a non-empty 1-D token list and chunk >= 1")
        if tokens.min() < 0 or tokens.max() >= self.cfg.n_vocab:
            raise ValueError(f"forward: token id out of range [0, {self.cfg.n_vocab})")
        cache = self.new_cache()
        outs, per_layer = [], [[] for _ in range(self.cfg.n_layer)]
        for start in range(0, len(tokens), chunk):
            pos = np.arange(start, min(start + chunk, len(tokens)))  # [T]
            x = self.embed(tokens[pos])  # [T, n_embd]
            for il in range(self.cfg.n_layer):
                x = self._layer(il, x, pos, cache)
                per_layer[il].append(x)
            cache.pos = np.concatenate([cache.pos, pos])
            outs.append(x if all_logits else x[-1:])
        if hidden is not None:
            hidden.extend(np.concatenate(p) for p in per_layer)
        logits = self.output(np.concatenate(outs) if all_logits else outs[-1])
        return logits if all_logits else logits[-1]

    def forward_mm(self, tokens, embd=None, rope_pos=None, all_logits: bool = False,
                   cache: KVCache | None = None) -> np.ndarray:
        """A multimodal call after the tokens already in `cache` (a new cache when None; it is extended).

        tokens [T]: an id when >= 0, else -1 - r for row r of embd [R, n_embd] (taken as it is: no embedding
        scale). rope_pos [4, T]: M-RoPE ids (t, h, w, e), None for plain positions from the KV index.
        Returns the last entry's logits [n_vocab] (or [T, n_vocab]).
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        cache = cache if cache is not None else self.new_cache()
        pos = np.arange(len(cache.pos), len(cache.pos) + len(tokens))  # [T] KV indices
        x = np.zeros((len(tokens), self.cfg.n_embd))
        is_tok = tokens >= 0
        if is_tok.any():
            x[is_tok] = self.embed(tokens[is_tok])
        if (~is_tok).any():
            x[~is_tok] = np.asarray(embd, dtype=np.float64)[-1 - tokens[~is_tok]]
        rp = None if rope_pos is None else np.asarray(rope_pos, dtype=np.int64)
        for il in range(self.cfg.n_layer):
            x = self._layer(il, x, pos, cache, rp)
        cache.pos = np.concatenate([cache.pos, pos])
        logits = self.output(x if all_logits else x[-1:])
        return logits if all_logits else logits[-1]

    def forward(self, tokens, all_logits: bool = False, hidden: list | None = None) -> np.ndarray:
        """The whole prompt in one chunk: logits of the last token [n_vocab] (or [T, n_vocab])."""
        return self.forward_chunked(tokens, chunk=len(tokens), all_logits=all_logits, hidden=hidden)


# ----------------------------------------------------------------------------------------------------------
# loading


def _meta(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def load_config(reader: gguf.GGUFReader) -> RefConfig:
    arch = _meta(reader, "general.architecture")
    if arch not in _ROPE_MODE:
        raise ValueError(f"reference: unsupported architecture {arch!r}")
    a = lambda k, d=None: _meta(reader, f"{arch}.{k}", d)
    n_embd, n_head = int(a("embedding_length")), int(a("attention.head_count"))
    head_dim = int(a("attention.key_length", n_embd // n_head))
    if int(a("attention.value_length", head_dim)) != head_dim:
        raise ValueError("reference: key_length != value_length is not supported")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    scaling = a("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise NotImplementedError(f"reference: rope scaling {scaling!r}")
    factor = float(a("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
    return RefConfig(
        arch=arch,
        n_vocab=int(emb.shape[1]),
        n_embd=n_embd,
        n_layer=int(a("block_count")),
        n_head=n_head,
        n_head_kv=int(a("attention.head_count_kv", n_head)),
        head_dim=head_dim,
        n_ff=int(a("feed_forward_length")),
        n_rot=int(a("rope.dimension_count", head_dim)),
        eps=float(a("attention.layer_norm_rms_epsilon")),
        rope_mode=_ROPE_MODE[arch],
        rope_base=float(a("rope.freq_base", 10000.0)),
        rope_freq_scale=1.0 / factor if factor else 1.0,
        rope_base_swa=float(a("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE)),
        n_swa=int(a("attention.sliding_window", 0)) if arch == "gemma3" else 0,
        rope_sections=tuple(int(v) for v in a("rope.dimension_sections", [])),
    )


def dequantize_tensor(t) -> np.ndarray:
    """One ReaderTensor -> float64 array with numpy shape = reversed GGUF ne."""
    x = gguf.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    return np.asarray(x, dtype=np.float64).reshape(shape)


def load_reference_model(path: str | os.PathLike) -> RefModel:
    reader = gguf.GGUFReader(os.fspath(path))
    if bytes(reader.fields["general.architecture"].parts[-1]).decode() == "gpt-oss":
        from reference_moe import load_gptoss_model  # imported here: reference_moe builds on this module

        return load_gptoss_model(path)
    cfg = load_config(reader)
    weights = {t.name: dequantize_tensor(t) for t in reader.tensors}
    return RefModel(cfg, weights)

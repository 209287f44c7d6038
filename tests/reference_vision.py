"""Float64 reference of the Qwen2.5-VL vision encoder, written from the model's math (HF's
Qwen2_5_VisionTransformerPretrainedModel as llama.cpp runs it), not from the C++.

Reads an mmproj with the `gguf` package and dequantizes with `gguf.quants.dequantize` (code we did not write).
It works on the raster patch grid and never reorders tokens: attention has no causal mask and rope takes
explicit positions, so the sequence order is irrelevant; window attention is a mask "same 112-px window"
(windows of 4×4 merged patches from the top-left, cut at the image edge), and the merger concatenates the
four patches (0,0), (0,1), (1,0), (1,1) of each 2×2 group. The engine instead permutes the sequence; agreeing
with this reference checks that its permutation, segment bounds and un-permutation are right.

Pieces: patch embedding = the conv3d's two temporal kernels on the same image, summed, stride 14, no bias;
2-D rope (HF VisionRotaryEmbedding): inv_freq_j = 10000^(-2j / (d/2)), j < d/4, angles concat(row · inv_freq,
col · inv_freq) (d/2 of them), duplicated and applied with rotate_half; RMSNorm x / sqrt(mean x² + eps) · w;
SwiGLU MLP with biases; merger gelu_tanh(mm.0 · cat + b) then mm.2.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import gguf
import numpy as np


@dataclass
class VisionRef:
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    proj_dim: int
    n_wa_pattern: int
    eps: float
    patch: int
    w: dict  # name -> float64 array, numpy shape = reversed GGUF ne


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def load(path: str | os.PathLike) -> VisionRef:
    r = gguf.GGUFReader(os.fspath(path))
    assert _field(r, "clip.projector_type") == "qwen2.5vl_merger"
    w = {}
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type)
        w[t.name] = np.asarray(x, dtype=np.float64).reshape(tuple(int(n) for n in reversed(t.shape.tolist())))
    v = "clip.vision."
    return VisionRef(
        n_embd=int(_field(r, v + "embedding_length")),
        n_layer=int(_field(r, v + "block_count")),
        n_head=int(_field(r, v + "attention.head_count")),
        n_ff=int(_field(r, v + "feed_forward_length")),
        proj_dim=int(_field(r, v + "projection_dim")),
        n_wa_pattern=int(_field(r, v + "n_wa_pattern", 0)),
        eps=float(_field(r, v + "attention.layer_norm_epsilon")),
        patch=int(_field(r, v + "patch_size")),
        w=w,
    )


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3), as x / (1 + e^-2u): the same function, without
    the cancellation 1 + tanh u suffers for x << 0 even in float64."""
    u = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-2.0 * u))


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


def rope_2d(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """x: [n, n_head, d]; rows, cols: [n] patch coordinates."""
    d = x.shape[-1]
    inv_freq = base ** (-np.arange(0, d // 2, 2, dtype=np.float64) / (d // 2))  # d/4 frequencies
    ang = np.concatenate([rows[:, None] * inv_freq, cols[:, None] * inv_freq], axis=1)  # [n, d/2]
    ang = np.concatenate([ang, ang], axis=1)[:, None, :]  # [n, 1, d]
    rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)  # rotate_half
    return x * np.cos(ang) + rot * np.sin(ang)


def attention(q, k, v, allowed: np.ndarray | None) -> np.ndarray:
    """q, k, v: [n, n_head, d]; allowed: [n, n] bool (None = all). Returns [n, n_head * d]."""
    n, nh, d = q.shape
    s = np.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)
    if allowed is not None:
        s = np.where(allowed[None], s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hij,jhd->ihd", p, v).reshape(n, nh * d)


def encode(m: VisionRef, pixels: np.ndarray, window_px: int = 112) -> np.ndarray:
    """pixels: [3, H, W] -> [(H/28)(W/28), proj_dim] float64, raster order over the merged grid."""
    ps = m.patch
    _, h, wd = pixels.shape
    gh, gw = h // ps, wd // ps
    px = np.asarray(pixels, dtype=np.float64)
    # Patches in raster order over the patch grid, each flattened (c, ky, kx) like the conv kernel.
    patches = px.reshape(3, gh, ps, gw, ps).transpose(1, 3, 0, 2, 4).reshape(gh * gw, 3 * ps * ps)
    k0 = m.w["v.patch_embd.weight"].reshape(m.n_embd, -1)
    k1 = m.w["v.patch_embd.weight.1"].reshape(m.n_embd, -1)
    x = patches @ k0.T + patches @ k1.T
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    win = window_px // ps  # window edge in patches
    wid = (rows // win) * ((gw + win - 1) // win) + cols // win
    same_window = wid[:, None] == wid[None, :]
    nh, d = m.n_head, m.n_embd // m.n_head
    for il in range(m.n_layer):
        blk = {n[len(f"v.blk.{il}.") :]: t for n, t in m.w.items() if n.startswith(f"v.blk.{il}.")}
        W = blk.__getitem__  # noqa: N806
        hN = rms_norm(x, W("ln1.weight"), m.eps)
        q = (hN @ W("attn_q.weight").T + W("attn_q.bias")).reshape(-1, nh, d)
        k = (hN @ W("attn_k.weight").T + W("attn_k.bias")).reshape(-1, nh, d)
        v = (hN @ W("attn_v.weight").T + W("attn_v.bias")).reshape(-1, nh, d)
        full = m.n_wa_pattern == 0 or (il + 1) % m.n_wa_pattern == 0
        a = attention(rope_2d(q, rows, cols), rope_2d(k, rows, cols), v, None if full else same_window)
        x = x + a @ W("attn_out.weight").T + W("attn_out.bias")
        hN = rms_norm(x, W("ln2.weight"), m.eps)
        g = hN @ W("ffn_gate.weight").T + W("ffn_gate.bias")
        u = hN @ W("ffn_up.weight").T + W("ffn_up.bias")
        x = x + (silu(g) * u) @ W("ffn_down.weight").T + W("ffn_down.bias")
    x = rms_norm(x, m.w["v.post_ln.weight"], m.eps)
    # Merger: the 2x2 group of each merged patch, (dy, dx) = (0,0), (0,1), (1,0), (1,1), concatenated.
    grid = x.reshape(gh // 2, 2, gw // 2, 2, m.n_embd).transpose(0, 2, 1, 3, 4).reshape(-1, 4 * m.n_embd)
    hid = gelu_tanh(grid @ m.w["mm.0.weight"].T + m.w["mm.0.bias"])
    return hid @ m.w["mm.2.weight"].T + m.w["mm.2.bias"]

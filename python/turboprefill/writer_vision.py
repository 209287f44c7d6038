"""Synthetic Qwen2.5-VL mmproj files: random but well-scaled vision encoders (projector "qwen2.5vl_merger").

Owns the mmproj's inventory as llama.cpp's converter writes it and tools/mtmd/clip.cpp reads it: the keys
(``clip.*``, ``clip.vision.*``; gguf's Keys.Clip / Keys.ClipVision) and the tensors (gguf's MODEL_TENSOR.V_*):
``v.patch_embd.weight`` and ``v.patch_embd.weight.1`` (the conv3d's two temporal frames, GGUF shape
[14, 14, 3, n_embd], F16 as the converter keeps them for ggml's conv), per block ``v.blk.N.ln1/ln2.weight``
(RMSNorm), ``attn_q/k/v/out.{weight,bias}``, ``ffn_gate/up/down.{weight,bias}``, then ``v.post_ln.weight``
and the merger ``mm.0.{weight,bias}`` [4 n_embd → 4 n_embd], ``mm.2.{weight,bias}`` [4 n_embd → proj_dim].

Scales (why activations stay O(1) through the blocks): pixels are ~N(0, 1) after normalization; each conv
frame is N(0, 1/(2·588)), so their sum has rms ≈ 1; every projection is N(0, 1/fan_in) (after an RMSNorm of
rms 1 its output has rms ≈ 1); norm weights 1 + N(0, 0.1²); biases N(0, 0.1²). Quantization goes through the
project's own quantizers (writer._encode), as in writer.py.

Layout: numpy arrays have the reversed GGUF shape ([out, in] for matrices, [n_embd, 3, 14, 14] for the conv).
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from .writer import _BLOCK, _encode

PROJECTOR = "qwen2.5vl_merger"
PATCH = 14
# The preprocessor of Qwen2.5-VL (OpenAI CLIP's normalization) and its pixel bounds, as the converter writes.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def tensor_shapes(n_embd: int, n_layer: int, n_ff: int, proj_dim: int) -> dict[str, tuple[int, ...]]:
    """name -> GGUF ne (innermost first)."""
    s: dict[str, tuple[int, ...]] = {
        "v.patch_embd.weight": (PATCH, PATCH, 3, n_embd),
        "v.patch_embd.weight.1": (PATCH, PATCH, 3, n_embd),
    }
    for i in range(n_layer):
        b = f"v.blk.{i}."
        s[b + "ln1.weight"] = (n_embd,)
        s[b + "ln2.weight"] = (n_embd,)
        for p in ("attn_q", "attn_k", "attn_v", "attn_out"):
            s[b + p + ".weight"] = (n_embd, n_embd)
            s[b + p + ".bias"] = (n_embd,)
        for p in ("ffn_gate", "ffn_up"):
            s[b + p + ".weight"] = (n_embd, n_ff)
            s[b + p + ".bias"] = (n_ff,)
        s[b + "ffn_down.weight"] = (n_ff, n_embd)
        s[b + "ffn_down.bias"] = (n_embd,)
    s["v.post_ln.weight"] = (n_embd,)
    s["mm.0.weight"] = (4 * n_embd, 4 * n_embd)
    s["mm.0.bias"] = (4 * n_embd,)
    s["mm.2.weight"] = (4 * n_embd, proj_dim)
    s["mm.2.bias"] = (proj_dim,)
    return s


def _draw(name: str, ne: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    shape = tuple(reversed(ne))
    if name.startswith("v.patch_embd"):
        return rng.normal(0.0, (1.0 / (2 * 3 * PATCH * PATCH)) ** 0.5, shape).astype(np.float32)
    if name.endswith(".bias"):
        return rng.normal(0.0, 0.1, shape).astype(np.float32)
    if len(ne) == 1:  # norm weights
        return (1.0 + rng.normal(0.0, 0.1, shape)).astype(np.float32)
    return rng.normal(0.0, (1.0 / ne[0]) ** 0.5, shape).astype(np.float32)


def _type(name: str, ne: tuple[int, ...], weight_type: str) -> str:
    """F32 for vectors; the conv stays F16 (F32 with weight_type f32), as the converter keeps it; matrices
    take weight_type, with F16 where ne0 is not a whole number of its blocks (llama.cpp's fallback)."""
    if len(ne) == 1:
        return "F32"
    if name.startswith("v.patch_embd"):
        return "F32" if weight_type == "F32" else "F16"
    return weight_type if ne[0] % _BLOCK[weight_type][0] == 0 else "F16"


def write_mmproj(
    path: str | os.PathLike,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 128,
    proj_dim: int = 96,
    n_wa_pattern: int = 2,
    weight_type: str = "f16",
    seed: int = 0,
    eps: float = 1e-6,
    image_size: int = 560,
    min_pixels: int | None = 3136,
    max_pixels: int | None = 12845056,
    projector: str = PROJECTOR,
    skip_tensors: tuple[str, ...] = (),
    return_weights: bool = False,
) -> dict:
    """Write a random Qwen2.5-VL mmproj to `path`; returns {"path", "config", "tensors": {name: {"type", "ne"}}}
    and with return_weights "weights": {name: float32 array (reversed ne)} as drawn before quantization.

    weight_type: "f32", "f16" or "q8_0" for the matrices. n_wa_pattern: full attention on layers with
    (il + 1) % n_wa_pattern == 0, windows elsewhere; 0 = every layer full. min_pixels / max_pixels: None leaves
    the key out. projector and skip_tensors exist to write broken files for the loader's error tests.
    """
    wt = weight_type.upper()
    if wt not in ("F32", "F16", "Q8_0"):
        raise ValueError(f"write_mmproj: weight_type {weight_type!r}: use 'f32', 'f16' or 'q8_0'")
    if n_embd % n_head or (n_embd // n_head) % 4:
        raise ValueError(f"write_mmproj: n_embd {n_embd} / n_head {n_head} must give a head_dim multiple of 4")
    import gguf  # a test/bench tool; the engine never imports gguf

    wr = gguf.GGUFWriter(os.fspath(path), "clip")
    k, kv = gguf.Keys.Clip, gguf.Keys.ClipVision
    wr.add_string("general.name", "turboprefill-synthetic-qwen2.5vl-mmproj")
    wr.add_string(k.PROJECTOR_TYPE, projector)
    wr.add_bool(k.HAS_VISION_ENCODER, True)
    wr.add_bool(kv.USE_SILU, True)
    wr.add_uint32(kv.IMAGE_SIZE, image_size)
    wr.add_uint32(kv.PATCH_SIZE, PATCH)
    wr.add_uint32(kv.EMBEDDING_LENGTH, n_embd)
    wr.add_uint32(kv.FEED_FORWARD_LENGTH, n_ff)
    wr.add_uint32(kv.PROJECTION_DIM, proj_dim)
    wr.add_uint32(kv.BLOCK_COUNT, n_layer)
    wr.add_uint32(kv.Attention.HEAD_COUNT, n_head)
    wr.add_float32(kv.Attention.LAYERNORM_EPS, eps)
    wr.add_array(kv.IMAGE_MEAN, list(IMAGE_MEAN))
    wr.add_array(kv.IMAGE_STD, list(IMAGE_STD))
    wr.add_uint32(kv.N_WA_PATTERN, n_wa_pattern)
    wr.add_uint32(kv.SPATIAL_MERGE_SIZE, 2)
    if min_pixels is not None:
        wr.add_uint32(kv.IMAGE_MIN_PIXELS, min_pixels)
    if max_pixels is not None:
        wr.add_uint32(kv.IMAGE_MAX_PIXELS, max_pixels)

    tensors: dict[str, dict] = {}
    weights: dict[str, np.ndarray] = {}
    for name, ne in tensor_shapes(n_embd, n_layer, n_ff, proj_dim).items():
        if name in skip_tensors:
            continue
        t = _type(name, ne, wt)
        w = _draw(name, ne, seed)
        if t == "F32":
            wr.add_tensor(name, w)
        elif t == "F16":
            wr.add_tensor(name, w.astype(np.float16))  # exact f16 rounding, as the converter's numpy cast
        else:
            wr.add_tensor(
                name,
                _encode(w.reshape(-1, ne[0]), t).reshape(*w.shape[:-1], -1),
                raw_dtype=gguf.GGMLQuantizationType[t],
            )
        tensors[name] = {"type": t, "ne": list(ne)}
        if return_weights:
            weights[name] = w
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    out = {
        "path": os.fspath(path),
        "config": {
            "n_embd": n_embd,
            "n_layer": n_layer,
            "n_head": n_head,
            "n_ff": n_ff,
            "proj_dim": proj_dim,
            "n_wa_pattern": n_wa_pattern,
            "weight_type": wt,
            "eps": eps,
        },
        "tensors": tensors,
    }
    if return_weights:
        out["weights"] = weights
    return out

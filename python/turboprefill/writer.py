"""Synthetic GGUF models: random but well-scaled weights for llama, qwen2, qwen3, gemma3, gpt-oss and qwen2vl.

Owns three facts and nothing else: the tensor inventory of each architecture (names and GGUF shapes,
GGUF_SPEC §5), the metadata keys the engine reads (§1.6), and llama.cpp's Q4_K_M type choice per tensor
(§3.2). Quantization goes through the project's own quantizers (`turboprefill.quant`) so that writing a model
exercises them; the float64 reference forward (tests/reference.py) reads the file back with the `gguf`
package, which we did not write.

Layout: a GGUF tensor has ne = [in, out] (ne0 = row length = the reduction dimension); every numpy array here
has the reversed shape [out, in], so y = W @ x, and its bytes are the GGUF bytes.

Scales (why the layers neither explode nor vanish): every projection is N(0, 1/fan_in), so after an RMSNorm
(rms 1) each projection output has rms ≈ 1 and each layer adds O(1) to the residual; norm weights are
1 + N(0, 0.1²) (Gemma's GGUF norms are used as-is — the converter already added HF's 1 — so the same holds);
token embeddings are N(0, 1/n_embd) when they double as the output matrix (logits then have std ≈ 1) or for
Gemma (which multiplies them by sqrt(n_embd)), N(0, 1) otherwise.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import asdict, dataclass

import numpy as np

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "gpt-oss", "qwen2vl")

# Bytes per block and elements per block (GGUF_SPEC §2.1) of the types the writer can emit.
_BLOCK = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "MXFP4": (32, 17),
}  # fmt: skip

# general.file_type (llama_ftype) of each preset; informational only, readers trust per-tensor types.
_FILE_TYPE = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
    "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "BF16": 32, "Q4_K_M": 15, "MXFP4": 38,
}  # fmt: skip

# llama.cpp's shape fallback (tensor_type_fallback) when ne0 is not a multiple of the 256 super-block.
_K_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

_DEFAULT_EPS = {"llama": 1e-5, "qwen2": 1e-6, "qwen3": 1e-6, "gemma3": 1e-6, "gpt-oss": 1e-5, "qwen2vl": 1e-6}
_DEFAULT_ROPE_BASE = {"llama": 10000.0, "qwen2": 1e6, "qwen3": 1e6, "gemma3": 1e6, "gpt-oss": 150000.0,
                      "qwen2vl": 1e6}


def default_rope_sections(head_dim: int) -> tuple[int, int, int, int]:
    """M-RoPE sections in Qwen2.5-VL's proportions (head_dim 128: [16, 24, 24, 0] of 64 pairs): a quarter of
    the head_dim/2 pairs for t, the rest split between h and w (head_dim 64: [8, 12, 12, 0])."""
    pairs = head_dim // 2
    t = pairs // 4
    h = (pairs - t) // 2
    return (t + (pairs - t - 2 * h), h, h, 0)


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything the writer decided about a model; written to the GGUF metadata."""

    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx: int
    rms_eps: float
    rope_freq_base: float  # gemma3: the global layers' base; local layers use 10000
    rope_scaling_factor: float | None  # linear (gemma3: global layers only), or YaRN's factor (gpt-oss)
    sliding_window: int  # gemma3, gpt-oss (even layers); 0 = no sliding window (all layers global)
    tied_embeddings: bool
    rope_freqs: bool  # llama only: rope_freqs.weight [head_dim/2] divides θ_i
    qkv_bias: bool  # qwen2, gpt-oss (gpt-oss also biases attn_output)
    qk_norm: bool  # qwen3, gemma3
    post_norms: bool  # gemma3
    # gpt-oss only (0 / "linear" / False elsewhere)
    n_expert: int = 0
    n_expert_used: int = 0  # experts per token (top-k of the router)
    n_ff_exp: int = 0  # hidden size of one expert
    rope_scaling: str = "linear"  # how rope_scaling_factor applies: "linear" | "yarn"
    rope_orig_ctx: int = 0  # YaRN's original context length
    attn_sinks: bool = False  # per-head sink logits (attn_sinks.weight)
    # qwen2vl only: rope.dimension_sections, rotary pairs per position id (t, h, w, e); () elsewhere
    rope_sections: tuple[int, ...] = ()


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule for which attn_v / ffn_down tensors get Q6_K in Q4_K_M (GGUF_SPEC §3.2)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def shape_fallback(type_name: str, ne0: int) -> str:
    """Type actually used for a row of ne0 elements: K types need ne0 % 256 == 0, the rest ne0 % 32 == 0."""
    if type_name in _K_FALLBACK and ne0 % 256 != 0:
        type_name = _K_FALLBACK[type_name]
    if _BLOCK[type_name][0] == 32 and ne0 % 32 != 0:
        type_name = "F16"
    return type_name


def tensor_type(name: str, ne: tuple[int, ...], quant: str, n_layer: int, tied: bool) -> str:
    """ggml type name of tensor `name` (GGUF shape `ne`) under preset `quant` ("q4_k_m" or a type name)."""
    if len(ne) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return "F32"  # norms, biases and rope_freqs stay as converted
    q = quant.upper()
    if q != "Q4_K_M":
        return shape_fallback(q, ne[0])
    t = "Q4_K"
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        t = "Q6_K"
    elif name.endswith(("attn_v.weight", "ffn_down.weight")):
        # the running index of attn_v (ffn_down) tensors equals the layer index: one per layer, in order
        layer = int(name.split(".")[1])
        t = "Q6_K" if use_more_bits(layer, n_layer) else "Q4_K"
    return shape_fallback(t, ne[0])


def tensor_shapes(cfg: SyntheticConfig) -> dict[str, tuple[int, ...]]:
    """GGUF shape (ne, innermost first) of every tensor, in file order."""
    if cfg.arch == "gpt-oss":
        from . import writer_moe

        return writer_moe.tensor_shapes(cfg)
    d, hd = cfg.n_embd, cfg.head_dim
    q_dim, kv_dim = cfg.n_head * hd, cfg.n_head_kv * hd
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (d, cfg.n_vocab)}
    if cfg.rope_freqs:
        shapes["rope_freqs.weight"] = (hd // 2,)
    for il in range(cfg.n_layer):
        b = f"blk.{il}."
        shapes[b + "attn_norm.weight"] = (d,)
        shapes[b + "attn_q.weight"] = (d, q_dim)
        shapes[b + "attn_k.weight"] = (d, kv_dim)
        shapes[b + "attn_v.weight"] = (d, kv_dim)
        if cfg.qkv_bias:
            shapes[b + "attn_q.bias"] = (q_dim,)
            shapes[b + "attn_k.bias"] = (kv_dim,)
            shapes[b + "attn_v.bias"] = (kv_dim,)
        if cfg.qk_norm:
            shapes[b + "attn_q_norm.weight"] = (hd,)
            shapes[b + "attn_k_norm.weight"] = (hd,)
        shapes[b + "attn_output.weight"] = (q_dim, d)
        if cfg.post_norms:
            shapes[b + "post_attention_norm.weight"] = (d,)
        shapes[b + "ffn_norm.weight"] = (d,)
        shapes[b + "ffn_gate.weight"] = (d, cfg.n_ff)
        shapes[b + "ffn_up.weight"] = (d, cfg.n_ff)
        shapes[b + "ffn_down.weight"] = (cfg.n_ff, d)
        if cfg.post_norms:
            shapes[b + "post_ffw_norm.weight"] = (d,)
    shapes["output_norm.weight"] = (d,)
    if not cfg.tied_embeddings:
        shapes["output.weight"] = (d, cfg.n_vocab)
    return shapes


def _rope_freq_factors(n: int) -> np.ndarray:
    """Llama-3.1-like factors: 1 for the fastest quarter of the pairs, 8 for the slowest, a ramp between."""
    i = np.arange(n, dtype=np.float64)
    ramp = np.clip((i - n / 4) / max(n / 2, 1), 0.0, 1.0)
    return (1.0 + 7.0 * ramp).astype(np.float32)


def draw_tensor(cfg: SyntheticConfig, name: str, ne: tuple[int, ...], seed: int) -> np.ndarray:
    """The float32 weights of one tensor, numpy shape = reversed ne; depends only on (seed, name, ne)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    shape = tuple(reversed(ne))
    if cfg.arch == "gpt-oss":
        from . import writer_moe

        if writer_moe.owns(name):
            return writer_moe.draw_tensor(name, ne, rng)
    if name == "rope_freqs.weight":
        return _rope_freq_factors(ne[0])
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if name.endswith(".bias"):
        return 0.5 * rng.standard_normal(shape, dtype=np.float32)
    if name == "token_embd.weight":
        small = cfg.tied_embeddings or cfg.arch == "gemma3"
        std = 1.0 / math.sqrt(cfg.n_embd) if small else 1.0
    else:
        std = 1.0 / math.sqrt(ne[0])  # fan_in
    return (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def _encode(w: np.ndarray, type_name: str) -> np.ndarray:
    """GGUF data of `w` [..., rows, ne0]: float32 for F32, else our quantizer's bytes [..., rows, row_bytes]
    (a 3-D expert tensor keeps its leading n_expert axis: gguf reads ne from the byte array's shape)."""
    if type_name == "F32":
        return np.ascontiguousarray(w, dtype=np.float32)
    from . import quant  # F16/BF16 included: every conversion goes through the engine's own code

    rows = np.ascontiguousarray(w.reshape(-1, w.shape[-1]), dtype=np.float32)
    raw = np.asarray(quant.quantize(rows, quant.GGMLType[type_name]), dtype=np.uint8)
    blck, size = _BLOCK[type_name]
    assert raw.shape == (rows.shape[0], rows.shape[1] // blck * size), (type_name, raw.shape)
    return raw.reshape(*w.shape[:-1], raw.shape[1])


def _write_tokenizer(wr, n_vocab: int) -> None:
    """A vocabulary-free tokenizer section: the engine never needs one, and llama.cpp loads "no_vocab"."""
    wr.add_string("tokenizer.ggml.model", "no_vocab")
    wr.add_vocab_size(n_vocab)


def write_model(
    path: str | os.PathLike,
    arch: str,
    *,
    n_vocab: int = 256,
    n_embd: int = 256,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int | None = None,
    head_dim: int | None = None,
    n_ff: int = 512,
    n_ctx: int = 4096,
    quant: str = "q4_k_m",
    seed: int = 0,
    tied_embeddings: bool | None = None,
    rope_freqs: bool = False,
    sliding_window: int | None = None,
    rope_freq_base: float | None = None,
    rope_scaling_factor: float | None = None,
    rms_eps: float | None = None,
    alignment: int | None = None,
    return_weights: bool = False,
    n_expert: int = 8,
    n_expert_used: int = 2,
    n_ff_exp: int | None = None,
    expert_quant: str | None = None,
    rope_orig_ctx: int | None = None,
    rope_sections: tuple[int, ...] | None = None,
    tokenizer=None,
) -> dict:
    """Write a random model to `path` and return what was written.

    quant: "q4_k_m" (llama.cpp's mix, GGUF_SPEC §3.2) or one ggml type name ("f32", "f16", "bf16", "q8_0",
    "q4_k", ...) used for every 2-D weight, with llama.cpp's shape fallback where ne0 does not fit its blocks.
    tied_embeddings: default True for gemma3, False otherwise (then output.weight is written).
    sliding_window: gemma3 (default 512) and gpt-oss (default 128, even layers); 0 = all layers global.
    rope_freqs: llama only.
    gpt-oss only: n_expert, n_expert_used (top-k), n_ff_exp (one expert's hidden size, default n_ff; also
    written as feed_forward_length, as the converter does), expert_quant (a type name for the three expert
    matrices, overriding the preset), rope_orig_ctx (YaRN's original context, default 4096);
    rope_scaling_factor is YaRN's factor (default 32), head_dim defaults to 64, rope_freq_base to 150000.
    quant for gpt-oss also accepts "mxfp4": llama.cpp's MXFP4_MOE mix (experts MXFP4, other matrices Q8_0);
    writer_moe.tensor_type has the rules.
    qwen2vl (the text model of Qwen2-VL / Qwen2.5-VL: qwen2's tensors, M-RoPE): rope_sections, written as
    rope.dimension_sections (default default_rope_sections(head_dim); any list is written as given, to test
    the reader's checks).
    tokenizer: a function (gguf writer, n_vocab) that writes the tokenizer keys (writer_vl.add_qwen_tokenizer:
    a real byte-level BPE vocabulary and chat template); default: "no_vocab", which the engine never needs.
    alignment: None leaves general.alignment out (readers then use 32, as in real files); a power of two
    writes the key and aligns the data section and every tensor to it.
    Returns {"path", "config": {...}, "tensors": {name: {"type", "ne"}}, "file_type"} and, with
    return_weights, "weights": {name: float32 array [out, in]} ([n_expert, out, in] for experts) as drawn
    before quantization.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"write_model: unknown arch {arch!r}, expected one of {ARCHITECTURES}")
    moe = arch == "gpt-oss"
    if moe:
        from . import writer_moe

        d = writer_moe.DEFAULTS
        head_dim = head_dim or d["head_dim"]
        sliding_window = d["sliding_window"] if sliding_window is None else sliding_window
        rope_scaling_factor = rope_scaling_factor or d["rope_scaling_factor"]
        if not 0 < n_expert_used <= n_expert:
            raise ValueError(f"write_model: need 0 < n_expert_used {n_expert_used} <= n_expert {n_expert}")
    elif sliding_window is None:
        sliding_window = 512 if arch == "gemma3" else 0
    head_dim = head_dim or n_embd // n_head
    n_head_kv = n_head_kv or n_head
    if n_head % n_head_kv:
        raise ValueError(f"write_model: n_head {n_head} is not a multiple of n_head_kv {n_head_kv}")
    if head_dim % 2:
        raise ValueError(f"write_model: head_dim {head_dim} must be even for RoPE")
    if rope_freqs and arch != "llama":
        raise ValueError("write_model: rope_freqs is a llama tensor")
    if sliding_window and arch not in ("gemma3", "gpt-oss"):
        raise ValueError("write_model: sliding_window is a gemma3 / gpt-oss key")
    q = quant.upper()
    if q != "Q4_K_M" and q not in _BLOCK:
        raise ValueError(f"write_model: unknown quant {quant!r}; use 'q4_k_m' or one of {sorted(_BLOCK)}")
    if expert_quant is not None and (not moe or expert_quant.upper() not in _BLOCK):
        raise ValueError(f"write_model: expert_quant {expert_quant!r} needs arch gpt-oss and a type name")
    cfg = SyntheticConfig(
        arch=arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=n_ff,
        n_ctx=n_ctx,
        rms_eps=rms_eps if rms_eps is not None else _DEFAULT_EPS[arch],
        rope_freq_base=rope_freq_base if rope_freq_base is not None else _DEFAULT_ROPE_BASE[arch],
        rope_scaling_factor=rope_scaling_factor,
        sliding_window=sliding_window,
        tied_embeddings=(arch == "gemma3") if tied_embeddings is None else tied_embeddings,
        rope_freqs=rope_freqs,
        qkv_bias=arch in ("qwen2", "gpt-oss", "qwen2vl"),
        qk_norm=arch in ("qwen3", "gemma3"),
        post_norms=arch == "gemma3",
        n_expert=n_expert if moe else 0,
        n_expert_used=n_expert_used if moe else 0,
        n_ff_exp=(n_ff_exp or n_ff) if moe else 0,
        rope_scaling="yarn" if moe else "linear",
        rope_orig_ctx=(rope_orig_ctx or writer_moe.DEFAULTS["rope_orig_ctx"]) if moe else 0,
        attn_sinks=moe,
        rope_sections=tuple(rope_sections if rope_sections is not None else default_rope_sections(head_dim))
        if arch == "qwen2vl" else (),
    )
    if rope_sections is not None and arch != "qwen2vl":
        raise ValueError("write_model: rope_sections is a qwen2vl key")
    if moe and cfg.tied_embeddings:
        raise ValueError("write_model: gpt-oss has an untied output.weight")

    import gguf  # the writer is a test/bench tool; the engine itself never imports gguf

    wr = gguf.GGUFWriter(os.fspath(path), arch)
    wr.add_string("general.name", f"turboprefill-synthetic-{arch}")
    if alignment is not None:
        wr.add_custom_alignment(alignment)  # also sets the writer's data alignment
    wr.add_context_length(cfg.n_ctx)
    wr.add_embedding_length(cfg.n_embd)
    wr.add_block_count(cfg.n_layer)
    wr.add_feed_forward_length(cfg.n_ff_exp if moe else cfg.n_ff)
    wr.add_head_count(cfg.n_head)
    wr.add_head_count_kv(cfg.n_head_kv)
    if cfg.head_dim != cfg.n_embd // cfg.n_head or arch in ("qwen3", "gemma3", "gpt-oss"):
        wr.add_key_length(cfg.head_dim)
        wr.add_value_length(cfg.head_dim)
    wr.add_layer_norm_rms_eps(cfg.rms_eps)
    wr.add_rope_freq_base(cfg.rope_freq_base)
    wr.add_rope_dimension_count(cfg.head_dim)
    if moe:
        writer_moe.add_metadata(wr, cfg)  # expert counts and YaRN
    elif cfg.rope_scaling_factor is not None:
        wr.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        wr.add_rope_scaling_factor(cfg.rope_scaling_factor)
    if cfg.sliding_window:
        wr.add_sliding_window(cfg.sliding_window)
    if cfg.rope_sections:
        wr.add_rope_dimension_sections(list(cfg.rope_sections))  # int32 array, as llama.cpp's converter writes
    file_type = _FILE_TYPE.get(q)
    if file_type is not None:
        wr.add_file_type(file_type)
    wr.add_quantization_version(gguf.GGML_QUANT_VERSION)
    (tokenizer or _write_tokenizer)(wr, cfg.n_vocab)

    tensors: dict[str, dict] = {}
    weights: dict[str, np.ndarray] = {}
    for name, ne in tensor_shapes(cfg).items():
        if moe:
            t = writer_moe.tensor_type(cfg, name, ne, quant, expert_quant)
        else:
            t = tensor_type(name, ne, quant, cfg.n_layer, cfg.tied_embeddings)
        w = draw_tensor(cfg, name, ne, seed)
        data = _encode(w, t)
        if t != "F32":
            # raw bytes [..., rows, row_bytes]: gguf derives ne = [row_bytes/type_size*block, rows, ...]
            wr.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[t])
        else:
            wr.add_tensor(name, data)
        tensors[name] = {"type": t, "ne": list(ne)}
        if return_weights:
            weights[name] = w
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()

    out = {
        "path": os.fspath(path),
        "config": asdict(cfg),
        "tensors": tensors,
        "file_type": file_type,
        "alignment": alignment or 32,
    }
    if return_weights:
        out["weights"] = weights
    return out

"""The engine's forward pass against the float64 numpy reference, and its sequence API and errors.

The CPU engine quantizes activations in two int8 stages for quantized-weight matmuls (x ≈ d·(128·q1 + q2),
q2 quantizing the residual of q1; csrc/backend/cpu/matmul.cpp), so against the float64 reference its
error is that of this quantization plus f32 rounding: measured max |Δlogit| / max |logit| = 0.74–1.45e-4
on these q4_k_m models and quant types, 0.57–1.37× the error of the same two-stage quantization applied in
numpy to the f64 reference (tests/test_cpu_kernels.py's quantize_two_stage_np before every quantized
matmul); F32/F16/BF16 weights keep an f32 path at 2.7–3.4e-7. REL_TOL = 3e-4 is 2× the largest error
measured and far below what a real bug does (measured on these models: no RoPE 0.26–0.50, one RMSNorm
left out 0.10–0.31).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from turboprefill import ContextOverflowError, Engine, FormatError, UnsupportedError

from conftest import SYNTHETIC
from reference import load_reference_model

REL_TOL = 3e-4  # 2 × the largest measured error of the two-stage int8 path (1.45e-4); bugs measure ≥ 0.1


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def prompt(n: int, n_vocab: int, seed: int = 1) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, n_vocab, n)]


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
@pytest.mark.parametrize("n_tok,ubatch", [(1, 512), (7, 3), (83, 16), (40, 512)])
def test_logits_match_reference(synthetic_model, name, n_tok, ubatch):
    path = synthetic_model(name)
    toks = prompt(n_tok, SYNTHETIC[name][1]["n_vocab"])
    ref = load_reference_model(path).forward(toks, all_logits=True)
    eng = Engine(path, devices="cpu", threads=2, ubatch=ubatch)
    got = eng.prefill(toks, all_logits=True).logits
    assert got.shape == ref.shape
    assert rel_err(got, ref) < REL_TOL
    last = eng.prefill(toks[:1]).logits  # continues the sequence; compare the last-token mode too
    assert last.shape == (ref.shape[1],)


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k",
                                   "q6_k"])
def test_every_weight_type_matches_reference(synthetic_model, quant):
    path = synthetic_model("llama256", quant=quant, n_layer=2)
    toks = prompt(19, 200, seed=3)
    ref = load_reference_model(path).forward(toks)
    got = Engine(path, devices="cpu", threads=2, ubatch=8).prefill(toks).logits
    assert rel_err(got, ref) < REL_TOL


def test_results_independent_of_ubatch_threads_and_split_calls(synthetic_model):
    """Every (row, token) dot product and every attention row is computed in a fixed order, so the
    ubatch size, the thread count and cutting the prompt into several prefill calls change nothing."""
    path = synthetic_model("gemma3")
    toks = prompt(90, 200, seed=5)
    base = Engine(path, threads=1, ubatch=512).prefill(toks, all_logits=True).logits
    for ub, th in [(1, 2), (7, 2), (64, 1), (96, 2)]:
        got = Engine(path, threads=th, ubatch=ub).prefill(toks, all_logits=True).logits
        assert np.array_equal(got, base), (ub, th)
    eng = Engine(path, threads=2, ubatch=16)
    a = eng.prefill(toks[:37], all_logits=True).logits
    b = eng.prefill(toks[37:], all_logits=True).logits
    assert eng.n_past == 90
    assert np.array_equal(np.concatenate([a, b]), base)


def test_reset_starts_a_new_sequence(synthetic_model):
    path = synthetic_model("qwen3")
    eng = Engine(path, ubatch=8)
    first = eng.prefill(prompt(20, 150)).logits
    eng.prefill(prompt(5, 150, seed=9))
    eng.reset()
    assert eng.n_past == 0
    assert np.array_equal(eng.prefill(prompt(20, 150)).logits, first)


def test_generate_is_greedy_over_the_reference(synthetic_model):
    path = synthetic_model("qwen2")
    toks = prompt(12, 150, seed=4)
    ref = load_reference_model(path)
    expect, seq = [], list(toks)
    for _ in range(6):
        nxt = int(np.argmax(ref.forward(seq)))
        expect.append(nxt)
        seq.append(nxt)
    assert Engine(path, ubatch=4).generate(toks, max_new_tokens=6, stop_at_eos=False) == expect


def test_config_reports_model_dimensions(synthetic_model):
    cfg = Engine(synthetic_model("gemma3"), n_ctx=256).config
    assert (cfg["architecture"], cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_head_kv"], cfg["head_dim"],
            cfg["n_vocab"], cfg["n_ctx"]) == ("gemma3", 256, 7, 4, 1, 64, 200, 256)


# ---- bad input --------------------------------------------------------------------------------------------


def test_token_out_of_range(synthetic_model):
    eng = Engine(synthetic_model("llama"))
    with pytest.raises(ValueError, match=r"token id 300 at position 2 is out of range \[0, 300\)"):
        eng.prefill([1, 2, 300])
    with pytest.raises(ValueError, match="token id -1"):
        eng.prefill([-1])
    with pytest.raises(ValueError, match="at least one token"):
        eng.prefill([])
    with pytest.raises(TypeError):
        eng.prefill([1.5, 2.0])
    assert eng.n_past == 0


def test_context_overflow_leaves_the_sequence_usable(synthetic_model):
    eng = Engine(synthetic_model("llama"), n_ctx=32, ubatch=8)
    first = eng.prefill(prompt(20, 300)).logits
    with pytest.raises(ContextOverflowError, match="exceeds the context of 32 tokens"):
        eng.prefill(prompt(13, 300))
    assert eng.n_past == 20
    eng.reset()
    assert np.array_equal(eng.prefill(prompt(20, 300)).logits, first)
    with pytest.raises(ContextOverflowError):
        Engine(synthetic_model("llama"), n_ctx=16).prefill(prompt(17, 300))


def test_bad_engine_arguments(synthetic_model):
    path = synthetic_model("llama")
    with pytest.raises(ValueError, match="bad device entry 'gpu'"):
        Engine(path, devices="gpu")
    with pytest.raises(ValueError, match="ubatch must be >= 1"):
        Engine(path, ubatch=0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        Engine(path, schedule="fast")
    with pytest.raises(ValueError, match="layer_split adds up to 3 layers but the model has 4"):
        Engine(path, devices="cpu:0,cpu:1", layer_split=[1, 2])
    with pytest.raises(ValueError, match="5 stages for a model with 4 layers"):
        Engine(path, devices=["cpu"] * 5)
    with pytest.raises(OSError):
        Engine("/nonexistent/model.gguf")


def _rewrite(src, dst, *, arch=None, drop=None, retype=None, reshape=None):
    """Copy a GGUF with one thing changed, through the gguf package (an independent writer)."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch or r.fields["general.architecture"].contents())
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vt = field.types[0]
        sub = field.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        name = key.replace(r.fields["general.architecture"].contents(), arch) if arch else key
        w.add_key_value(name, field.contents(), vt, sub_type=sub)
    for t in r.tensors:
        if t.name == drop:
            continue
        # t.data is [rows, row_bytes] uint8 for block types, [rows, cols] for float types.
        data, dtype = np.asarray(t.data), t.tensor_type
        if t.name == retype:  # a valid Q2_K tensor of the same shape: the loader must refuse the type
            dtype = gguf.GGMLQuantizationType.Q2_K
            data = np.zeros((data.shape[0], int(t.shape[0]) // 256 * 84), dtype=np.uint8)
        if t.name == reshape:  # one output row fewer
            data = data[:-1]
        w.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_model_file_errors_name_the_problem(synthetic_model, tmp_path):
    src = synthetic_model("llama256", quant="q4_k")
    with pytest.raises(UnsupportedError, match="unsupported architecture 'mamba'"):
        Engine(_rewrite(src, tmp_path / "arch.gguf", arch="mamba"))
    with pytest.raises(FormatError, match="missing tensor 'blk.1.ffn_up.weight'"):
        Engine(_rewrite(src, tmp_path / "drop.gguf", drop="blk.1.ffn_up.weight"))
    with pytest.raises(UnsupportedError, match="Q2_K in tensor 'blk.0.attn_q.weight'"):
        Engine(_rewrite(src, tmp_path / "type.gguf", retype="blk.0.attn_q.weight"))
    with pytest.raises(FormatError, match="tensor 'blk.0.attn_k.weight' has shape"):
        Engine(_rewrite(src, tmp_path / "shape.gguf", reshape="blk.0.attn_k.weight"))


def test_truncated_model_file(synthetic_model, tmp_path):
    from turboprefill.ggufinfo import describe_gguf

    path = synthetic_model("llama")
    d = describe_gguf(path)
    data_end = d["data_offset"] + max(t["offset"] + t["nbytes"] for t in d["tensors"])  # then only padding
    data = path.read_bytes()
    for cut in (10, len(data) // 3, data_end - 1):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(FormatError):
            Engine(p)


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="reads MemAvailable from /proc/meminfo")
def test_kv_cache_larger_than_memory_is_a_clear_error(synthetic_model):
    """Refused before allocating (with overcommit, a too-large cache would otherwise meet the OOM killer)."""
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) * 1024
    path = synthetic_model("llama256")  # 4 layers × K and V × 128 floats = 4 KiB per position
    n = int(2 * avail / 4096) + 1
    eng = Engine(path, n_ctx=n)
    with pytest.raises(MemoryError, match="KV cache for .* positions needs .* MiB more"):
        eng.prefill(np.zeros(n, dtype=np.int32))
    assert eng.prefill([1, 2, 3]).logits.shape == (200,)  # still usable

"""The CUDA engine end to end: prefill on GPUs against the float64 reference, schedules bit-identical on
one and two GPUs, and device-list handling. GPU tests (marked ``cuda``) skip without a GPU (and then run on
emulated GPUs through tests/test_cuda_emulated.py); test_cuda_without_gpu_is_a_device_error runs wherever no
GPU is visible (including TP_CUDA=OFF builds).

Tolerances (max|Δlogit| / max|logit| against tests/reference.py in float64, 83 tokens), measured by putting
the GPU's roundings into the reference (the op tests bound the kernels themselves):
- Float weights (f32/f16/bf16): the CUDA matmul is f32, so only the f16 KV cache and, on sm_80+, the
  tensor-core attention's f16 Q and P differ: measured <= 3.9e-4 over the synthetic models.
  FLOAT_REL_TOL = 4e-3 (10×); a wrong rope mode, mask, GQA mapping or missing norm moves logits > 1e-2.
- Quantized weights: the CUDA matmul rounds activations to int8 groups of 32 (csrc/quant/unpack.h), a
  noise of 1.2–1.8e-2 (1 − cos <= 2.8e-4) on these models. Emulating that rounding in the reference does
  not make a tighter oracle: an f32-level difference upstream flips some roundings and redraws the noise
  (measured: a 1e-7 relative perturbation already gives 1.1–1.3e-2). QUANT_REL_TOL = 5e-2 and
  QUANT_COS_TOL = 1e-3 leave ~3×; they catch integration errors, the op tests catch subtle ones.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from turboprefill import DeviceError, Engine, UnsupportedError, cuda_devices
from turboprefill.writer import write_model

from conftest import SYNTHETIC
from reference import load_reference_model

FLOAT_REL_TOL = 4e-3
QUANT_REL_TOL = 5e-2
QUANT_COS_TOL = 1e-3


@functools.lru_cache(maxsize=1)
def gpu_count() -> int:
    try:
        return len(cuda_devices()["gpus"])
    except (UnsupportedError, DeviceError):
        return 0


needs_gpu = pytest.mark.skipif(
    gpu_count() == 0, reason="no CUDA GPU is visible (or this build has no CUDA backend)"
)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def one_minus_cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(1.0 - a @ b / np.sqrt((a @ a) * (b @ b)))


def assert_close(got: np.ndarray, ref: np.ndarray, quantized: bool) -> None:
    assert got.shape == ref.shape
    if quantized:
        assert rel_err(got, ref) < QUANT_REL_TOL
        assert one_minus_cos(got, ref) < QUANT_COS_TOL
    else:
        assert rel_err(got, ref) < FLOAT_REL_TOL


def prompt(n: int, n_vocab: int, seed: int = 1) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, n_vocab, n)]


# ---- runs everywhere -------------------------------------------------------------------------------------


def test_cuda_without_gpu_is_a_device_error(synthetic_model):
    if gpu_count() > 0:
        pytest.skip("a CUDA GPU is visible")
    path = synthetic_model("llama")
    for devices in ("cuda", "cuda:0", "cuda:0,cuda:1"):
        with pytest.raises(DeviceError, match='devices="cpu"'):
            Engine(path, devices=devices)


# ---- GPU -------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("quant", ["f32", "q4_k_m"])
@pytest.mark.parametrize("name", sorted(SYNTHETIC))
@pytest.mark.parametrize("n_tok,ubatch", [(1, 512), (7, 3), (83, 16), (128, 128)])
def test_cuda_prefill_matches_reference(synthetic_model, quant, name, n_tok, ubatch):
    if name == "gpt-oss" and quant != "f32" and n_tok > 64:
        # Measured: a few tokens' logits off by up to 0.24 (the rest ~1 %, as on the dense models), f32 exact
        # to 3e-4: the GPU's one-stage int8 activations move near-tied router logits enough to pick another
        # expert, which the reference's two-stage (CPU) precision does not. Needs two-stage activations in
        # MMQ/MMVQ; test_cuda_gptoss_prefill_matches_cpu_engine covers the quantized path meanwhile.
        pytest.xfail("gpt-oss routing flips under the GPU's one-stage int8 activations")
    path = synthetic_model(name, quant=quant)
    toks = prompt(n_tok, SYNTHETIC[name][1]["n_vocab"])
    ref = load_reference_model(path).forward(toks, all_logits=True)
    got = Engine(path, devices="cuda:0", ubatch=ubatch).prefill(toks, all_logits=True).logits
    assert_close(got, ref, quantized=quant != "f32")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize(
    "quant", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]
)
def test_cuda_every_weight_type(synthetic_model, quant):
    path = synthetic_model("llama256", quant=quant, n_layer=2)
    toks = prompt(19, 200, seed=3)
    ref = load_reference_model(path).forward(toks)
    got = Engine(path, devices="cuda:0", ubatch=8).prefill(toks).logits
    assert_close(got, ref, quantized=quant not in ("f32", "f16", "bf16"))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize(
    "quant,expert_quant", [("mxfp4", None), ("q8_0", "q4_k"), ("q8_0", "q5_0"), ("q8_0", "f32")]
)
@pytest.mark.parametrize(
    "n_tok,ubatch,devices", [(7, 4, "cuda:0"), (83, 32, "cuda:0"), (83, 64, "cuda:0,cuda:1")]
)
def test_cuda_gptoss_prefill_matches_cpu_engine(tmp_path, quant, expert_quant, n_tok, ubatch, devices):
    """gpt-oss end to end on the GPU — device routing, the grouped expert matmul (MMVQ tiles for ubatches of
    <= 8 tokens, MMQ tiles above; the float path for F32 experts), swiglu_oai, YaRN, sinks, the even-layer
    window — against the CPU engine, per token: the median token's logits at cosine >= 0.999 and every token
    at >= 0.99. The GPU quantizes activations in one int8 stage (the CPU in two, cpu/matmul.cpp) and keeps an
    f16 KV cache: measured 1 - cos ≈ 6e-5 on a typical token, but a near-tied router logit then picks
    another expert for a few tokens (measured up to 4.4e-3 on emulated sm_75, Q5_0 experts; the last token
    is one of them there), so the last token alone cannot be held to 0.999 on every GPU. A wrong expert row,
    bias or dropped sink moves every token by far more."""
    path = tmp_path / "m.gguf"
    kw = dict(n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_expert=8, n_expert_used=4, n_ff_exp=128, n_layer=2)
    write_model(path, "gpt-oss", **kw, n_vocab=200, quant=quant, expert_quant=expert_quant, sliding_window=16)
    toks = prompt(n_tok, 200, seed=9)
    ref = Engine(path, devices="cpu", threads=2, ubatch=ubatch).prefill(toks, all_logits=True).logits
    got = Engine(path, devices=devices, ubatch=ubatch).prefill(toks, all_logits=True).logits
    cos = [1.0 - one_minus_cos(g, r) for g, r in zip(got, ref)]
    assert np.median(cos) >= 0.999 and min(cos) >= 0.99, np.round(cos, 5)


@pytest.mark.cuda
@needs_gpu
def test_no_host_wait_inside_the_pipeline_loop(synthetic_model):
    """The host waits for the GPUs a fixed number of times per prefill (KV growth, last logits, one timer
    read per stage), never per ubatch. Counted by the CUDA emulation (tests/cuda_emu), which records every
    host call that found GPU work still pending; on real GPUs there is no such counter and this skips."""
    import cffi

    from turboprefill import _native, build_info

    if not build_info().get("cuda_emulated"):
        pytest.skip("the host-wait counter exists in the emulated build only")
    ffi = cffi.FFI()
    ffi.cdef("long long tp_emu_host_waits(void);")
    emu = ffi.dlopen(str(_native._lib_path()))
    path = synthetic_model("llama")
    toks = prompt(256, SYNTHETIC["llama"][1]["n_vocab"], seed=5)
    eng = Engine(path, devices="cuda:0,cuda:1", ubatch=8)
    eng.prefill(toks)  # sizes the KV cache and the scratch once
    waits = {}
    for n in (8, 256):  # 1 and 32 ubatches
        eng.reset()
        before = emu.tp_emu_host_waits()
        eng.prefill(toks[:n])
        waits[n] = emu.tp_emu_host_waits() - before
    # Whether a stage's single timer wait finds work pending depends on timing: allow one per stage.
    assert waits[256] <= waits[8] + 2, waits


@pytest.mark.cuda
@needs_gpu
def test_cuda_sequence_across_calls_grows_the_kv_cache(synthetic_model):
    """Two prefill calls (the second grows the f16 cache, copying the first's keys) match the reference."""
    path = synthetic_model("gemma3", quant="f32")
    toks = prompt(90, 200, seed=5)
    ref = load_reference_model(path).forward(toks, all_logits=True)
    eng = Engine(path, devices="cuda:0", ubatch=16)
    a = eng.prefill(toks[:37], all_logits=True).logits
    b = eng.prefill(toks[37:], all_logits=True).logits
    assert eng.n_past == 90
    assert_close(np.concatenate([a, b]), ref, quantized=False)


def _same_gpu_model(indices) -> bool:
    gpus = cuda_devices()["gpus"]
    return len({(gpus[i]["name"], gpus[i]["cc"]) for i in indices}) == 1


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("ring_slots", [1, 2])
@pytest.mark.parametrize("devices", ["cuda:0,cuda:0", "cuda:0,cuda:1", "cuda:0,cuda:1,cuda:0"])
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_schedules_bit_identical_on_gpu(synthetic_model, devices, name, ring_slots):
    """Pipelined and sequential runs enqueue the same kernels on the same data, so logits and KV caches are
    bit-identical; and stage boundaries change no kernel, so one stage gives the same bits (same GPU model).
    One ring slot makes the producer reuse the slot the consumer just read: an event missing in the
    hand-off shows up here as a difference."""
    used = sorted({int(d.split(":")[1]) for d in devices.split(",")})
    if used[-1] >= gpu_count():
        pytest.skip(f"needs {used[-1] + 1} GPUs")
    path = synthetic_model(name)
    toks = prompt(90, SYNTHETIC[name][1]["n_vocab"], seed=11)
    runs = {}
    for schedule in ("pipelined", "sequential"):
        eng = Engine(path, devices=devices, ubatch=16, schedule=schedule, ring_slots=ring_slots)
        runs[schedule] = (eng.prefill(toks, all_logits=True).logits, eng.kv_digest())
    assert np.array_equal(runs["pipelined"][0], runs["sequential"][0])
    assert runs["pipelined"][1] == runs["sequential"][1]
    if _same_gpu_model(used):
        one = Engine(path, devices="cuda:0", ubatch=16)
        assert np.array_equal(one.prefill(toks, all_logits=True).logits, runs["pipelined"][0])
        assert one.kv_digest() == runs["pipelined"][1]


@pytest.mark.cuda
@needs_gpu
def test_cuda_means_every_gpu(synthetic_model):
    n = gpu_count()
    path = synthetic_model("gemma3")  # 7 layers
    if n > 7:
        pytest.skip("more GPUs than layers")
    eng = Engine(path, devices="cuda", ubatch=32)
    assert eng.config["n_stages"] == n
    assert eng.prefill(prompt(40, 200)).logits.shape == (200,)


@pytest.mark.cuda
@needs_gpu
def test_cuda_device_list_errors(synthetic_model):
    path = synthetic_model("llama")
    with pytest.raises(UnsupportedError, match="mix cpu and cuda"):
        Engine(path, devices="cpu,cuda:0")
    with pytest.raises(DeviceError, match="only .* CUDA GPU"):
        Engine(path, devices=f"cuda:{gpu_count()}")
    with pytest.raises(ValueError, match="cuda:N"):
        Engine(path, devices="cuda:x")


@pytest.mark.cuda
@needs_gpu
def test_cuda_head_dim_above_256_is_unsupported(synthetic_model):
    path = synthetic_model("qwen3", head_dim=320, n_embd=128, n_head=2, n_head_kv=1)
    eng = Engine(path, devices="cuda:0", ubatch=8)
    with pytest.raises(UnsupportedError, match="head_dim 320"):
        eng.prefill(prompt(5, 150))

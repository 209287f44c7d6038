"""The CUDA engine end to end: prefill on GPUs against the float64 reference, schedules bit-identical on
one and two GPUs, and device-list handling. GPU tests (marked ``cuda``) skip without a GPU;
test_cuda_without_gpu_is_a_device_error runs wherever no GPU is visible (including TP_CUDA=OFF builds).

The oracle for GPU logits is tests/reference.py run at the GPU's precision: the CUDA matmul multiplies
quantized weights with int8 activations (groups of 32, d = amax/127, round half away from zero — see
csrc/quant/unpack.h) and the KV cache is f16, so the reference applies exactly those two roundings
(q8_groups below, f16 K/V in attention) and keeps everything else in float64. What it does not emulate:
f32 arithmetic (~1e-6), and on sm_80+ the tensor-core attention's f16 Q and P (<= 1.5e-4 · max|v| per
attention output, measured in tests/cpp/attention_emulate.cpp). GPU_REL_TOL = 5e-3 on max|Δlogit| /
max|logit| leaves ~10× for those to accumulate over the layers; a real bug (rope mode, mask, GQA mapping,
a missing norm) moves logits by > 5e-2. EXACT_REL_TOL = 0.1 bounds the distance to the exact float64
forward, a sanity check that the emulated roundings are the only big ones. Both constants are estimates
until measured on a GPU: tighten them to 10× the measured values.
"""

from __future__ import annotations

import functools

import gguf
import numpy as np
import pytest
import reference
from conftest import SYNTHETIC
from reference import load_reference_model
from turboprefill import DeviceError, Engine, UnsupportedError, cuda_devices

GPU_REL_TOL = 5e-3
EXACT_REL_TOL = 0.1


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


def prompt(n: int, n_vocab: int, seed: int = 1) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, n_vocab, n)]


# ---- the reference at GPU precision ----------------------------------------------------------------------


def q8_groups(x: np.ndarray) -> np.ndarray:
    """x as the CUDA int8 matmul sees it: f32, groups of 32 along the row, d = amax / 127 in f32,
    q = round half away from zero of x / d, value d·q."""
    g = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    d = np.abs(g).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(d > 0, g / d, np.float32(0))
    q = np.sign(r) * np.floor(np.abs(r) + np.float32(0.5))
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)


class _Q8Product:
    """Stands for W.T in `x @ W.T`: multiplies with the q8-rounded activations."""

    __array_ufunc__ = None  # make ndarray @ this defer to __rmatmul__

    def __init__(self, w: np.ndarray):
        self.w = w

    def __rmatmul__(self, x: np.ndarray) -> np.ndarray:
        return q8_groups(x) @ self.w.T


class _QuantizedWeight:
    """A quantized 2-D weight in the reference's dict: `.T` products see q8 activations, rows (embedding
    lookups) are the exact dequantized values."""

    def __init__(self, w: np.ndarray):
        self.w = w

    @property
    def T(self) -> _Q8Product:
        return _Q8Product(self.w)

    def __getitem__(self, idx):
        return self.w[idx]


def gpu_precision_reference(path, monkeypatch) -> reference.RefModel:
    model = load_reference_model(path)
    float_types = {
        gguf.GGMLQuantizationType.F32,
        gguf.GGMLQuantizationType.F16,
        gguf.GGMLQuantizationType.BF16,
    }
    for t in gguf.GGUFReader(str(path)).tensors:
        if len(t.shape) == 2 and t.tensor_type not in float_types:
            model.w[t.name] = _QuantizedWeight(model.w[t.name])
    exact_attention = reference.attention

    def f16_cache_attention(q, k, v, *args):
        f16 = lambda a: a.astype(np.float16).astype(np.float64)
        return exact_attention(q, f16(k), f16(v), *args)

    monkeypatch.setattr(reference, "attention", f16_cache_attention)
    return model


# ---- runs everywhere -------------------------------------------------------------------------------------


def test_cuda_without_gpu_is_a_device_error(synthetic_model):
    if gpu_count() > 0:
        pytest.skip("a CUDA GPU is visible")
    path = synthetic_model("llama")
    for devices in ("cuda", "cuda:0", "cuda:0,cuda:1"):
        with pytest.raises(DeviceError, match='devices="cpu"'):
            Engine(path, devices=devices)


def test_q8_groups_is_the_documented_rounding():
    x = np.array([[0.5, -0.5, 127.0, 1.5, -2.5] + [0.0] * 27], dtype=np.float64)  # d = 1: ties away from zero
    assert q8_groups(x)[0, :5].tolist() == [1.0, -1.0, 127.0, 2.0, -3.0]
    assert not q8_groups(np.zeros((2, 64))).any()


# ---- GPU -------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("name", sorted(SYNTHETIC))
@pytest.mark.parametrize("n_tok,ubatch", [(1, 512), (7, 3), (83, 16), (128, 128)])
def test_cuda_prefill_matches_reference(synthetic_model, monkeypatch, name, n_tok, ubatch):
    path = synthetic_model(name)
    toks = prompt(n_tok, SYNTHETIC[name][1]["n_vocab"])
    exact = load_reference_model(path).forward(toks, all_logits=True)
    ref = gpu_precision_reference(path, monkeypatch).forward(toks, all_logits=True)
    got = Engine(path, devices="cuda:0", ubatch=ubatch).prefill(toks, all_logits=True).logits
    assert got.shape == ref.shape
    assert rel_err(got, ref) < GPU_REL_TOL
    assert rel_err(got, exact) < EXACT_REL_TOL


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize(
    "quant", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]
)
def test_cuda_every_weight_type(synthetic_model, monkeypatch, quant):
    path = synthetic_model("llama256", quant=quant, n_layer=2)
    toks = prompt(19, 200, seed=3)
    ref = gpu_precision_reference(path, monkeypatch).forward(toks)
    got = Engine(path, devices="cuda:0", ubatch=8).prefill(toks).logits
    assert rel_err(got, ref) < GPU_REL_TOL


@pytest.mark.cuda
@needs_gpu
def test_cuda_sequence_across_calls_grows_the_kv_cache(synthetic_model, monkeypatch):
    """Two prefill calls (the second grows the f16 cache, copying the first's keys) equal one call."""
    path = synthetic_model("gemma3")
    toks = prompt(90, 200, seed=5)
    ref = gpu_precision_reference(path, monkeypatch).forward(toks, all_logits=True)
    eng = Engine(path, devices="cuda:0", ubatch=16)
    a = eng.prefill(toks[:37], all_logits=True).logits
    b = eng.prefill(toks[37:], all_logits=True).logits
    assert eng.n_past == 90
    assert rel_err(np.concatenate([a, b]), ref) < GPU_REL_TOL


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

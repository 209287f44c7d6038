"""Qwen2-VL's text side on the CUDA backend: the M-RoPE and vision rope kernel against float64, Ops::from_host,
and the engine with embedding rows and explicit positions (reference, schedules, stages). GPU tests (marked
``cuda``) skip without a GPU and run on emulated GPUs through tests/test_cuda_emulated.py.

Tolerances: rope as test_cuda_ops.py (angles in double, device cos/sin within 2 ulp: |Δ| <= 1e-6 · max|x|);
the engine with F32 weights as test_cuda_engine.py's FLOAT_REL_TOL (f16 KV cache and tensor-core attention).
"""

from __future__ import annotations

import cffi
import numpy as np
import pytest
from test_qwen2vl import MROPE, NEOX, VISION, image_ids, mm_prompt

from turboprefill import DeviceError, Engine, UnsupportedError, cuda_devices
from turboprefill.writer import default_rope_sections

from conftest import SYNTHETIC
from reference import load_reference_model, rope_multi

FLOAT_REL_TOL = 4e-3  # test_cuda_engine.py: f16 KV cache and tensor-core attention, measured <= 3.9e-4
ROPE_ABS = 1e-6

_CDEF = """
int tp_cuda_op_test_rope_multi(int32_t device, float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim,
                               int64_t pos0, const int32_t* pos, int32_t mode, const int32_t* sections, int64_t n_rot,
                               float base);
int tp_cuda_op_test_from_host(int32_t device, float* dst, const float* src, int64_t n);
"""


def gpu_count() -> int:
    try:
        return len(cuda_devices()["gpus"])
    except (UnsupportedError, DeviceError):
        return 0


needs_gpu = pytest.mark.skipif(gpu_count() == 0, reason="no CUDA GPU is visible (or this build has no CUDA backend)")


@pytest.fixture(scope="module")
def cu():
    if gpu_count() == 0:
        pytest.skip("no CUDA GPU is visible (or this build has no CUDA backend)")
    from turboprefill import _native

    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    lib = ffi.dlopen(str(_native._lib_path()))

    class Lib:
        def rope(self, x, pos0, pos, mode, sections, n_rot, base):
            x = np.ascontiguousarray(x, dtype=np.float32).copy()
            sec = np.asarray(sections, dtype=np.int32)
            ids = None if pos is None else np.ascontiguousarray(pos, dtype=np.int32)
            p = ffi.NULL if ids is None else ffi.cast("const int32_t *", ids.ctypes.data)
            _native.check(lib.tp_cuda_op_test_rope_multi(0, ffi.cast("float *", x.ctypes.data), x.shape[0], x.shape[1],
                                                         x.shape[2], pos0, p, mode,
                                                         ffi.cast("const int32_t *", sec.ctypes.data), n_rot, base))
            return x

        def from_host(self, src):
            out = np.empty_like(src)
            _native.check(lib.tp_cuda_op_test_from_host(0, ffi.cast("float *", out.ctypes.data),
                                                        ffi.cast("const float *", src.ctypes.data), src.size))
            return out

    return Lib()


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("n_tok", [1, 7, 83])
@pytest.mark.parametrize("vision", [False, True])
def test_cuda_multi_rope_matches_float64(cu, head_dim, n_tok, vision):
    rng = np.random.default_rng(head_dim + 1000 * n_tok + vision)
    x = rng.normal(0, 2, (n_tok, 3, head_dim)).astype(np.float32)
    if vision:
        sec, n_rot, base = (head_dim // 4,) * 4, head_dim // 2, 10000.0
        ids = np.stack([rng.integers(0, 64, n_tok) for _ in range(4)])
    else:
        sec, n_rot, base = default_rope_sections(head_dim), head_dim, 1e6
        ids = image_ids(rng, n_tok)
    got = cu.rope(x, 0, ids, VISION if vision else MROPE, sec, n_rot, base)
    ref = rope_multi(x.astype(np.float64), ids, n_rot, base, sec, vision=vision)
    assert np.abs(got - ref).max() <= ROPE_ABS * np.abs(x).max()


@pytest.mark.cuda
def test_cuda_rope_default_positions_and_wrapping_sections(cu):
    """pos = NULL is pos0 + i (e = 0); sections summing to less than n_rot/2 repeat (ggml's sector modulo);
    NEOX with explicit ids reads t only."""
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (9, 2, 64)).astype(np.float32)
    plain = np.arange(40, 49)
    ids = np.stack([plain, plain, plain, np.zeros(9, int)])
    sec = (2, 3, 3, 1)
    assert np.array_equal(cu.rope(x, 40, None, MROPE, sec, 64, 1e6), cu.rope(x, 0, ids, MROPE, sec, 64, 1e6))
    img = image_ids(rng, 9)
    ref = rope_multi(x.astype(np.float64), img, 64, 1e6, sec, vision=False)
    assert np.abs(cu.rope(x, 0, img, MROPE, sec, 64, 1e6) - ref).max() <= ROPE_ABS * np.abs(x).max()
    img[1:] = 5
    assert np.array_equal(cu.rope(x, 40, None, NEOX, sec, 64, 1e6), cu.rope(x, 0, np.stack([plain, *img[1:]]),
                                                                             NEOX, sec, 64, 1e6))


@pytest.mark.cuda
def test_cuda_from_host_copies(cu):
    src = np.random.default_rng(0).normal(0, 1, 1000).astype(np.float32)
    assert np.array_equal(cu.from_host(src), src)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("devices,ubatch", [("cuda:0", 512), ("cuda:0", 7), ("cuda:0,cuda:1", 5)])
def test_cuda_image_prompt_matches_reference(synthetic_model, devices, ubatch):
    if devices.count(",") + 1 > gpu_count():
        pytest.skip("needs 2 GPUs")
    path = synthetic_model("qwen2vl", quant="f32")
    kw = SYNTHETIC["qwen2vl"][1]
    rng = np.random.default_rng(11)
    toks, embd, pos, nxt = mm_prompt(rng, kw["n_vocab"], kw["n_embd"])
    model = load_reference_model(path)
    cache = model.new_cache()
    ref = model.forward_mm(toks, embd, pos, all_logits=True, cache=cache)
    eng = Engine(path, devices=devices, ubatch=ubatch)
    got = eng._prefill_mm(toks, embd, pos, all_logits=True).logits
    assert np.abs(got - ref).max() / np.abs(ref).max() < FLOAT_REL_TOL
    assert eng.config["next_pos"] == nxt
    more = np.array([3, 1, 4, 1, 5], np.int32)
    plain = np.arange(nxt, nxt + 5)
    ref2 = model.forward_mm(more, None, np.stack([plain, plain, plain, 0 * plain]), all_logits=True, cache=cache)
    got2 = eng.prefill(more, all_logits=True).logits
    assert np.abs(got2 - ref2).max() / np.abs(ref2).max() < FLOAT_REL_TOL


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("devices", ["cuda:0,cuda:0", "cuda:0,cuda:1"])
def test_cuda_schedules_bit_identical_with_images(synthetic_model, devices):
    """Every stage copies the ubatch's position ids into its own buffer on its own stream; stage 0 also the
    embedding rows. A copy racing a kernel shows up as pipelined != sequential."""
    if int(devices[-1]) >= gpu_count():
        pytest.skip("needs 2 GPUs")
    path = synthetic_model("qwen2vl")
    kw = SYNTHETIC["qwen2vl"][1]
    toks, embd, pos, _ = mm_prompt(np.random.default_rng(5), kw["n_vocab"], kw["n_embd"], start=3, grid=(4, 3))
    runs = []
    for schedule in ("pipelined", "sequential"):
        eng = Engine(path, devices=devices, ubatch=4, schedule=schedule, ring_slots=1)
        eng.prefill([1, 2, 3])
        a = eng._prefill_mm(toks, embd, pos, all_logits=True).logits
        b = eng.prefill([4, 5], all_logits=True).logits
        runs.append((a, b, eng.kv_digest(), eng.config["next_pos"]))
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    assert runs[0][2:] == runs[1][2:]

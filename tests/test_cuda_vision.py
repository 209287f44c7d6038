"""CUDA vision encoder ops (vision.cu: attention_seg, unary) against numpy, and the whole encoder on cuda:0
against the CPU encoder and the float64 reference.

GPU tests (marked ``cuda``), run on emulated GPUs by tests/test_cuda_emulated.py without a GPU. The op tests
call the ``tp_cuda_op_test_*`` entry points of csrc/backend/cuda/vision_test.cu (a fresh CUDA Ops, outputs
NaN-filled first).

Tolerances, each with its reason:
- attention_seg: all-f32 online softmax with FMA dots; against float64 the same bound as the CPU's f32 kernels
  in tests/test_cuda_ops.py (4e-6 · max|v|).
- unary: the CPU's expressions with expf (<= 2 ulp) in place of vexp: as the CPU test, (8 + 4|z|) ulp of |out|.
- encoder, per row cosine against the CPU encoder and the reference: f32 weights >= 0.9999 (f32 arithmetic in
  another summation order; the issue's bar); q8_0 >= 0.999 (the issue's bar for quantized weights): the CUDA
  int8 path quantizes activations in one int8 stage as llama.cpp does, the CPU in two (~15 bits;
  csrc/backend/cpu/matmul.cpp), measured 0.9998 on these random weights.
"""

from __future__ import annotations

import math

import cffi
import numpy as np
import pytest
import reference_vision as R
from test_cuda_ops import gpu_count
from test_vision import SMALL, attention_seg_numpy, cosines, image

from turboprefill.vision import VisionEncoder
from turboprefill.writer_vision import write_mmproj

pytestmark = pytest.mark.cuda

_CDEF = """
int tp_cuda_op_test_attention_seg(int32_t device, float* out, const float* q, const float* k, const float* v,
                                  int64_t n_tok, int32_t n_head, int32_t head_dim, float kq_scale,
                                  const int32_t* seg, int64_t n_seg);
int tp_cuda_op_test_unary(int32_t device, float* out, const float* in, int64_t n, int32_t act);
"""


class VisionOpLib:
    def __init__(self):
        from turboprefill import _native

        self.ffi = cffi.FFI()
        self.ffi.cdef(_CDEF)
        self.lib = self.ffi.dlopen(str(_native._lib_path()))
        self._native = _native
        getattr(self.lib, "tp_cuda_op_test_attention_seg")  # noqa: B009 -- AttributeError in a build without it

    def ptr(self, a: np.ndarray, ctype: str = "float *"):
        assert a.flags.c_contiguous
        return self.ffi.cast(ctype, a.ctypes.data)

    def call(self, name: str, *args):
        self._native.check(getattr(self.lib, name)(*args))


@pytest.fixture(scope="module")
def cu() -> VisionOpLib:
    if gpu_count() == 0:
        pytest.skip("no CUDA GPU is visible (or this build has no CUDA backend)")
    try:
        return VisionOpLib()
    except AttributeError:
        pytest.skip("this build has no tp_cuda_op_test_attention_seg entry point")


@pytest.mark.parametrize("head_dim", [80, 16, 7, 128])
@pytest.mark.parametrize("seg", [[0, 1], [0, 83], [0, 64, 128, 160, 164], [0, 4, 20, 83, 100, 131]])
def test_cuda_attention_seg(cu, head_dim, seg):
    rng = np.random.default_rng(head_dim * 7 + len(seg))
    n, nh = seg[-1], 2
    q, k, v = (rng.normal(size=(n, nh * head_dim)).astype(np.float32) for _ in range(3))
    out = np.empty_like(q)
    bounds = np.asarray(seg, np.int32)
    cu.call(
        "tp_cuda_op_test_attention_seg",
        0,
        cu.ptr(out),
        cu.ptr(q),
        cu.ptr(k),
        cu.ptr(v),
        n,
        nh,
        head_dim,
        1.0 / math.sqrt(head_dim),
        cu.ptr(bounds, "int32_t *"),
        len(seg) - 1,
    )
    want = attention_seg_numpy(q, k, v, nh, seg)
    assert np.abs(out - want).max() <= 4e-6 * np.abs(v).max()


@pytest.mark.parametrize("act", [0, 1])
@pytest.mark.parametrize("n", [1, 300])
def test_cuda_unary(cu, act, n):
    x = np.random.default_rng(n).normal(scale=4.0, size=n).astype(np.float32)
    x[0] = -90.0
    out = np.empty_like(x)
    cu.call("tp_cuda_op_test_unary", 0, cu.ptr(out), cu.ptr(x), n, act)
    xd = x.astype(np.float64)
    want = R.silu(xd) if act == 0 else R.gelu_tanh(xd)
    z = np.abs(xd) if act == 0 else 2 * math.sqrt(2 / math.pi) * np.abs(xd + 0.044715 * xd**3)
    assert np.all(np.abs(out - want) <= (8 + 4 * z) * 2.0**-24 * np.abs(want) + 1e-37)


@pytest.mark.parametrize("weight_type", ["f32", "q8_0"])
@pytest.mark.parametrize("hw", [(28, 28), (140, 196)])
def test_cuda_encoder_matches_cpu(tmp_path, weight_type, hw):
    if gpu_count() == 0:
        pytest.skip("no CUDA GPU is visible (or this build has no CUDA backend)")
    path = tmp_path / "m.gguf"
    write_mmproj(path, weight_type=weight_type, n_wa_pattern=2, seed=11, **SMALL)
    px = image(*hw, seed=hw[0] + hw[1])
    with VisionEncoder(path, device="cuda:0") as g, VisionEncoder(path, threads=2) as c:
        y_gpu = g.encode(px)
        y_cpu = c.encode(px)
        assert g.last_seconds > 0.0
    assert np.isfinite(y_gpu).all()
    min_cos = 0.9999 if weight_type == "f32" else 0.999
    assert cosines(y_gpu, y_cpu).min() >= min_cos
    assert cosines(y_gpu, R.encode(R.load(path), px)).min() >= min_cos

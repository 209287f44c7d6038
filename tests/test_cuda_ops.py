"""CUDA ops (csrc/backend/cuda) against numpy references.

GPU tests (marked ``cuda``) skip without a visible GPU or in a build without the CUDA backend; without a GPU
they run on emulated GPUs through tests/test_cuda_emulated.py. Each calls a
``tp_cuda_op_test_*`` entry point (csrc/backend/cuda/ops_test.cu): one op through a fresh CUDA Ops on
device 0, outputs NaN-filled first so a forgotten element fails.

Tolerances, each with its reason (ulp = float32 unit in the last place):
- add, add_bias, kv cache (f32 -> f16 round to nearest even), send: bit-exact; same operations, same order.
- rms_norm: the CPU formula with Σx² in double; only the summation order differs, which moves float(Σ/n)
  only at a rounding boundary: <= 2 ulp.
- rope: angles in double as on the CPU; device pow/sin/cos are within 2 ulp of numpy in double, so cos/sin
  rarely differ by 1 ulp in float: |Δ| <= 1e-6 · max|x| (8 ulp of the largest element).
- glu: same f32 expression; CUDA expf/tanhf are within 2 ulp: 16 ulp of |g·up| + |out| (1 + tanh cancels).
- embed: the TP_HD block decoders; nvcc may fuse d·q − m into an FMA, 1 ulp of d·q: |Δ| <= 4e-7 · max|row|.
- attention: float64 reference on the f16-rounded cache. f32 kernel: f32 dot products and sums,
  measured <= 4e-7 · max|v| in emulation (tests/cuda_emu) -> 4e-6 · max|v|. Tensor cores: Q and P rounded to f16 (2^-11
  each), measured <= 1.5e-4 · max|v| in emulation -> 2e-3 · max|v|. A masking or indexing bug is O(max|v|).
"""

from __future__ import annotations

import cffi
import numpy as np
import pytest

from turboprefill import DeviceError, UnsupportedError, cuda_devices

_CDEF = """
int tp_cuda_op_test_rms_norm(int32_t device, float* out, const float* in, const float* w, int64_t rows,
                             int64_t dim, float eps);
int tp_cuda_op_test_rope(int32_t device, float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t pos0,
                         int32_t neox, int64_t n_rot, float base, float freq_scale, const float* freq_factors);
int tp_cuda_op_test_attention(int32_t device, int32_t kernel, float* out, const float* q, const float* k,
                              const float* v, int64_t pos0, int64_t n_tok, int64_t n_head, int64_t n_head_kv,
                              int64_t head_dim, float kq_scale, int64_t n_swa, float* k_cache, float* v_cache);
int tp_cuda_op_test_glu(int32_t device, float* out, const float* gate, const float* up, int64_t n, int32_t gelu);
int tp_cuda_op_test_add(int32_t device, float* out, const float* a, const float* b, int64_t n, const float* bias,
                        int64_t bias_n);
int tp_cuda_op_test_embed(int32_t device, float* out, int32_t type, const void* table, int64_t n_rows, int64_t cols,
                          const int32_t* tokens, int64_t n, float scale);
int tp_cuda_op_test_send(int32_t src_device, int32_t dst_device, float* out, const float* in, int64_t n);
"""

KERNEL_AUTO, KERNEL_MMA, KERNEL_SIMPLE = 0, 1, 2


def gpu_count() -> int:
    try:
        return len(cuda_devices()["gpus"])
    except (UnsupportedError, DeviceError):
        return 0


class CudaOpLib:
    """The test entry points, called with numpy arrays; a non-OK status raises with tp_last_error()."""

    def __init__(self):
        from turboprefill import _native

        self.ffi = cffi.FFI()
        self.ffi.cdef(_CDEF)
        self.lib = self.ffi.dlopen(str(_native._lib_path()))
        self._native = _native
        getattr(self.lib, "tp_cuda_op_test_rms_norm")  # noqa: B009 -- AttributeError in a build without them

    def ptr(self, a: np.ndarray | None, ctype: str = "float *"):
        if a is None:
            return self.ffi.NULL
        assert a.flags.c_contiguous
        return self.ffi.cast(ctype, a.ctypes.data)

    def call(self, name: str, *args):
        self._native.check(getattr(self.lib, name)(*args))


@pytest.fixture(scope="module")
def cu() -> CudaOpLib:
    if gpu_count() == 0:
        pytest.skip("no CUDA GPU is visible (or this build has no CUDA backend)")
    try:
        return CudaOpLib()
    except AttributeError:
        pytest.skip("this build has no tp_cuda_op_test_* entry points")


def f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


ULP = float(np.finfo(np.float32).eps)


# ---- rms_norm, rope, glu, add ----------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("rows,dim", [(1, 64), (7, 96), (83, 256), (128, 2048), (5, 33)])
def test_rms_norm_matches_cpu_formula(cu, rows, dim):
    rng = np.random.default_rng(rows * 1000 + dim)
    x = f32(rng.normal(0, 3, (rows, dim)))
    w = f32(rng.normal(1, 0.2, dim))
    eps = np.float32(1e-6)
    ss = (x.astype(np.float64) ** 2).sum(axis=1, keepdims=True)
    scale = np.float32(1.0) / np.sqrt((ss / dim).astype(np.float32) + eps)  # f32, as the CPU backend
    ref = (x * scale) * w
    out = np.empty_like(x)
    cu.call("tp_cuda_op_test_rms_norm", 0, cu.ptr(out), cu.ptr(x), cu.ptr(w), rows, dim, float(eps))
    np.testing.assert_array_max_ulp(out, ref, maxulp=2)


def rope_ref(x, pos0, n_rot, base, freq_scale, neox, factors):
    """The CPU backend's rope: angles in double, cos/sin rounded to float, rotation in float."""
    n_tok = x.shape[0]
    half = n_rot // 2
    k = np.arange(half, dtype=np.float64)
    pos = np.arange(pos0, pos0 + n_tok, dtype=np.float64)[:, None]
    theta = np.float64(freq_scale) * pos * np.power(np.float64(base), -2.0 * k / n_rot)
    if factors is not None:
        theta = theta / factors.astype(np.float64)
    c = np.cos(theta).astype(np.float32)[:, None, :]
    s = np.sin(theta).astype(np.float32)[:, None, :]
    ia = np.arange(half) if neox else np.arange(0, n_rot, 2)
    ib = ia + half if neox else ia + 1
    out = x.copy()
    a, b = x[..., ia], x[..., ib]
    out[..., ia] = a * c - b * s
    out[..., ib] = a * s + b * c
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize(
    "n_tok,n_heads,head_dim,n_rot,pos0,factors",
    [
        (1, 1, 64, 64, 0, False),
        (7, 3, 128, 128, 5, True),
        (83, 2, 256, 128, 1000, False),
        (128, 4, 64, 32, 70000, True),
    ],
)
def test_rope_matches_cpu_formula(cu, neox, n_tok, n_heads, head_dim, n_rot, pos0, factors):
    rng = np.random.default_rng(n_tok + head_dim)
    x = f32(rng.normal(0, 1, (n_tok, n_heads, head_dim)))
    ff = f32(rng.uniform(1, 8, n_rot // 2)) if factors else None
    base, freq_scale = 10000.0, 0.25
    ref = rope_ref(x, pos0, n_rot, base, freq_scale, neox, ff)
    got = x.copy()
    cu.call(
        "tp_cuda_op_test_rope",
        0,
        cu.ptr(got),
        n_tok,
        n_heads,
        head_dim,
        pos0,
        int(neox),
        n_rot,
        base,
        freq_scale,
        cu.ptr(ff),
    )
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(x).max()
    assert np.array_equal(got[..., n_rot:], x[..., n_rot:])  # dims past n_rot pass through


@pytest.mark.cuda
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("n", [1, 7, 83, 100003])
def test_glu_matches_cpu_formula(cu, gelu, n):
    rng = np.random.default_rng(n)
    gate, up = f32(rng.uniform(-8, 8, n)), f32(rng.normal(0, 2, n))
    g = gate.astype(np.float64)
    if gelu:
        act = 0.5 * g * (1 + np.tanh(0.7978845608028654 * (g + 0.044715 * g**3)))
    else:
        act = g / (1 + np.exp(-g))
    ref = act * up
    out = np.empty_like(gate)
    cu.call("tp_cuda_op_test_glu", 0, cu.ptr(out), cu.ptr(gate), cu.ptr(up), n, int(gelu))
    # f32 evaluation: a few ulp of each factor; 1 + tanh(·) cancels for negative g, so its error is a few
    # ulp of 1, i.e. of |g·up| in the output, not of |out|.
    assert (np.abs(out - ref) <= 16 * ULP * (np.abs(g * up) + np.abs(ref))).all()


@pytest.mark.cuda
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 96), (83, 128)])
def test_add_and_add_bias_are_exact(cu, rows, cols):
    rng = np.random.default_rng(rows)
    a, b = f32(rng.normal(0, 1, rows * cols)), f32(rng.normal(0, 1, rows * cols))
    bias = f32(rng.normal(0, 1, cols))
    ref = ((a + b).reshape(rows, cols) + bias).ravel()
    out = np.empty_like(a)
    cu.call("tp_cuda_op_test_add", 0, cu.ptr(out), cu.ptr(a), cu.ptr(b), rows * cols, cu.ptr(bias), cols)
    assert np.array_equal(out, ref)


# ---- embed -----------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize(
    "qtype", ["f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k"]
)
@pytest.mark.parametrize("n", [1, 7, 600])  # 600 > 512: token ids cross a kernel-parameter chunk
def test_embed_matches_cpu_dequantization(cu, qtype, n):
    from turboprefill import quant

    t = quant.GGMLType[qtype.upper()]
    n_rows, cols = 37, 512
    rng = np.random.default_rng(n)
    table = quant.quantize(f32(rng.normal(0, 1, (n_rows, cols))), t)
    tokens = rng.integers(0, n_rows, n).astype(np.int32)
    rows = quant.dequantize(table, t, n_rows * cols).reshape(n_rows, cols)  # the CPU decoders
    scale = np.float32(np.sqrt(640.0))
    ref = rows[tokens] * scale
    out = np.empty((n, cols), dtype=np.float32)
    cu.call(
        "tp_cuda_op_test_embed",
        0,
        cu.ptr(out),
        int(t),
        cu.ffi.cast("void *", table.ctypes.data),
        n_rows,
        cols,
        cu.ptr(tokens, "int32_t *"),
        n,
        float(scale),
    )
    tol = 4e-7 * np.abs(ref).max(axis=1, keepdims=True)
    assert (np.abs(out - ref) <= tol).all()


# ---- attention -------------------------------------------------------------------------------------------


def attention_ref(q, k, v, pos0, n_head_kv, kq_scale, n_swa):
    """float64 causal GQA attention. q [T, H, D]; k, v [S, Hkv·D] (already f16-rounded) -> [T, H·D]."""
    n_tok, n_head, d = q.shape
    kk = np.repeat(k.reshape(-1, n_head_kv, d).astype(np.float64), n_head // n_head_kv, axis=1)
    vv = np.repeat(v.reshape(-1, n_head_kv, d).astype(np.float64), n_head // n_head_kv, axis=1)
    s = np.einsum("thd,shd->hts", q.astype(np.float64), kk) * kq_scale
    dist = (pos0 + np.arange(n_tok))[:, None] - np.arange(k.shape[0])[None, :]
    visible = dist >= 0
    if n_swa:
        visible &= dist < n_swa
    s = np.where(visible[None], s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, vv).reshape(n_tok, n_head * d)


def run_attention(cu, kernel, n_tok, pos0, n_head, n_head_kv, head_dim, n_swa, seed=0):
    rng = np.random.default_rng(seed)
    n_pos, kv_dim = pos0 + n_tok, n_head_kv * head_dim
    q = f32(rng.normal(0, 1, (n_tok, n_head, head_dim)))
    k, v = f32(rng.normal(0, 1, (n_pos, kv_dim))), f32(rng.normal(0, 1, (n_pos, kv_dim)))
    out = np.empty((n_tok, n_head * head_dim), dtype=np.float32)
    kc, vc = np.empty_like(k), np.empty_like(v)
    scale = 1.0 / np.sqrt(head_dim)
    cu.call(
        "tp_cuda_op_test_attention",
        0,
        kernel,
        cu.ptr(out),
        cu.ptr(q),
        cu.ptr(k),
        cu.ptr(v),
        pos0,
        n_tok,
        n_head,
        n_head_kv,
        head_dim,
        scale,
        n_swa,
        cu.ptr(kc),
        cu.ptr(vc),
    )
    k16, v16 = k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
    assert np.array_equal(kc, k16) and np.array_equal(vc, v16)  # the cache is f16, round to nearest even
    return out, attention_ref(q, k16, v16, pos0, n_head_kv, scale, n_swa), np.abs(v16).max()


def tensor_cores_run(head_dim: int) -> bool:
    """Whether KERNEL_AUTO picks the tensor-core kernel on device 0 (sm_80+, head_dim 64/128/256)."""
    major = int(cuda_devices()["gpus"][0]["cc"].split(".")[0])  # "8.6"
    return major >= 8 and head_dim in (64, 128, 256)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", [KERNEL_AUTO, KERNEL_SIMPLE])
@pytest.mark.parametrize("n_swa", [0, 32])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("n_tok,pos0", [(1, 0), (7, 45), (83, 300), (128, 1000)])
def test_attention_matches_float64(cu, kernel, n_swa, gqa, head_dim, n_tok, pos0):
    n_head_kv = 2 if gqa < 8 else 1
    out, ref, vmax = run_attention(
        cu, kernel, n_tok, pos0, gqa * n_head_kv, n_head_kv, head_dim, n_swa, seed=n_tok + head_dim + gqa
    )
    mma = kernel == KERNEL_AUTO and tensor_cores_run(head_dim)
    assert np.abs(out - ref).max() <= (2e-3 if mma else 4e-6) * vmax


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", [KERNEL_AUTO, KERNEL_SIMPLE])
@pytest.mark.parametrize(
    "head_dim,pos0,n_tok,n_swa",
    [
        (64, 49, 30, 0),  # a tile that starts at a warp's last row (pos0 ≡ 1 mod 16)
        (256, 17, 20, 0),
        (64, 112, 40, 50),  # a key tile that ends at the first row's window start
        (64, 45, 30, 15),
    ],
)
def test_attention_tile_edges(cu, kernel, head_dim, pos0, n_tok, n_swa):
    out, ref, vmax = run_attention(cu, kernel, n_tok, pos0, 2, 1, head_dim, n_swa, seed=pos0)
    mma = kernel == KERNEL_AUTO and tensor_cores_run(head_dim)
    assert np.abs(out - ref).max() <= (2e-3 if mma else 4e-6) * vmax


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [32, 48, 80, 96, 200])
def test_attention_other_head_sizes_use_the_f32_kernel(cu, head_dim):
    out, ref, vmax = run_attention(cu, KERNEL_AUTO, 83, 40, 4, 2, head_dim, 16)
    assert np.abs(out - ref).max() <= 4e-6 * vmax


@pytest.mark.cuda
def test_attention_forced_tensor_cores(cu):
    if not tensor_cores_run(128):
        with pytest.raises(DeviceError, match="cudaErrorNotSupported"):
            run_attention(cu, KERNEL_MMA, 7, 3, 4, 1, 128, 0)
        return
    out, ref, vmax = run_attention(cu, KERNEL_MMA, 83, 200, 8, 1, 128, 0)
    assert np.abs(out - ref).max() <= 2e-3 * vmax


@pytest.mark.cuda
def test_attention_is_deterministic(cu):
    a = run_attention(cu, KERNEL_AUTO, 128, 1000, 8, 2, 128, 0, seed=7)[0]
    b = run_attention(cu, KERNEL_AUTO, 128, 1000, 8, 2, 128, 0, seed=7)[0]
    assert np.array_equal(a, b)


@pytest.mark.cuda
def test_attention_rejects_head_dim_above_256(cu):
    with pytest.raises(UnsupportedError, match="head_dim 320"):
        run_attention(cu, KERNEL_AUTO, 3, 0, 2, 1, 320, 0)


# ---- stage hand-off --------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dst", [0, 1])
def test_send_between_stages_is_exact(cu, dst):
    if dst >= gpu_count():
        pytest.skip("needs 2 GPUs")
    x = f32(np.random.default_rng(3).normal(0, 1, 83 * 96))
    out = np.empty_like(x)
    cu.call("tp_cuda_op_test_send", 0, dst, cu.ptr(out), cu.ptr(x), x.size)
    assert np.array_equal(out, x)

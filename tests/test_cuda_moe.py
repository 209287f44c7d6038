"""CUDA gpt-oss ops against numpy references: router_topk, the grouped expert matmul, moe_combine (moe.cu,
matmul_moe.cu), and swiglu_oai, YaRN rope and attention sinks (elementwise.cu, rope.cu, attention*.cu*).

GPU tests (marked ``cuda``), run on emulated GPUs by tests/test_cuda_emulated.py without a GPU. Each calls a
``tp_cuda_op_test_*`` entry point of csrc/backend/cuda/ops_test.cu (one op through a fresh CUDA Ops, outputs
NaN-filled first so a forgotten element — e.g. a slot the routing dropped — fails).

Tolerances, each with its reason (ulp = float32 unit in the last place, U = 2^-24):
- router_topk ids: exact (the CPU's selection, ties to the lower expert; logits with many ties).
  Weights: e^(l_j - l_0) / Σ with expf (<= 2 ulp) and 2k roundings: <= 8 ulp of 1.
- moe_combine: bit-exact with the f32 sum in j order, products rounded first (the Ops contract).
- moe_matmul, int8 types: each slot's row is the int8 group formula of its expert and source row; as for the
  dense matmul (tests/test_cuda_matmul.py) |y - Σ_groups term| (f64 from the C representation) <= the
  worst-case f32 rounding of that sum, plus 2 U·(|y| + |b|) for the bias add. And where the dense matmul takes
  the same kernel (MMQ for more than 8 rows, MMVQ otherwise), the grouped result equals the dense CUDA matmul of
  the same expert and activation row bit for bit: both run one tile/row body (matmul_mmq.cuh, matmul_mmvq.cu).
- moe_matmul, F32 experts: the f32 dot-product bound 2·(k + 2)·U·Σ|w||x| against float64, + the bias add.
- swiglu_oai: same f32 expression as the CPU; expf within 2 ulp: 16 ulp of |g·(u+1)| + |out|.
- YaRN rope: angles in double as on the CPU, the ramp in float: as plain rope, 1e-6 · mscale · max|x|.
- attention with sinks: the float64 reference with the sink in the denominator; the plain-attention bounds of
  tests/test_cuda_ops.py (f32 kernel 4e-6 · max|v|, tensor cores 2e-3 · max|v|) — the sink adds one exp and
  one rescale per row, far below either.
"""

from __future__ import annotations

import cffi
import numpy as np
import pytest
from test_cuda_matmul import cuda_matmul
from test_cuda_ops import KERNEL_AUTO, KERNEL_SIMPLE, ULP, f32, gpu_count, tensor_cores_run
from test_unpack import U, f32_sum_bound, group_terms, make_weights

from turboprefill.quant import GGMLType, dequantize, type_traits

pytestmark = pytest.mark.cuda

T = GGMLType
_CDEF = """
int tp_cuda_op_test_router_topk(int32_t device, int32_t* ids, float* weights, const float* logits, int64_t n_tok,
                                int64_t n_expert, int64_t k);
int tp_cuda_op_test_moe_matmul(int32_t device, float* out, int32_t type, const void* w, int64_t n_expert, int64_t rows,
                               int64_t cols, const float* bias, const float* in, int32_t in_per_slot,
                               const int32_t* ids, int64_t n_tok, int64_t k);
int tp_cuda_op_test_moe_combine(int32_t device, float* out, const float* y, const float* weights, int64_t n_tok,
                                int64_t k, int64_t dim);
int tp_cuda_op_test_glu(int32_t device, float* out, const float* gate, const float* up, int64_t n, int32_t act);
int tp_cuda_op_test_rope_yarn(int32_t device, float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim,
                              int64_t pos0, int32_t neox, int64_t n_rot, float base, float freq_scale,
                              const float* freq_factors, float ext_factor, float mscale, float corr_low,
                              float corr_high);
int tp_cuda_op_test_attention_sinks(int32_t device, int32_t kernel, float* out, const float* q, const float* k,
                                    const float* v, int64_t pos0, int64_t n_tok, int64_t n_head, int64_t n_head_kv,
                                    int64_t head_dim, float kq_scale, int64_t n_swa, const float* sinks,
                                    float* k_cache, float* v_cache);
"""
ACT_SWIGLU_OAI = 2  # tp::Activation::SwigluOai


class MoeOpLib:
    def __init__(self):
        from turboprefill import _native

        self.ffi = cffi.FFI()
        self.ffi.cdef(_CDEF)
        self.lib = self.ffi.dlopen(str(_native._lib_path()))
        self._native = _native
        getattr(self.lib, "tp_cuda_op_test_moe_matmul")  # noqa: B009 -- AttributeError in a build without them

    def ptr(self, a: np.ndarray | None, ctype: str = "float *"):
        if a is None:
            return self.ffi.NULL
        assert a.flags.c_contiguous
        return self.ffi.cast(ctype, a.ctypes.data)

    def call(self, name: str, *args):
        self._native.check(getattr(self.lib, name)(*args))


@pytest.fixture(scope="module")
def cu() -> MoeOpLib:
    if gpu_count() == 0:
        pytest.skip("no CUDA GPU is visible (or this build has no CUDA backend)")
    try:
        return MoeOpLib()
    except AttributeError:
        pytest.skip("this build has no tp_cuda_op_test_* MoE entry points")


# ---- routing and combination ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_tok", [1, 7, 83])
@pytest.mark.parametrize("n_expert,k", [(8, 1), (8, 4), (32, 2), (32, 4), (128, 4)])
def test_router_topk_ids_exact_weights_softmax(cu, n_tok, n_expert, k):
    rng = np.random.default_rng(n_tok * 1000 + n_expert + k)
    # Half-integer logits in a small range: most rows have ties, which must go to the lower expert.
    logits = f32(rng.integers(-4, 5, (n_tok, n_expert)) * 0.5 + (rng.random((n_tok, 1)) < 0.5) * 0.3)
    ids = np.empty(n_tok * k, np.int32)
    w = np.empty(n_tok * k, np.float32)
    cu.call("tp_cuda_op_test_router_topk", 0, cu.ptr(ids, "int32_t *"), cu.ptr(w), cu.ptr(logits), n_tok, n_expert, k)
    ref_ids = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # largest first, stable: lower expert on ties
    assert np.array_equal(ids.reshape(n_tok, k), ref_ids)
    chosen = np.take_along_axis(logits, ref_ids, axis=1).astype(np.float64)
    ref_w = np.exp(chosen - chosen[:, :1])
    ref_w /= ref_w.sum(axis=1, keepdims=True)
    assert np.abs(w.reshape(n_tok, k) - ref_w).max() <= 8 * ULP


@pytest.mark.parametrize("n_tok,k,dim", [(1, 1, 64), (7, 2, 96), (83, 4, 130), (5, 3, 2880)])
def test_moe_combine_is_bit_exact(cu, n_tok, k, dim):
    rng = np.random.default_rng(n_tok + k + dim)
    y = f32(rng.normal(0, 3, (n_tok * k, dim)))
    w = f32(rng.dirichlet(np.ones(k), n_tok).ravel())
    out = np.empty((n_tok, dim), np.float32)
    cu.call("tp_cuda_op_test_moe_combine", 0, cu.ptr(out), cu.ptr(y), cu.ptr(w), n_tok, k, dim)
    yk, wk = y.reshape(n_tok, k, dim), w.reshape(n_tok, k, 1)
    ref = wk[:, 0] * yk[:, 0]  # f32 numpy: every product and sum rounded, j in order
    for j in range(1, k):
        ref = ref + wk[:, j] * yk[:, j]
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


# ---- grouped expert matmul ----------------------------------------------------------------------------------


def route(rng: np.random.Generator, n_tok: int, n_expert: int, k: int) -> np.ndarray:
    """Distinct experts per token, skewed (expert 0 popular: more than one 64-slot tile at 83 tokens) and
    with every third expert never chosen."""
    allowed = np.array([e for e in range(n_expert) if e % 3 != 2])
    p = 1.0 / (1.0 + allowed)
    p /= p.sum()
    return np.stack([rng.choice(allowed, k, replace=False, p=p) for _ in range(n_tok)]).astype(np.int32).ravel()


def moe_call(cu, raw, t, n_expert, rows, cols, bias, x, per_slot, ids, n_tok, k) -> np.ndarray:
    out = np.empty((n_tok * k, rows), np.float32)
    cu.call("tp_cuda_op_test_moe_matmul", 0, cu.ptr(out), int(t), cu.ptr(raw, "void *"), n_expert, rows, cols,
            cu.ptr(bias), cu.ptr(x), int(per_slot), cu.ptr(ids, "int32_t *"), n_tok, k)  # fmt: skip
    assert np.all(np.isfinite(out)), "a slot or row was not written"
    return out


MOE_TYPES = [T.MXFP4, T.Q4_K, T.Q5_0, T.Q8_0, T.F32]


@pytest.mark.parametrize("per_slot", [False, True], ids=["per_token_in", "per_slot_in"])
@pytest.mark.parametrize("n_expert,k", [(8, 1), (32, 2), (8, 4), (32, 4)])
@pytest.mark.parametrize("n_tok", [1, 7, 83])
@pytest.mark.parametrize("t", MOE_TYPES, ids=lambda t: t.name)
def test_moe_matmul_matches_per_slot_reference(cu, t, n_tok, n_expert, k, per_slot):
    rng = np.random.default_rng(int(t) * 7919 + n_tok * 131 + n_expert * 17 + k * 3 + per_slot)
    rows = 70  # not a multiple of the 64-row tile
    cols = 512 if type_traits(t)[0] == 256 else 320  # 320: one full and one partial 256-element k step
    raw = make_weights(t, n_expert * rows, cols, rng)
    rb = raw.size // (n_expert * rows)
    ids = route(rng, n_tok, n_expert, k)
    n_slots = n_tok * k
    n_src = n_slots if per_slot else n_tok
    x = f32(rng.standard_normal((n_src, cols)))
    bias = f32(rng.normal(0, 0.5, (n_expert, rows)))
    src = np.arange(n_slots) if per_slot else np.arange(n_slots) // k

    y = moe_call(cu, raw, t, n_expert, rows, cols, bias, x, per_slot, ids, n_tok, k).astype(np.float64)
    for e in np.unique(ids):
        slots = np.nonzero(ids == e)[0]
        raw_e = raw[e * rows * rb : (e + 1) * rows * rb]
        xs = x[src[slots]]
        b = bias[e].astype(np.float64)
        if t == T.F32:
            w64 = dequantize(raw_e, t, rows * cols).reshape(rows, cols).astype(np.float64)
            ref = xs.astype(np.float64) @ w64.T
            bound = 2.0 * (cols + 2) * U * (np.abs(xs.astype(np.float64)) @ np.abs(w64).T)
        else:
            ref, mag = group_terms(raw_e, t, rows, cols, xs)
            bound = f32_sum_bound(mag, cols // 32)
        bound = bound + 2 * U * (np.abs(ref) + np.abs(b))
        err = np.abs(y[slots] - (ref + b))
        assert np.all(err <= bound), (int(e), float(np.max(err / bound)))


# (n_tok, k, per_slot) where the dense matmul of the n_src input rows takes the grouped call's kernel: MMVQ
# iff n_src <= 8 for the dense one, iff n_tok <= 8 for the grouped one (7 tokens × 4 per-slot rows: no).
SAME_KERNEL = [(1, 4, False), (1, 4, True), (7, 1, True), (7, 4, False), (83, 4, False), (83, 4, True)]


@pytest.mark.parametrize("n_tok,k,per_slot", SAME_KERNEL)
@pytest.mark.parametrize("t", [T.MXFP4, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_moe_matmul_equals_dense_matmul_bitwise(cu, t, n_tok, k, per_slot):
    """Grouping changes nothing: each slot's row is the dense CUDA matmul's row for the same expert and
    activation row, bit for bit (both kernels run the dense kernel's tile/row body)."""
    n_src = n_tok * k if per_slot else n_tok
    rng = np.random.default_rng(int(t) + 10 * n_tok + k)
    n_expert, rows = 8, 70
    cols = 512 if type_traits(t)[0] == 256 else 320
    raw = make_weights(t, n_expert * rows, cols, rng)
    rb = raw.size // (n_expert * rows)
    ids = route(rng, n_tok, n_expert, k)
    x = f32(rng.standard_normal((n_src, cols)))
    src = np.arange(n_tok * k) if per_slot else np.arange(n_tok * k) // k
    y = moe_call(cu, raw, t, n_expert, rows, cols, None, x, per_slot, ids, n_tok, k)
    counts = np.bincount(ids, minlength=n_expert)
    used = np.nonzero(counts)[0]
    for e in {int(used[np.argmax(counts[used])]), int(used[np.argmin(counts[used])])}:  # busiest, quietest
        dense = cuda_matmul(0, raw[e * rows * rb : (e + 1) * rows * rb], t, rows, cols, x)
        slots = np.nonzero(ids == e)[0]
        assert np.array_equal(y[slots].view(np.uint32), dense[src[slots]].view(np.uint32)), e


# ---- swiglu_oai, YaRN rope, attention sinks -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 83, 100003])
def test_swiglu_oai_matches_cpu_formula(cu, n):
    rng = np.random.default_rng(n + 5)
    gate, up = f32(rng.uniform(-10, 10, n)), f32(rng.uniform(-10, 10, n))  # past the ±7 clamps both ways
    g = np.minimum(gate.astype(np.float64), 7.0)
    u = np.clip(up.astype(np.float64), -7.0, 7.0)
    ref = g / (1 + np.exp(-1.702 * g)) * (u + 1)
    out = np.empty_like(gate)
    cu.call("tp_cuda_op_test_glu", 0, cu.ptr(out), cu.ptr(gate), cu.ptr(up), n, ACT_SWIGLU_OAI)
    assert (np.abs(out - ref) <= 16 * ULP * (np.abs(g * (u + 1)) + np.abs(ref))).all()


def rope_yarn_ref(x, pos0, n_rot, base, freq_scale, neox, ext, mscale, lo, hi):
    """The CPU backend's YaRN rope (cpu_ops.cpp rope_theta): angles in double, ramp in float."""
    half = n_rot // 2
    kk = np.arange(half)
    pos = np.arange(pos0, pos0 + x.shape[0], dtype=np.float64)[:, None]
    theta_e = pos * np.power(np.float64(base), -2.0 * kk.astype(np.float64) / n_rot)
    y = (kk.astype(np.float32) - np.float32(lo)) / np.float32(max(np.float32(0.001), np.float32(hi) - np.float32(lo)))
    ramp = ((np.float32(1) - np.clip(y, np.float32(0), np.float32(1))) * np.float32(ext)).astype(np.float64)
    theta = np.float64(np.float32(freq_scale)) * theta_e * (1.0 - ramp) + theta_e * ramp
    c = (np.cos(theta).astype(np.float32) * np.float32(mscale))[:, None, :]
    s = (np.sin(theta).astype(np.float32) * np.float32(mscale))[:, None, :]
    ia = np.arange(half) if neox else np.arange(0, n_rot, 2)
    ib = ia + half if neox else ia + 1
    out = x.copy()
    a, b = x[..., ia], x[..., ib]
    out[..., ia] = a * c - b * s
    out[..., ib] = a * s + b * c
    return out


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_tok,n_heads,head_dim,pos0", [(1, 1, 64, 0), (7, 3, 64, 5), (83, 2, 128, 70000)])
def test_rope_yarn_matches_cpu_formula(cu, neox, n_tok, n_heads, head_dim, pos0):
    # gpt-oss's values: base 150000, factor 32 (freq_scale 1/32), mscale 0.1·ln(32) + 1, ramp over pairs 8..18.
    rng = np.random.default_rng(n_tok + pos0)
    x = f32(rng.normal(0, 1, (n_tok, n_heads, head_dim)))
    base, fs, ext, mscale, lo, hi = 150000.0, 1 / 32, 1.0, 1.3465736, 8.09, 17.39
    ref = rope_yarn_ref(x, pos0, head_dim, base, fs, neox, ext, mscale, lo, hi)
    got = x.copy()
    cu.call("tp_cuda_op_test_rope_yarn", 0, cu.ptr(got), n_tok, n_heads, head_dim, pos0, int(neox), head_dim, base,
            fs, cu.ptr(None), ext, mscale, lo, hi)  # fmt: skip
    assert np.abs(got - ref).max() <= 1e-6 * mscale * np.abs(x).max()
    # The ramp matters: plain RoPE at freq_scale is visibly different (guards a dropped YaRN branch).
    plain = rope_yarn_ref(x, pos0, head_dim, base, fs, neox, 0.0, 1.0, lo, hi)
    assert n_tok == 1 and pos0 == 0 or np.abs(got - plain).max() > 1e-3


def attention_sinks_ref(q, k, v, pos0, n_head_kv, kq_scale, n_swa, sinks):
    """float64 causal GQA attention whose softmax denominator has one more term e^(sink_h) per head."""
    n_tok, n_head, d = q.shape
    kk = np.repeat(k.reshape(-1, n_head_kv, d).astype(np.float64), n_head // n_head_kv, axis=1)
    vv = np.repeat(v.reshape(-1, n_head_kv, d).astype(np.float64), n_head // n_head_kv, axis=1)
    s = np.einsum("thd,shd->hts", q.astype(np.float64), kk) * kq_scale
    dist = (pos0 + np.arange(n_tok))[:, None] - np.arange(k.shape[0])[None, :]
    visible = dist >= 0
    if n_swa:
        visible &= dist < n_swa
    s = np.where(visible[None], s, -np.inf)
    sk = sinks.astype(np.float64)[:, None, None]
    m = np.maximum(s.max(axis=-1, keepdims=True), sk)
    p = np.exp(s - m)
    p /= p.sum(axis=-1, keepdims=True) + np.exp(sk - m)
    return np.einsum("hts,shd->thd", p, vv).reshape(n_tok, n_head * d)


@pytest.mark.parametrize("kernel", [KERNEL_AUTO, KERNEL_SIMPLE], ids=["auto", "f32"])
@pytest.mark.parametrize("n_swa", [0, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n_tok,pos0", [(1, 0), (7, 45), (83, 300)])
def test_attention_with_sinks_matches_float64(cu, kernel, n_swa, head_dim, n_tok, pos0):
    rng = np.random.default_rng(n_tok + head_dim + n_swa)
    n_head, n_head_kv = 8, 2
    n_pos, kv_dim = pos0 + n_tok, n_head_kv * head_dim
    q = f32(rng.normal(0, 1, (n_tok, n_head, head_dim)))
    k, v = f32(rng.normal(0, 1, (n_pos, kv_dim))), f32(rng.normal(0, 1, (n_pos, kv_dim)))
    # Sinks below, near and far above the scores (the last takes most of the mass: the "sink > max" branch).
    sinks = f32([-20.0, -1.0, 0.0, 0.5, 1.5, 3.0, 6.0, 20.0])
    out = np.empty((n_tok, n_head * head_dim), np.float32)
    scale = 1.0 / np.sqrt(head_dim)
    cu.call("tp_cuda_op_test_attention_sinks", 0, kernel, cu.ptr(out), cu.ptr(q), cu.ptr(k), cu.ptr(v), pos0, n_tok,
            n_head, n_head_kv, head_dim, scale, n_swa, cu.ptr(sinks), cu.ptr(None), cu.ptr(None))  # fmt: skip
    k16, v16 = k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
    ref = attention_sinks_ref(q, k16, v16, pos0, n_head_kv, scale, n_swa, sinks)
    vmax = np.abs(v16).max()
    mma = kernel == KERNEL_AUTO and tensor_cores_run(head_dim)
    tol = (2e-3 if mma else 4e-6) * vmax
    assert np.abs(out - ref).max() <= tol
    # The check can fail: without the sinks the result is off by far more than the tolerance.
    no_sink = attention_sinks_ref(q, k16, v16, pos0, n_head_kv, scale, n_swa, f32(np.full(n_head, -np.inf)))
    assert np.abs(no_sink - ref).max() > 10 * tol

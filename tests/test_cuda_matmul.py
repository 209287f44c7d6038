"""CUDA matmul (csrc/backend/cuda/matmul*.cu) against the CPU, for every weight type on awkward shapes.

Skipped without a GPU (or in a build without CUDA). With one, tp_cuda_matmul_test (matmul_test.cu: copy in,
tp_matmul_cuda, copy out; output pre-filled with NaN so a missed element fails) runs every path: the
matrix-vector kernels for n_tok <= 8, the tiled kernels above, tiles cut by rows 7/83/130 and n_tok
9/83/200, legacy k = 416 (a partial 256-element k step). Tolerances, each from a stated rule:
  * int8 types, same math: the GPU sums the same exact integer group dots with the same f32 formula as
    the CPU reference (tests/test_unpack.py), so |y_gpu - Σ_groups term| (f64 emulation from the C
    representation) must stay within the worst-case f32 rounding of that sum.
  * int8 types, accuracy: relative error against the f64 product of dequantized weights and unquantized x
    (and against tp_cpu_matmul) ≤ INT8_ERR_RATIO × the error of the same int8 activation quantization
    done in numpy, plus the f32 rounding bound.
  * F32/F16/BF16: |y_gpu - y_f64| ≤ 2·(k + 2)·u·Σ|w||x| elementwise (the f32 dot-product bound, ×2 for
    the FMA contractions either compiler may choose), and the same against tp_cpu_matmul doubled.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_unpack import (
    INT8_ERR_RATIO,
    INT8_TYPES,
    U,
    f32_sum_bound,
    ffi,
    group_terms,
    lib,
    make_weights,
    quantize_act_np,
)

import turboprefill
import turboprefill._native as native
from turboprefill._native import check
from turboprefill.errors import DeviceError, UnsupportedError
from turboprefill.quant import GGMLType, dequantize, type_traits

pytestmark = pytest.mark.cuda

T = GGMLType
FLOAT_TYPES = [T.F32, T.F16, T.BF16]
ALL_TYPES = FLOAT_TYPES + INT8_TYPES
ROWS = [1, 7, 83, 130]
N_TOK = [1, 3, 8, 9, 83, 200]


@pytest.fixture(scope="module")
def device() -> int:
    """Index of the first GPU; skips the module without one."""
    try:
        gpus = turboprefill.cuda_devices().get("gpus", [])
    except (UnsupportedError, DeviceError) as e:  # CPU-only build / no driver
        pytest.skip(f"no CUDA device: {e}")
    if not gpus:
        pytest.skip("no CUDA device visible")
    try:
        lib.tp_cuda_matmul_test  # noqa: B018 - resolving the symbol is the check
    except AttributeError:
        pytest.skip("library built without the CUDA matmul")
    return int(gpus[0]["index"])


def cuda_matmul(dev: int, raw: np.ndarray, t: int, rows: int, k: int, x: np.ndarray) -> np.ndarray:
    y = np.empty((x.shape[0], rows), np.float32)
    check(
        lib.tp_cuda_matmul_test(
            dev,
            int(t),
            ffi.from_buffer("uint8_t[]", raw),
            rows,
            k,
            ffi.from_buffer("float[]", x),
            x.shape[0],
            ffi.from_buffer("float[]", y),
        )
    )
    return y


def cpu_matmul(raw: np.ndarray, t: int, rows: int, k: int, x: np.ndarray) -> np.ndarray:
    y = np.empty((x.shape[0], rows), np.float32)
    check(
        native.lib.tp_cpu_matmul(
            int(t),
            native.ffi.from_buffer("uint8_t[]", raw),
            rows,
            k,
            native.ffi.from_buffer("float[]", x),
            x.shape[0],
            native.ffi.from_buffer("float[]", y),
            2,
        )
    )
    return y


def k_for(t: int) -> int:
    block = type_traits(t)[0]
    return 512 if block == 256 else 416  # 416 = 13 groups: one full and one partial 256-element k step


def rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("n_tok", N_TOK)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_cuda_matmul_matches_cpu(device, t, rows, n_tok):
    """Every type, path and tile edge: the GPU result agrees with the CPU by the rules in the module doc."""
    rng = np.random.default_rng(1000 * int(t) + 10 * rows + n_tok)
    k = k_for(t)
    raw = make_weights(t, rows, k, rng)
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    y = cuda_matmul(device, raw, t, rows, k, x)
    assert np.all(np.isfinite(y)), "an output element was not written"
    y_cpu = cpu_matmul(raw, t, rows, k, x).astype(np.float64)
    w64 = dequantize(raw, t, rows * k).reshape(rows, k).astype(np.float64)
    y64 = x.astype(np.float64) @ w64.T

    if t in FLOAT_TYPES:
        bound = 2.0 * (k + 2) * U * (np.abs(x.astype(np.float64)) @ np.abs(w64).T)
        assert np.all(np.abs(y - y64) <= bound), float(np.max(np.abs(y - y64) / bound))
        assert np.all(np.abs(y - y_cpu) <= 2.0 * bound)
        return

    emul, mag = group_terms(raw, t, rows, k, x)
    bound = f32_sum_bound(mag, k // 32)
    err = np.abs(y - emul)
    assert np.all(err <= bound), float(np.max(err / bound))

    q_np, d_np = quantize_act_np(x)
    xq64 = (q_np.reshape(-1, 32).astype(np.float64) * d_np[:, None].astype(np.float64)).reshape(n_tok, k)
    y_base = xq64 @ w64.T
    floor = float(np.linalg.norm(bound))
    for ref in (y64, y_cpu):
        base = rel(y_base, ref)
        assert rel(y, ref) <= INT8_ERR_RATIO * base + floor / np.linalg.norm(ref), (rel(y, ref), base)


@pytest.mark.parametrize("n_tok", [1, 9])
@pytest.mark.parametrize("t", FLOAT_TYPES, ids=lambda t: t.name)
def test_cuda_matmul_float_odd_k(device, t, n_tok):
    """Float weights have 1-element blocks: k = 45 (not a multiple of 32) exercises the k-edge guards."""
    rng = np.random.default_rng(int(t) + n_tok)
    rows, k = 70, 45
    raw = make_weights(t, rows, k, rng)
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    y = cuda_matmul(device, raw, t, rows, k, x)
    w64 = dequantize(raw, t, rows * k).reshape(rows, k).astype(np.float64)
    y64 = x.astype(np.float64) @ w64.T
    bound = 2.0 * (k + 2) * U * (np.abs(x.astype(np.float64)) @ np.abs(w64).T)
    assert np.all(np.abs(y - y64) <= bound)


def test_cuda_matmul_rejects_partial_blocks(device):
    """k that is not a whole number of blocks is the caller's error, reported before any device work."""
    raw = np.zeros(144, np.uint8)
    x = np.zeros((1, 128), np.float32)
    with pytest.raises(ValueError, match="multiple of the Q4_K block size"):
        cuda_matmul(device, raw, T.Q4_K, 1, 128, x)

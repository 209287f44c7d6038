"""Block formats (csrc/quant) through turboprefill.quant: decoders, reference quantizers, error bounds.

Oracles we did not write: the `gguf` package's numpy (de)quantizers for every decoder and for the legacy
quantizers, and — when `llama-cpp-python` is installed — ggml's own `ggml_quantize_chunk` for the K-quants,
which `gguf` cannot quantize. Decoders and quantizers are compared bit for bit (GGUF_SPEC §6); the round-trip
error bounds are measured values plus a stated margin.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

import gguf
import numpy as np
import pytest

from turboprefill._native import ffi, lib
from turboprefill.errors import UnsupportedError
from turboprefill.quant import GGMLType, dequantize, quantize, type_traits

T = GGMLType
DECODABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4]
LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4]  # 32-element blocks
UNIFORM_LEGACY = LEGACY[:-1]  # evenly spaced levels (MXFP4's E2M1 grid is not)
K_QUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]
QUANTIZABLE = [T.F32, T.F16, T.BF16, *LEGACY, *K_QUANTS]

# Byte offsets of the f16 scale fields inside one block (GGUF_SPEC §2.1).
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.MXFP4: [],  # MXFP4: every E8M0 byte is a finite scale
}  # fmt: skip


def bits(a: np.ndarray) -> np.ndarray:
    """Float32 bit patterns, so that equality also checks the sign of zero."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def roundtrip(x: np.ndarray, t: GGMLType) -> np.ndarray:
    return dequantize(quantize(x, t).ravel(), t, x.size).reshape(x.shape)


def rel_rmse(y: np.ndarray, x: np.ndarray) -> float:
    return float(
        np.sqrt(np.mean((y.astype(np.float64) - x) ** 2)) / np.sqrt(np.mean(x.astype(np.float64) ** 2))
    )


def random_blocks(t: GGMLType, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Raw blocks of random bytes whose f16 scales are finite, of moderate size and either sign."""
    _, block_bytes, _ = type_traits(t)
    if t in (T.F16, T.BF16):  # random finite patterns, subnormals included; exponent 0x1f / 0xff excluded
        h = rng.integers(0, 1 << 16, n_blocks, dtype=np.uint16)
        exp_mask = np.uint16(0x7C00) if t == T.F16 else np.uint16(0x7F80)
        h[(h & exp_mask) == exp_mask] &= np.uint16(0xBFFF)  # clear the top exponent bit
        return h.view(np.uint8)
    if t == T.F32:
        return rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8)
    raw = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for off in F16_FIELDS[t]:
        scale = (
            rng.uniform(0.5, 1.0, n_blocks)
            * np.exp2(rng.integers(-14, 3, n_blocks))
            * rng.choice([-1, 1], n_blocks)
        )
        raw[:, off : off + 2] = scale.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw.ravel()


# ---- (a) decoders vs gguf ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_blocks", [1, 3, 17, 256])
@pytest.mark.parametrize("t", DECODABLE, ids=lambda t: t.name)
def test_dequantize_matches_gguf_bit_exact(t, n_blocks):
    """Every decoder reproduces gguf.quants.dequantize exactly (same f32 operations in the same order)."""
    rng = np.random.default_rng(1000 * int(t) + n_blocks)
    block_elems, _, _ = type_traits(t)
    raw = random_blocks(t, n_blocks, rng)
    ours = dequantize(raw, t, n_blocks * block_elems)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(t))).ravel()
    assert ours.shape == ref.shape
    assert np.array_equal(bits(ours), bits(ref))


@pytest.mark.parametrize("t", list(T), ids=lambda t: t.name)
def test_type_traits_match_gguf_sizes(t):
    """Block geometry of every type id agrees with gguf's GGML_QUANT_SIZES table."""
    block_elems, block_bytes, name = type_traits(t)
    assert (block_elems, block_bytes) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(t))]
    assert name == t.name


# ---- (b) legacy quantizers vs gguf ------------------------------------------------------------------------


def legacy_inputs(rng: np.random.Generator, rows: int, n: int) -> dict[str, np.ndarray]:
    return {
        "gauss": rng.standard_normal((rows, n)).astype(np.float32),
        "skewed": rng.uniform(-3.0, 1.0, (rows, n)).astype(np.float32),
        # small integers and half-integers put x/d on exact .5 ties and tie |max| between signs
        "ints": rng.integers(-8, 9, (rows, n)).astype(np.float32),
        "halves": (rng.integers(-40, 41, (rows, n)) / 2).astype(np.float32),
        "tiny": (rng.standard_normal((rows, n)) * 1e-6).astype(np.float32),  # f16 scales go subnormal
        # +0.0 only: on blocks of signed zeros gguf picks a zero scale of the other sign than ggml (which we
        # follow); the ggml comparison below covers -0.0
        "sparse": np.where(rng.random((rows, n)) < 0.1, rng.standard_normal((rows, n)), 0.0).astype(
            np.float32
        ),
    }


@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (3, 4096)])
@pytest.mark.parametrize("t", [*LEGACY, T.BF16, T.F16], ids=lambda t: t.name)
def test_quantize_matches_gguf_bit_exact(t, shape):
    """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/BF16/F16 bytes equal gguf.quants.quantize (ggml's reference quantizers)."""
    rng = np.random.default_rng(int(t) * 7 + shape[1])
    qt = gguf.GGMLQuantizationType(int(t))
    for name, x in legacy_inputs(rng, *shape).items():
        ours = quantize(x, t)
        ref = np.ascontiguousarray(gguf.quants.quantize(x, qt)).view(np.uint8).reshape(ours.shape)
        assert np.array_equal(ours, ref), f"{t.name} differs from gguf on {name} input"


def test_bf16_rounding_and_nan():
    """BF16 rounds to nearest even, overflows to inf, and keeps NaN quiet (ggml_compute_fp32_to_bf16)."""
    u = np.array(
        [
            0x3F808000,
            0x3F818000,
            0x3F80C000,
            0x7F7FFFFF,
            0x7F800000,
            0xFF800000,
            0x7F800001,
            0xFFC00000,
            0x80000000,
        ],
        dtype=np.uint32,
    )
    x = np.zeros(32, dtype=np.uint32)
    x[: u.size] = u
    got = quantize(x.view(np.float32).reshape(1, -1), T.BF16).view(np.uint16)[0, : u.size]
    want = [0x3F80, 0x3F82, 0x3F81, 0x7F80, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x8000]
    assert [hex(v) for v in got] == [hex(v) for v in want]


# ---- (c) round-trip error, edge cases, argument checks -----------------------------------------------------

# rel-RMSE bounds on N(0, 1) data (64 x 4096). Measured (3 seeds): Q4_K 0.0715, Q5_K 0.0362, Q6_K 0.0178,
# Q8_0 0.0054, Q5_0 0.0428. Each bound is the measurement + ~10%: the seeds vary by < 0.5%, so a bound this
# tight still catches a quantizer that silently degrades to the next-coarser level grid (Q4_0 gives 0.086).
ERROR_BOUNDS = {
    T.Q4_K: 0.08,  # 16 levels with a fitted per-32 scale and min
    T.Q5_K: 0.04,  # 32 levels: about half the Q4_K error
    T.Q6_K: 0.02,  # 64 signed levels per 16 elements with int8 sub-scales
    T.Q8_0: 0.006,  # 255 levels over ±amax of 32 values: step/sqrt(12) relative to sigma ≈ 0.005
    T.Q5_0: 0.047,  # 32 symmetric levels over ±amax, no fitted min
    T.MXFP4: 0.13,  # 15 non-uniform E2M1 levels and a power-of-two scale (measured 0.118)
}


@pytest.mark.parametrize("t", list(ERROR_BOUNDS), ids=lambda t: t.name)
def test_roundtrip_error_gaussian(t):
    rng = np.random.default_rng(42)
    x = rng.standard_normal((64, 4096)).astype(np.float32)
    err = rel_rmse(roundtrip(x, t), x)
    assert err < ERROR_BOUNDS[t], f"{t.name} rel-RMSE {err:.5f}"
    assert err > ERROR_BOUNDS[t] / 2, (
        f"{t.name} rel-RMSE {err:.5f} is implausibly small: are we testing a copy?"
    )


@pytest.mark.parametrize("t", QUANTIZABLE, ids=lambda t: t.name)
def test_zero_rows_decode_to_zero(t):
    x = np.zeros((3, 512), dtype=np.float32)
    assert np.array_equal(roundtrip(x, t), x)


@pytest.mark.parametrize("c", [0.7, -1.3, 3.0, -250.0])
@pytest.mark.parametrize("t", [*UNIFORM_LEGACY, *K_QUANTS], ids=lambda t: t.name)
def test_constant_rows(t, c):
    """A constant lands exactly on a level, so the only error is the f16 rounding of one scale."""
    x = np.full((2, 512), c, dtype=np.float32)
    y = roundtrip(x, t)
    assert np.all(np.abs(y - c) <= abs(c) * (2.0**-11 + 1e-6))  # one f16 rounding: 11 significant bits


@pytest.mark.parametrize("t", [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q5_0], ids=lambda t: t.name)
def test_outlier_stays_in_its_block(t):
    """One huge value is itself reproduced and cannot disturb other blocks (scales are per block)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 4096)).astype(np.float32)
    pos, big = 1000, 1e4
    x[0, pos] = big
    y = roundtrip(x, t)
    # f16 scale rounding (<= 2^-11) plus the least-squares fit's residual at the top level; measured <= 3.7e-4
    assert abs(y[0, pos] - big) / big < 2e-3
    block_elems = type_traits(t)[0]
    outside = np.ones(4096, dtype=bool)
    outside[pos // block_elems * block_elems : (pos // block_elems + 1) * block_elems] = False
    assert rel_rmse(y[0, outside], x[0, outside]) < ERROR_BOUNDS[t]


@pytest.mark.parametrize("t", QUANTIZABLE, ids=lambda t: t.name)
def test_many_rows_are_split_without_changing_bytes(t):
    """quantize_rows splits large inputs over threads; every row must equal its single-row quantization."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((48, 8192)).astype(np.float32)  # 393K elements: above the threading threshold
    whole = quantize(x, t)
    for r in (0, 23, 47):
        assert np.array_equal(whole[r], quantize(x[r : r + 1], t)[0])


@pytest.mark.parametrize("t", [*LEGACY, *K_QUANTS], ids=lambda t: t.name)
def test_row_length_not_a_block_multiple(t):
    block_elems = type_traits(t)[0]
    with pytest.raises(ValueError, match="block size"):
        quantize(np.zeros((2, block_elems + 16), dtype=np.float32), t)
    with pytest.raises(ValueError, match="whole number"):
        dequantize(np.zeros(type_traits(t)[1], dtype=np.uint8), t, block_elems + 16)


def test_argument_checks():
    x = np.ones((2, 256), dtype=np.float32)
    with pytest.raises(ValueError, match="2-D"):
        quantize(x.ravel(), T.Q4_K)
    with pytest.raises(ValueError, match="bytes"):
        dequantize(np.zeros(100, dtype=np.uint8), T.Q4_K, 256)
    with pytest.raises(ValueError, match="unknown ggml type"):
        type_traits(99)
    with pytest.raises(UnsupportedError, match="Q2_K"):
        quantize(x, T.Q2_K)
    with pytest.raises(UnsupportedError, match="Q3_K"):
        dequantize(np.zeros(110, dtype=np.uint8), T.Q3_K, 256)
    bad = x.copy()
    bad[1, 17] = np.nan
    with pytest.raises(ValueError, match="row 1, column 17"):
        quantize(bad, T.Q8_0)


def test_c_abi_checks_destination_size():
    """tp_quantize refuses a destination smaller than n_rows * row_bytes (the C caller's classic mistake)."""
    x = np.ones((2, 256), dtype=np.float32)
    dst = np.zeros(2 * 144 - 1, dtype=np.uint8)
    src, out = ffi.from_buffer("float[]", x), ffi.from_buffer("uint8_t[]", dst)
    status = lib.tp_quantize(int(T.Q4_K), src, 2, 256, out, dst.nbytes)
    assert status == 1  # TP_ERR_INVALID_ARGUMENT
    assert "destination holds 287 bytes" in ffi.string(lib.tp_last_error()).decode()


# ---- (d) K-quants vs ggml itself ---------------------------------------------------------------------------


def _ggml_base():
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        pytest.skip("llama-cpp-python is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "lib", "libggml-base.so")
    if not os.path.exists(path):
        pytest.skip(f"no {path}")
    g = ctypes.CDLL(path)
    g.ggml_quantize_chunk.restype = ctypes.c_size_t
    g.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    return g


def ggml_quantize(g, x: np.ndarray, t: GGMLType) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    block_elems, block_bytes, _ = type_traits(t)
    out = np.zeros((x.shape[0], x.shape[1] // block_elems * block_bytes), dtype=np.uint8)
    n = g.ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    assert n == out.nbytes
    return out


def ggml_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    shape = (16, 2048)
    xs = legacy_inputs(rng, *shape)
    xs["heavy_tail"] = rng.standard_t(2, shape).astype(np.float32)
    xs["positive"] = (np.abs(rng.standard_normal(shape)) + 0.5).astype(np.float32)  # min clamps to 0
    xs["large"] = (rng.standard_normal(shape) * 1e4).astype(np.float32)
    xs["signed_zeros"] = (rng.standard_normal(shape) * (rng.random(shape) < 0.05)).astype(np.float32)
    special = rng.standard_normal(shape).astype(np.float32)
    special[0] = 0.0  # all-zero row
    special[1] = -1.3  # constant negative row (degenerate max == min)
    special[2, 300] = 1e4  # outlier: other sub-blocks' 6-bit scales round to 0
    special[3, :16] = 0.0  # one all-zero Q6_K group inside a live block
    xs["special"] = special
    return xs


@pytest.mark.slow
@pytest.mark.parametrize("t", [*K_QUANTS, *LEGACY, T.BF16, T.F16], ids=lambda t: t.name)
def test_quantize_matches_ggml_bit_exact(t):
    """Our bytes equal ggml_quantize_chunk's (reference path, no imatrix) on varied and degenerate inputs."""
    g = _ggml_base()
    rng = np.random.default_rng(11 + int(t))
    for name, x in ggml_inputs(rng).items():
        ours, ref = quantize(x, t), ggml_quantize(g, x, t)
        diff = np.nonzero((ours != ref).any(axis=1))[0]
        assert diff.size == 0, f"{t.name} differs from ggml on {name} input, rows {diff[:8]}"

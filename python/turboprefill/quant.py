"""numpy wrappers over the engine's block formats: type ids, traits, reference quantize and dequantize.

Thin by design (the C ABI does the work): shapes and dtypes are checked here so that mistakes surface as
ValueErrors that name the offending size, then buffers go to ``tp_quantize`` / ``tp_dequantize``.
The quantizers are bit-exact with ggml's reference (no-imatrix) quantizers; see tests/test_quant.py.
"""

from __future__ import annotations

import enum

import numpy as np

from ._native import check, ffi, lib


class GGMLType(enum.IntEnum):
    """ggml tensor type ids, identical to ggml's ``enum ggml_type`` and to ``tp_type``."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    BF16 = 30
    MXFP4 = 39


def type_traits(t: int) -> tuple[int, int, str]:
    """(elements per block, bytes per block, name) of a type id; ValueError for an unknown id."""
    elems = ffi.new("int64_t*")
    nbytes = ffi.new("int64_t*")
    name = ffi.new("const char**")
    check(lib.tp_type_traits(int(t), elems, nbytes, name))
    return int(elems[0]), int(nbytes[0]), ffi.string(name[0]).decode()


def row_bytes(t: int, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` elements (a whole number of blocks)."""
    block_elems, block_bytes, name = type_traits(t)
    if n_per_row % block_elems != 0:
        raise ValueError(f"{name}: row length {n_per_row} is not a multiple of the block size {block_elems}")
    return n_per_row // block_elems * block_bytes


def quantize(x: np.ndarray, t: int) -> np.ndarray:
    """Quantize a float32 matrix [rows, n_per_row] row by row; returns uint8 [rows, row_bytes]."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"quantize: expected a 2-D array [rows, n_per_row], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"quantize: expected a floating-point array, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n_per_row = x.shape
    block_elems, _, name = type_traits(t)
    if n_per_row == 0 or n_per_row % block_elems != 0:
        raise ValueError(
            f"quantize: row length {n_per_row} is not a positive multiple of the {name} block size "
            f"{block_elems}"
        )
    rb = row_bytes(t, n_per_row)
    out = np.empty((rows, rb), dtype=np.uint8)
    check(
        lib.tp_quantize(
            int(t),
            ffi.from_buffer("float[]", x),
            rows,
            n_per_row,
            ffi.from_buffer("uint8_t[]", out),
            out.nbytes,
        )
    )
    return out


def dequantize(data: np.ndarray, t: int, n_elements: int) -> np.ndarray:
    """Decode ``n_elements`` values (a whole number of blocks) from the raw bytes ``data``; float32 1-D."""
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise ValueError(f"dequantize: expected a uint8 array of raw block bytes, got dtype {data.dtype}")
    block_elems, block_bytes, name = type_traits(t)
    if n_elements < 0 or n_elements % block_elems != 0:
        raise ValueError(
            f"dequantize: {n_elements} elements is not a whole number of {name} blocks "
            f"({block_elems} per block)"
        )
    need = n_elements // block_elems * block_bytes
    if data.nbytes != need:
        raise ValueError(f"dequantize: {n_elements} {name} elements take {need} bytes, got {data.nbytes}")
    data = np.ascontiguousarray(data)
    out = np.empty(n_elements, dtype=np.float32)
    check(
        lib.tp_dequantize(
            int(t), ffi.from_buffer("uint8_t[]", data), n_elements, ffi.from_buffer("float[]", out)
        )
    )
    return out

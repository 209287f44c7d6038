"""GGUF header, metadata and tensor table as Python objects, read by the engine's own C++ reader."""

from __future__ import annotations

import json
import os

from ._native import check, ffi, lib


def describe_gguf(path: str | os.PathLike) -> dict:
    """Return ``{"version", "alignment", "data_offset", "file_size", "metadata": {...}, "tensors": [...]}``.

    No tensor data is read. Raises FormatError for a broken file, OSError when it cannot be opened.
    """
    out = ffi.new("char **")
    check(lib.tp_gguf_describe_json(os.fsencode(os.fspath(path)), out))
    try:
        raw = ffi.string(out[0])
    finally:
        lib.tp_free(out[0])
    return json.loads(raw.decode("utf-8", "surrogateescape"))

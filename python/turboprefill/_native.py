"""cffi (ABI mode) binding over csrc/include/turboprefill.h.

Holds no logic: it finds the shared library, declares the C ABI from the installed header, and turns a
non-OK ``tp_status`` into the matching Python exception carrying ``tp_last_error()``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import cffi

from .errors import (
    CancelledError,
    ContextOverflowError,
    DeviceError,
    FormatError,
    TurboPrefillError,
    UnsupportedError,
)

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent.parent


def _find(names: list[str], dirs: list[Path]) -> Path:
    for d in dirs:
        for n in names:
            p = d / n
            if p.exists():
                return p
    raise ImportError(
        f"turboprefill: cannot find {names[0]} in {[str(d) for d in dirs]}; "
        "install the package with `pip install .` or build it with `cmake -B build && cmake --build build`"
    )


def _lib_path() -> Path:
    env = os.environ.get("TURBOPREFILL_LIB")
    if env:
        return Path(env)
    return _find(["libturboprefill.so", "libturboprefill.dylib", "turboprefill.dll"], [_HERE, _REPO / "build"])


def _header_path() -> Path:
    return _find(["turboprefill.h"], [_HERE, _REPO / "csrc" / "include"])


def _cdef_from_header(text: str) -> str:
    """Turn the public header into something cffi's cdef parser accepts (no preprocessor)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    # The declarations sit between the opening and the closing `#ifdef __cplusplus` guards.
    body = text.split('extern "C" {', 1)[1].split("#endif", 1)[1].rsplit("#ifdef __cplusplus", 1)[0]
    out = []
    skipping = 0
    for line in body.splitlines():
        s = line.strip()
        if s.startswith("#if"):
            skipping += 1
            continue
        if s.startswith("#endif"):
            skipping -= 1
            continue
        if skipping or s.startswith("#else"):
            continue
        if s.startswith("#define") and not re.match(r"#define\s+\w+\s+\d+\s*$", s):
            continue
        out.append(line.replace("TP_API ", ""))
    return "\n".join(out)


ffi = cffi.FFI()
ffi.cdef(_cdef_from_header(_header_path().read_text()))
lib = ffi.dlopen(str(_lib_path()))

_ERRORS = {
    1: ValueError,  # TP_ERR_INVALID_ARGUMENT
    2: OSError,  # TP_ERR_IO
    3: FormatError,
    4: UnsupportedError,
    5: MemoryError,
    6: ContextOverflowError,
    7: DeviceError,
    8: CancelledError,
}


def last_error() -> str:
    return ffi.string(lib.tp_last_error()).decode("utf-8", "replace")


def check(status: int, message: str | None = None) -> None:
    """Raise the exception matching a tp_status (no-op for TP_OK). The message is tp_last_error() of the
    calling thread unless given (it must be read on the thread that made the failing call)."""
    if status == 0:
        return
    exc = _ERRORS.get(int(status), TurboPrefillError)
    msg = message if message is not None else last_error()
    raise exc(msg or f"turboprefill: error status {int(status)}")

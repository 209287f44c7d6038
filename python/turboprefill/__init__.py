"""TurboPrefill: pipelined long-prompt prefill for GGUF LLMs split by layers across devices.

    from turboprefill import Engine
    eng = Engine("model.gguf", devices="cpu", ubatch=512)
    res = eng.prefill(eng.tokenize("Hello"))
    res.logits, res.stats, res.trace
"""

from .engine import Engine, PrefillResult, Trace, build_info, cuda_devices
from .errors import (
    CancelledError,
    ContextOverflowError,
    DeviceError,
    FormatError,
    MissingDependencyError,
    TurboPrefillError,
    UnsupportedError,
)
from .sampling import SamplingError, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "PrefillResult",
    "Trace",
    "build_info",
    "cuda_devices",
    "TurboPrefillError",
    "FormatError",
    "UnsupportedError",
    "ContextOverflowError",
    "DeviceError",
    "CancelledError",
    "MissingDependencyError",
    "SamplingParams",
    "SamplingError",
]

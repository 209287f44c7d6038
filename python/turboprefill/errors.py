"""Exceptions raised by turboprefill. Each maps one tp_status of the C ABI, except MissingDependencyError
(an optional Python package is not installed)."""

from __future__ import annotations


class TurboPrefillError(RuntimeError):
    """Base class for engine errors that are not a plain ValueError/OSError/MemoryError."""


class FormatError(TurboPrefillError, ValueError):
    """The GGUF file is truncated, corrupt or inconsistent."""


class UnsupportedError(TurboPrefillError):
    """Valid input that this engine does not handle (architecture, tensor type, device)."""


class ContextOverflowError(TurboPrefillError, ValueError):
    """The prompt does not fit in the remaining context."""


class DeviceError(TurboPrefillError):
    """A device (GPU, driver, CUDA runtime) is missing or failed."""


class CancelledError(TurboPrefillError):
    """The prefill was cancelled (Ctrl-C or Engine.cancel())."""


class MissingDependencyError(TurboPrefillError, ImportError):
    """An optional package is not installed; the message names the extra that installs it."""

    def __init__(self, message: str, module: str, extra: str | None = None):
        super().__init__(message)
        self.name = module  # ImportError's attribute: the module that could not be imported
        self.module = module
        self.extra = extra

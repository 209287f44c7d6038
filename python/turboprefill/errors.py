"""Exceptions raised by turboprefill. Each maps one tp_status of the C ABI."""


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

"""The Qwen2.5-VL vision encoder (C ABI tp_vision_*; csrc/model/vision.h): mmproj GGUF in, one embedding row
per merged 2×2 patch out.

Image loading, resizing and normalization stay with the caller (Pillow, numpy): ``encode`` takes normalized
float32 pixels [3, H, W] with H and W multiples of 28 (``info["patch_size"] * info["merge_size"]``) and
returns [(H/28)·(W/28), proj_dim] float32 rows in raster order over the merged grid.
"""

from __future__ import annotations

import threading

import numpy as np

from ._native import check, ffi, lib

_INFO_INTS = (
    "n_embd",
    "n_layer",
    "n_head",
    "head_dim",
    "n_ff",
    "patch_size",
    "merge_size",
    "proj_dim",
    "merger_dim",
    "window_px",
    "n_wa_pattern",
    "image_size",
    "min_pixels",
    "max_pixels",
)


class VisionEncoder:
    """VisionEncoder(mmproj_path, device="cpu" | "cpu:N" | "cuda" | "cuda:N", threads=0 (one per core))."""

    def __init__(self, mmproj_path: str, device: str = "cpu", threads: int = 0):
        out = ffi.new("tp_vision**")
        check(lib.tp_vision_create(str(mmproj_path).encode(), device.encode(), int(threads), out))
        self._h = out[0]
        info = ffi.new("tp_vision_info*")
        check(lib.tp_vision_info_get(self._h, info))
        self.info = {"projector": ffi.string(info.projector).decode()}
        self.info.update({k: int(getattr(info, k)) for k in _INFO_INTS})
        self.info["image_mean"] = [float(x) for x in info.image_mean]
        self.info["image_std"] = [float(x) for x in info.image_std]
        self.last_seconds = 0.0
        # The native handle runs one encode at a time; image prompts of several sequences may share it.
        self._lock = threading.Lock()

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """pixels: [3, H, W] normalized; returns [(H/28)·(W/28), proj_dim] float32."""
        return self.encode_timed(pixels)[0]

    def encode_timed(self, pixels: np.ndarray) -> tuple[np.ndarray, float]:
        """encode() plus its wall seconds (last_seconds may meanwhile belong to another thread's encode)."""
        if self._h is None:
            raise ValueError("VisionEncoder: used after close()")
        px = np.ascontiguousarray(pixels, dtype=np.float32)
        if px.ndim != 3 or px.shape[0] != 3:
            raise ValueError(f"VisionEncoder.encode: pixels must be [3, H, W], got shape {px.shape}")
        _, h, w = px.shape
        unit = self.info["patch_size"] * self.info["merge_size"]
        out = np.empty(((h // unit) * (w // unit), self.info["proj_dim"]), dtype=np.float32)
        secs = ffi.new("double*")
        with self._lock:
            check(
                lib.tp_vision_encode(
                    self._h,
                    ffi.from_buffer("float[]", px),
                    h,
                    w,
                    ffi.from_buffer("float[]", out, require_writable=True),
                    out.size,
                    secs,
                )
            )
        self.last_seconds = float(secs[0])
        return out, float(secs[0])

    def close(self) -> None:
        if self._h is not None:
            lib.tp_vision_free(self._h)
            self._h = None

    def __enter__(self) -> VisionEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_h", None) is not None:
            self.close()

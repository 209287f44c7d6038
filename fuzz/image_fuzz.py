"""Atheris fuzzer: image decoding and Qwen2.5-VL preprocessing (multimodal.prepare_image).

One input = the bytes of an image file, as a user's upload would arrive. Pillow decodes it (PNG, JPEG, GIF,
BMP, WebP, TIFF, ... whatever it recognizes), then the image is resized to its merged-patch grid and
normalized. The only allowed failure is ImageError with a message; a decoded image must give finite float32
pixels [3, H, W] with H and W multiples of 28 and a grid within the token bounds. The token bound is
lowered to 64 merged patches so that one input stays fast (the size rule itself is tested in
tests/test_multimodal.py). Seeds: fuzz/corpus/image (fuzz/make_corpus.py). Run: fuzz/run.sh image SECONDS.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["turboprefill.multimodal"]):
    from turboprefill import multimodal as mm

MAX_TOKENS = 64
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def test_one_input(data: bytes) -> None:
    try:
        im = mm.prepare_image(data, MEAN, STD, max_pixels=MAX_TOKENS * mm.FACTOR**2)
    except mm.ImageError as e:
        if not str(e):
            raise AssertionError("a refused image must say why") from e
        return
    c, h, w = im.pixels.shape
    if c != 3 or h % mm.FACTOR or w % mm.FACTOR or im.pixels.dtype.name != "float32":
        raise AssertionError(f"bad pixel array {im.pixels.shape} {im.pixels.dtype}")
    if im.grid != (h // mm.FACTOR, w // mm.FACTOR) or not 1 <= im.n_tokens <= max(MAX_TOKENS, 8 * 8):
        raise AssertionError(f"grid {im.grid} for {h}×{w}")
    if not (abs(im.pixels) < 10).all():  # (x/255 - mean)/std is within ±2.2 for these mean/std
        raise AssertionError("pixels out of range (NaN or not normalized)")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

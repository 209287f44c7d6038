"""multimodal.py — an image into a Qwen2.5-VL prompt: load, resize, normalize, lay out tokens, M-RoPE ids.

Everything here is host-side preparation; the vision tower (vision.py, csrc/model/vision.cpp) turns the pixels
into rows of the text width, and the engine runs those rows through the pipeline in place of token
embeddings (`Engine._prefill_mm`).

The rules, and where they come from:
- Size: Qwen2-VL's `smart_resize` — each side rounded to a multiple of 28 (14 px patches, merged 2×2),
  then scaled down (up) with the aspect kept when the area is above max_pixels (below min_pixels). The
  bounds are llama.cpp's for Qwen2.5-VL, 8 and 4096 merged patches (min 6272, max 3211264 px), unless the
  mmproj names its own. The arithmetic is done in float32 with C's round-half-away-from-zero, as llama.cpp's
  calc_size_preserved_ratio does, so both pick the same grid. A 1920×1080 image becomes 1932×1092 pixels:
  69×39 = 2691 image tokens.
- Resampling: Pillow's bicubic resize of the whole image to that size, as the model's own processor does.
  (llama.cpp instead scales with the aspect exactly kept and pads the rest black; both give the same grid.)
- Pixels: RGB / 255, then (x - mean) / std per channel with the mmproj's image_mean and image_std.
- Prompt: `<|vision_start|>` + one `<|image_pad|>` per merged patch + `<|vision_end|>`; each pad takes one
  row of the encoder's output, in raster order.
- Positions (Qwen2-VL's get_rope_index, and llama.cpp's mtmd): a text token at running position p has ids
  (p, p, p, 0); the image's merged patch (row r, col c) starting at position s has (s, s + r, s + c, 0); the
  next text token is at s + max(rows, cols), one past the largest id the image used.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._optional import require

PATCH = 14
MERGE = 2
FACTOR = PATCH * MERGE  # 28: a merged patch's side in pixels
MIN_TOKENS, MAX_TOKENS = 8, 4096  # llama.cpp's Qwen2/2.5-VL bounds, in merged patches
MAX_SOURCE_PIXELS = 1 << 28  # decoded source images beyond this are refused (Pillow's bomb guard is 178M)

VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
IMAGE_MARKUP = VISION_START + IMAGE_PAD + VISION_END


class ImageError(ValueError):
    """An image that cannot be read or used (unreadable file, zero size, wrong array shape)."""


def _round_half_away(x: np.float32) -> int:
    return int(math.floor(float(x) + 0.5))


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) a (height × width) image is resized to: multiples of `factor`, area within
    [min_pixels, max_pixels] (defaults: MIN_TOKENS and MAX_TOKENS merged patches), aspect kept."""
    if height <= 0 or width <= 0:
        raise ImageError(f"image has zero size ({width}×{height})")
    area = factor * factor
    min_pixels = MIN_TOKENS * area if not min_pixels else int(min_pixels)
    max_pixels = MAX_TOKENS * area if not max_pixels else int(max_pixels)
    f = np.float32(factor)
    h_bar = max(factor, _round_half_away(np.float32(height) / f) * factor)
    w_bar = max(factor, _round_half_away(np.float32(width) / f) * factor)
    if h_bar * w_bar > max_pixels:
        beta = np.sqrt(np.float32(height) * np.float32(width) / np.float32(max_pixels), dtype=np.float32)
        h_bar = max(factor, int(math.floor(float(np.float32(height) / beta / f))) * factor)
        w_bar = max(factor, int(math.floor(float(np.float32(width) / beta / f))) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = np.sqrt(np.float32(min_pixels) / (np.float32(height) * np.float32(width)), dtype=np.float32)
        h_bar = int(math.ceil(float(np.float32(height) * beta / f))) * factor
        w_bar = int(math.ceil(float(np.float32(width) * beta / f))) * factor
    return h_bar, w_bar


def load_image(image: Any) -> Any:
    """A PIL RGB image from a path, bytes, a PIL image or an array ([H, W, 3] or [H, W] uint8, or float in
    [0, 1]). Raises ImageError for what cannot be read."""
    Image = require("PIL.Image", "image input")
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[2] == 4:
            a = a[:, :, :3]
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
            raise ImageError(f"image array must be [H, W, 3] or [H, W], got shape {a.shape}")
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise ImageError(f"image has zero size ({a.shape[1]}×{a.shape[0]})")
        if np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all():
                raise ImageError("image array has NaN or infinite values")
            a = np.clip(np.rint(a * 255.0), 0, 255)
        elif not np.issubdtype(a.dtype, np.integer):
            raise ImageError(f"image array must be integer or float, got dtype {a.dtype}")
        img = Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8))
    else:
        try:
            src = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else os.fspath(image)
        except TypeError:
            raise ImageError(f"image must be a path, bytes, a PIL image or an array, got {type(image).__name__}")
        try:
            img = Image.open(src)
            img.load()
        except Exception as e:  # noqa: BLE001 — any decoder failure on untrusted bytes is "not an image"
            name = "image bytes" if isinstance(src, io.BytesIO) else repr(src)
            raise ImageError(f"cannot read {name} as an image: {e}") from e
    if img.width <= 0 or img.height <= 0:
        raise ImageError(f"image has zero size ({img.width}×{img.height})")
    if img.width * img.height > MAX_SOURCE_PIXELS:
        raise ImageError(f"image of {img.width}×{img.height} pixels is larger than {MAX_SOURCE_PIXELS} pixels")
    return img.convert("RGB")


@dataclass
class PreparedImage:
    pixels: np.ndarray  # float32 [3, H, W], normalized
    grid: tuple[int, int]  # merged patches (rows, cols) = (H / 28, W / 28)
    source_size: tuple[int, int]  # (width, height) before resizing

    @property
    def n_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def prepare_image(image: Any, mean: Sequence[float], std: Sequence[float], min_pixels: int | None = None,
                  max_pixels: int | None = None) -> PreparedImage:
    """Load, resize (smart_resize + bicubic) and normalize one image for the vision tower."""
    Image = require("PIL.Image", "image input")
    img = load_image(image)
    source = img.size
    h, w = smart_resize(img.height, img.width, FACTOR, min_pixels, max_pixels)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    rgb = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
    s = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)
    if (s == 0).any():
        raise ImageError(f"the mmproj's image_std has a zero entry: {list(std)}")
    pixels = np.ascontiguousarray(((rgb - m) / s).transpose(2, 0, 1), dtype=np.float32)
    return PreparedImage(pixels, (h // FACTOR, w // FACTOR), source)


def image_positions(start: int, rows: int, cols: int) -> np.ndarray:
    """M-RoPE ids [4, rows*cols] of an image whose first token is at running position `start`."""
    r, c = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
    pos = np.zeros((4, rows * cols), dtype=np.int64)
    pos[0] = start
    pos[1] = start + r
    pos[2] = start + c
    return pos


@dataclass
class Layout:
    tokens: np.ndarray  # int32 [n]: token ids, or -1 - row for image rows (row counts over all images)
    positions: np.ndarray  # int32 [4, n]
    next_pos: int  # the running position after the prompt
    image_spans: list[tuple[int, int]]  # [start, end) of each image's tokens in `tokens`


def layout(tokens: Sequence[int], image_pad: int, grids: Sequence[tuple[int, int]], start: int = 0) -> Layout:
    """Expand each run of `image_pad` tokens into its image's rows×cols entries and compute the positions.

    A run of any length stands for one image (one pad, as chat templates write it, or already the right
    count); runs and images pair up in order and their counts must agree."""
    toks = np.asarray(tokens, dtype=np.int64)
    if toks.ndim != 1:
        raise ValueError(f"tokens must be a 1-D sequence of ints, got shape {toks.shape}")
    runs: list[tuple[int, int]] = []
    i = 0
    while i < toks.size:
        if toks[i] == image_pad:
            j = i
            while j < toks.size and toks[j] == image_pad:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    if len(runs) != len(grids):
        raise ValueError(f"the prompt has {len(runs)} image placeholder(s) ({IMAGE_PAD} runs) but "
                         f"{len(grids)} image(s) were given")
    out_t: list[np.ndarray] = []
    out_p: list[np.ndarray] = []
    spans: list[tuple[int, int]] = []
    pos, prev, row0, n = int(start), 0, 0, 0
    for (a, b), (rows, cols) in zip(runs, grids):
        text = toks[prev:a]
        out_t.append(text)
        out_p.append(np.broadcast_to(pos + np.arange(text.size), (3, text.size)))
        pos += text.size
        n += text.size
        k = rows * cols
        out_t.append(-1 - (row0 + np.arange(k)))
        ip = image_positions(pos, rows, cols)
        out_p.append(ip[:3])
        spans.append((n, n + k))
        n += k
        row0 += k
        pos += max(rows, cols)
        prev = b
    text = toks[prev:]
    out_t.append(text)
    out_p.append(np.broadcast_to(pos + np.arange(text.size), (3, text.size)))
    pos += text.size
    t = np.concatenate(out_t) if out_t else np.zeros(0, np.int64)
    p3 = np.concatenate(out_p, axis=1) if out_p else np.zeros((3, 0), np.int64)
    positions = np.zeros((4, t.size), dtype=np.int64)
    positions[:3] = p3
    if t.size and (positions.max() > np.iinfo(np.int32).max or np.abs(t).max() > np.iinfo(np.int32).max):
        raise ValueError("positions or token ids do not fit in int32")
    return Layout(t.astype(np.int32), positions.astype(np.int32), pos, spans)


# The chat template of Qwen2-VL / Qwen2.5-VL (its tokenizer_config.json), used when a GGUF carries none.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def render_chat(template: str, messages: Sequence[dict], add_generation_prompt: bool = True,
                **extra: Any) -> str:
    """Render a chat template the way transformers' apply_chat_template does: a sandboxed jinja2 environment
    with trim_blocks, lstrip_blocks and loop controls; `raise_exception(msg)`, `strftime_now(fmt)` and a
    `tojson` filter that keeps non-ASCII text (ensure_ascii=False) and takes indent. `extra` are further
    variables (bos_token, eos_token, tools, ...)."""
    import json
    from datetime import datetime

    jinja2 = require("jinja2", "chat templates")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=list(messages),
                                                add_generation_prompt=add_generation_prompt, **extra)
    except Exception as e:  # noqa: BLE001 — the template is data from a file: any failure is the file's
        raise ValueError(f"the chat template failed: {type(e).__name__}: {e}") from e


def chat_images(messages: Sequence[dict]) -> list[Any]:
    """The images of a chat, in order: content parts {"type": "image", "image": X} (X a path, bytes, PIL
    image or array) or {"type": "image_url", "image_url": {"url": U}} (U a local path, a file:// URL or a
    data:image/...;base64, URL, whose bytes are decoded here)."""
    found: list[Any] = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "image" or "image" in part:
                if "image" not in part:
                    raise ValueError('an image content part needs the image itself: {"type": "image", "image": ...}')
                found.append(part["image"])
            elif part.get("type") == "image_url" or "image_url" in part:
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ValueError("image_url must be a string or {'url': string}")
                if url.startswith("data:"):
                    found.append(_data_url(url))
                    continue
                if url.startswith("file://"):
                    url = url[len("file://"):]
                elif "://" in url:
                    raise ValueError(f"image_url {url[:40]!r}: only local paths, file:// and data: URLs are read")
                found.append(url)
    return found


def _data_url(url: str) -> bytes:
    """The bytes of a data: URL (RFC 2397) that holds base64: data:image/png;base64,...."""
    import base64
    import binascii

    head, sep, body = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ValueError(f"image_url {url[:40]!r}: a data: URL must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(body, validate=True)
    except binascii.Error as e:
        raise ValueError(f"image_url data: URL is not valid base64: {e}") from e


@dataclass
class ImagePrompt:
    """A prompt ready for Engine._prefill_mm: the layout, the image rows it points at, and what it cost."""

    layout: Layout
    rows: np.ndarray  # float32 [n_image_tokens, n_embd], all images in prompt order
    images: list[PreparedImage]
    prepare_seconds: float  # loading, resizing and normalizing (host)
    encode_seconds: list[float]  # the vision tower, per image


def prompt_tokens(engine: Any, prompt: Any) -> tuple[np.ndarray, list[Any]]:
    """Token ids of a prompt and the images a chat names. `prompt`: token ids; a string (tokenized with
    special tokens, so <|image_pad|> markup in it counts); or chat messages (rendered with the GGUF's chat
    template, Qwen2-VL's when the file has none)."""
    if isinstance(prompt, str):
        return np.asarray(engine.tokenizer.encode(prompt, add_bos=True, special=True), np.int64), []
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        from .chat import chat_tokens

        return np.asarray(chat_tokens(engine, prompt), np.int64), chat_images(prompt)
    arr = np.asarray(prompt)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError("prompt must be token ids, a string or a list of chat messages")
    return arr.astype(np.int64), []


def build_image_prompt(engine: Any, tokens: np.ndarray, images: Sequence[Any], seq: int = 0) -> ImagePrompt:
    """Encode the images with the engine's vision tower and lay the prompt out around them, after what
    sequence `seq` already holds."""
    import time

    vision = engine.vision
    if vision is None:
        raise ValueError("images need the vision tower: create the Engine with mmproj=PATH (the mmproj GGUF "
                         "that goes with the model)")
    sections = engine.config.get("rope_sections") or [0, 0, 0, 0]
    if not any(sections):
        raise ValueError(f"{engine.path}: this model has no M-RoPE sections (no "
                         f"{engine.config['architecture']}.rope.dimension_sections), so it cannot take images")
    pad = engine.tokenizer.token_id(IMAGE_PAD)
    if pad is None:
        raise ValueError(f"the model's vocabulary has no {IMAGE_PAD} token to mark where an image goes")
    info = vision.info
    t0 = time.perf_counter()
    prepared = [prepare_image(im, info["image_mean"], info["image_std"], info.get("min_pixels") or None,
                              info.get("max_pixels") or None) for im in images]
    prep_s = time.perf_counter() - t0
    n_past, next_pos = engine.seq_info(seq)
    lay = layout(tokens, pad, [p.grid for p in prepared], start=next_pos)
    left = engine.config["n_ctx"] - n_past
    if lay.tokens.size > left:
        from .errors import ContextOverflowError

        n_img = sum(p.n_tokens for p in prepared)
        raise ContextOverflowError(
            f"the prompt needs {lay.tokens.size} positions ({n_img} of them for {len(prepared)} image(s)) but the "
            f"context has {left} left (n_ctx {engine.config['n_ctx']}); pass a larger n_ctx or smaller images")
    rows, secs = [], []
    for p in prepared:
        out_p, s = vision.encode_timed(p.pixels)
        rows.append(out_p)
        secs.append(s)
    out = np.concatenate(rows) if rows else np.zeros((0, engine.config["n_embd"]), np.float32)
    return ImagePrompt(lay, np.ascontiguousarray(out, dtype=np.float32), prepared, prep_s, secs)


def prefill(engine: Any, prompt: Any, images: Sequence[Any] | None, all_logits: bool, seq: int = 0) -> Any:
    """Engine.prefill for a prompt with images (or chat messages): tokens, images and positions laid out,
    the vision tower run, then one prefill through the pipeline. The result's stats gain the image part:
    image_tokens, image_prepare_seconds, image_encode_seconds (and _each), images (sizes and grids); the
    trace gains the vision tower's run as `vision` events (before the prefill, so at negative times)."""
    tokens, from_chat = prompt_tokens(engine, prompt)
    imgs = list(images or []) + from_chat
    if images and from_chat:
        raise ValueError("images were given both in the chat messages and as images=; use one")
    if not imgs:
        if tokens.size and tokens.min() < 0:
            raise ValueError("token ids must be >= 0")
        return engine._prefill_mm(tokens.astype(np.int32), None, None, all_logits, seq=seq)
    ip = build_image_prompt(engine, tokens, imgs, seq)
    res = engine._prefill_mm(ip.layout.tokens, ip.rows, ip.layout.positions, all_logits, seq=seq)
    enc = float(sum(ip.encode_seconds))
    res.stats.update({
        "image_tokens": int(sum(p.n_tokens for p in ip.images)),
        "image_prepare_seconds": ip.prepare_seconds,
        "image_encode_seconds": enc,
        "image_encode_seconds_each": list(ip.encode_seconds),
        "images": [{"source": p.source_size, "resized": (p.pixels.shape[2], p.pixels.shape[1]), "grid": p.grid,
                    "tokens": p.n_tokens} for p in ip.images],
    })
    t = -enc
    for i, (p, s) in enumerate(zip(ip.images, ip.encode_seconds)):
        res.trace.vision.append((i, p.n_tokens, t, t + s))
        t += s
    return res

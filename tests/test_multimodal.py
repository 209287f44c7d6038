"""Host-side image preparation for Qwen2.5-VL (python/turboprefill/multimodal.py): size rule, pixels, token
layout, M-RoPE positions and the chat template. The rules are restated here from their published sources
(Qwen2-VL's smart_resize and get_rope_index), not from the code under test."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from turboprefill import multimodal as mm

PIL = pytest.importorskip("PIL.Image")


def qwen_smart_resize(h: int, w: int, factor=28, min_pixels=8 * 784, max_pixels=4096 * 784):
    """Qwen2-VL's smart_resize with C rounding (half away from zero), as llama.cpp computes it."""
    def rnd(x):
        return int(math.floor(x + 0.5))

    hb, wb = max(factor, rnd(h / factor) * factor), max(factor, rnd(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def test_full_hd_grid_and_token_count():
    # The seed's image: 1920×1080 → sides rounded to 28: 1932×1092, within 4096 merged patches.
    h, w = mm.smart_resize(1080, 1920)
    assert (h, w) == (1092, 1932)
    assert (h // 28, w // 28) == (39, 69)
    assert (h // 28) * (w // 28) == 2691  # ≈ 2.7K image tokens


@pytest.mark.parametrize("h,w", [(1080, 1920), (1078, 1078), (1050, 700), (10, 10), (8000, 8000), (28, 5000),
                                 (480, 640), (3024, 4032), (1, 1), (97, 13)])
def test_smart_resize_matches_the_published_rule(h, w):
    got = mm.smart_resize(h, w)
    assert got == qwen_smart_resize(h, w)
    assert got[0] % 28 == 0 and got[1] % 28 == 0
    assert 8 * 784 <= got[0] * got[1] <= 4096 * 784 or min(got) == 28


def test_smart_resize_half_rounds_away_from_zero():
    # 1078 / 28 = 38.5: C's round (llama.cpp) gives 39, Python's banker's round would give 38.
    assert mm.smart_resize(1078, 1078) == (1092, 1092)


def test_smart_resize_zero_size():
    with pytest.raises(mm.ImageError, match="zero size"):
        mm.smart_resize(0, 10)


def test_full_hd_positions_follow_get_rope_index():
    # Qwen2-VL's rule: text (p, p, p); image tokens (s, s + row, s + col); text after the image continues at
    # s + max(rows, cols). A chat prefix of 5 tokens, the image, then 3 tokens.
    pad = 99
    toks = [1, 2, 3, 4, 5, pad, 6, 7, 8]
    lay = mm.layout(toks, pad, [(39, 69)], start=0)
    n_img = 39 * 69
    assert lay.tokens.size == 8 + n_img
    assert lay.image_spans == [(5, 5 + n_img)]
    assert list(lay.tokens[5:8]) == [-1, -2, -3] and lay.tokens[5 + n_img - 1] == -n_img
    p = lay.positions
    assert p.shape == (4, 8 + n_img) and p.dtype == np.int32
    np.testing.assert_array_equal(p[:3, :5], np.tile(np.arange(5), (3, 1)))
    k = np.arange(n_img)
    np.testing.assert_array_equal(p[0, 5:5 + n_img], 5)
    np.testing.assert_array_equal(p[1, 5:5 + n_img], 5 + k // 69)
    np.testing.assert_array_equal(p[2, 5:5 + n_img], 5 + k % 69)
    after = 5 + max(39, 69)
    np.testing.assert_array_equal(p[:3, 5 + n_img:], np.tile(after + np.arange(3), (3, 1)))
    assert not p[3].any()
    assert lay.next_pos == after + 3


def test_layout_two_images_and_an_offset():
    pad = 7
    lay = mm.layout([1, pad, 2, pad, pad, 3], pad, [(2, 3), (4, 1)], start=100)
    # first image rows 0..5, second 6..9; a run of two pads is still one image
    assert list(lay.tokens) == [1, -1, -2, -3, -4, -5, -6, 2, -7, -8, -9, -10, 3]
    assert lay.positions[0, 1] == 101 and lay.positions[1, 6] == 102 and lay.positions[2, 6] == 103
    assert lay.positions[0, 7] == 104  # 101 + max(2, 3)
    assert list(lay.positions[1, 8:12]) == [105, 106, 107, 108]
    assert lay.positions[0, 12] == 109 and lay.next_pos == 110


def test_layout_count_mismatch():
    with pytest.raises(ValueError, match="1 image placeholder"):
        mm.layout([1, 9, 2], 9, [(1, 1), (1, 1)])
    with pytest.raises(ValueError, match="0 image placeholder"):
        mm.layout([1, 2], 9, [(1, 1)])


def _png(arr: np.ndarray, fmt="PNG") -> bytes:
    b = io.BytesIO()
    PIL.fromarray(arr).save(b, format=fmt)
    return b.getvalue()


def test_prepare_image_normalizes_and_keeps_exact_sizes(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    path = tmp_path / "x.png"
    path.write_bytes(_png(arr))
    for src in (arr, path, str(path), _png(arr), PIL.fromarray(arr)):
        im = mm.prepare_image(src, mean, std, min_pixels=1)
        assert im.grid == (2, 3) and im.source_size == (84, 56)
        want = ((arr.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)
        np.testing.assert_allclose(im.pixels, want, rtol=1e-6, atol=1e-6)


def test_prepare_image_resizes_large_and_odd_images():
    arr = np.zeros((1080, 1920, 3), np.uint8)
    arr[:, :960] = 255
    im = mm.prepare_image(arr, [0.5] * 3, [0.5] * 3)
    assert im.pixels.shape == (3, 1092, 1932) and im.grid == (39, 69)
    assert im.pixels[:, :, 0].min() == pytest.approx(1.0) and im.pixels[:, :, -1].max() == pytest.approx(-1.0)
    big = mm.prepare_image(np.zeros((4000, 6000), np.uint8), [0.5] * 3, [0.5] * 3)  # grey: 3 channels
    assert big.n_tokens <= 4096 and big.pixels.shape[0] == 3


def test_bad_images(tmp_path):
    with pytest.raises(mm.ImageError, match="cannot read"):
        mm.prepare_image(tmp_path / "missing.png", [0] * 3, [1] * 3)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(mm.ImageError, match="cannot read"):
        mm.prepare_image(tmp_path / "empty.png", [0] * 3, [1] * 3)
    trunc = _png(np.full((64, 64, 3), 9, np.uint8), "JPEG")[:200]
    with pytest.raises(mm.ImageError, match="cannot read"):
        mm.prepare_image(trunc, [0] * 3, [1] * 3)
    with pytest.raises(mm.ImageError, match="zero size"):
        mm.prepare_image(np.zeros((0, 5, 3), np.uint8), [0] * 3, [1] * 3)
    with pytest.raises(mm.ImageError, match="shape"):
        mm.prepare_image(np.zeros((5, 5, 2), np.uint8), [0] * 3, [1] * 3)
    with pytest.raises(mm.ImageError, match="NaN"):
        mm.prepare_image(np.full((5, 5, 3), np.nan, np.float32), [0] * 3, [1] * 3)
    with pytest.raises(mm.ImageError, match="must be a path"):
        mm.prepare_image(3.5, [0] * 3, [1] * 3)


def test_chat_template_puts_one_placeholder_per_image():
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "and"},
                                         {"type": "image_url", "image_url": {"url": "file:///b.png"}},
                                         {"type": "text", "text": "?"}]}]
    text = mm.render_chat(mm.QWEN2VL_CHAT_TEMPLATE, msgs)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>and<|vision_start|><|image_pad|><|vision_end|>?"
                    "<|im_end|>\n<|im_start|>assistant\n")
    assert mm.chat_images(msgs) == ["a.png", "/b.png"]
    with pytest.raises(ValueError, match="only local paths"):
        mm.chat_images([{"role": "user", "content": [{"type": "image_url", "image_url": "http://x/y.png"}]}])
    with pytest.raises(ValueError, match="chat template failed"):
        mm.render_chat("{{ raise_exception('no system role') }}", msgs)

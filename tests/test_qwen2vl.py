"""Qwen2-VL's text side: M-RoPE and the vision rope in Ops::rope, embedding rows and explicit 4-section
positions through the engine (Engine._prefill_mm), next_pos, the prefix cache, and the errors.

Oracles: tests/reference.py's rope_multi and forward_mm in float64 (written from ggml's description of the
sections, not from the engine's rope_section), and bit-identity wherever the math is the same (schedules,
stage counts, an embedding row equal to a token's own embedding).

Tolerances: the op runs angles in double and rounds cos/sin and the rotation to f32, as the CPU's plain rope:
|Δ| <= 1e-6 · max|x| (8 ulp of the largest element; a wrong section or frequency index moves elements by
O(max|x|)). The engine with F32/F16 weights keeps an f32 path (measured 3.5e-7 relative here); REL_TOL = 3e-4
and cosine >= 0.9999 are test_engine.py's bounds. What they catch at the engine level (measured on the image
prompt): h and w swapped 9.7e-3, the t/h boundary one pair off 3.0e-3, ids ignored (KV index) > 3e-3. A one-pair
shift between h and w (7e-5) or w and e hides in the low frequencies of base 1e6 at image-sized ids; the op
tests, with ids spread over hundreds, catch those.
"""

from __future__ import annotations

import cffi
import numpy as np
import pytest

from turboprefill import ContextOverflowError, Engine, FormatError
from turboprefill.writer import default_rope_sections, write_model

from conftest import SYNTHETIC
from reference import load_reference_model, rope_multi

REL_TOL = 3e-4
COS_MIN = 0.9999
ROPE_ABS = 1e-6  # × max|x|: 8 ulp of the largest element
NORM, NEOX, MROPE, VISION = 0, 1, 2, 3  # tp::RopeMode

_CDEF = """
int32_t tp_cpu_test_rope(float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t pos0,
                         const int32_t* pos, int32_t mode, const int32_t* sections, int64_t n_rot, float base,
                         int32_t threads);
"""


@pytest.fixture(scope="module")
def cpu_rope():
    from turboprefill import _native

    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    lib = ffi.dlopen(str(_native._lib_path()))

    def run(x, pos0, pos, mode, sections, n_rot, base, threads=2):
        x = np.ascontiguousarray(x, dtype=np.float32).copy()
        sec = np.asarray(sections, dtype=np.int32)
        ids = None if pos is None else np.ascontiguousarray(pos, dtype=np.int32)
        p = ffi.NULL if ids is None else ffi.cast("const int32_t *", ids.ctypes.data)
        st = lib.tp_cpu_test_rope(ffi.cast("float *", x.ctypes.data), x.shape[0], x.shape[1], x.shape[2], pos0, p,
                                  mode, ffi.cast("const int32_t *", sec.ctypes.data), n_rot, base, threads)
        _native.check(st)
        return x

    return run


def image_ids(rng, n_tok: int) -> np.ndarray:
    """[4, n_tok] position ids as an image and text would give: t small, h/w on a grid, e zero."""
    t = rng.integers(0, 300, n_tok)
    return np.stack([t, t + rng.integers(0, 40, n_tok), t + rng.integers(0, 40, n_tok), np.zeros(n_tok, int)])


# ---- the op ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("n_tok", [1, 7, 83])
@pytest.mark.parametrize("sections", ["qwen", "wrapping"])
def test_mrope_op_matches_float64(cpu_rope, head_dim, n_tok, sections):
    rng = np.random.default_rng(head_dim * 100 + n_tok)
    sec = default_rope_sections(head_dim) if sections == "qwen" else (2, 3, 3, 1)  # 9 pairs: blocks repeat
    x = rng.normal(0, 2, (n_tok, 3, head_dim)).astype(np.float32)
    ids = image_ids(rng, n_tok)
    got = cpu_rope(x, 0, ids, MROPE, sec, head_dim, 1e6)
    ref = rope_multi(x.astype(np.float64), ids, head_dim, 1e6, sec, vision=False)
    assert np.abs(got - ref).max() <= ROPE_ABS * np.abs(x).max()


@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("n_tok", [1, 7, 83])
def test_vision_rope_op_matches_float64(cpu_rope, head_dim, n_tok):
    """As the Qwen2.5-VL vision encoder calls it: n_rot = head_dim/2, four sections of head_dim/4."""
    rng = np.random.default_rng(head_dim * 7 + n_tok)
    sec = (head_dim // 4,) * 4
    x = rng.normal(0, 2, (n_tok, 5, head_dim)).astype(np.float32)
    ids = np.stack([rng.integers(0, 64, n_tok) for _ in range(4)])
    got = cpu_rope(x, 0, ids, VISION, sec, head_dim // 2, 10000.0)
    ref = rope_multi(x.astype(np.float64), ids, head_dim // 2, 10000.0, sec, vision=True)
    assert np.abs(got - ref).max() <= ROPE_ABS * np.abs(x).max()


def test_rope_positions_default_and_plain_modes(cpu_rope):
    """pos = NULL is pos0 + i (t, h, w; e = 0) for M-RoPE, and explicit ids in NEOX mode are read from t."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (9, 2, 64)).astype(np.float32)
    plain = np.arange(40, 49)
    ids = np.stack([plain, plain, plain, np.zeros(9, int)])
    sec = default_rope_sections(64)
    assert np.array_equal(cpu_rope(x, 40, None, MROPE, sec, 64, 1e6), cpu_rope(x, 0, ids, MROPE, sec, 64, 1e6))
    other = ids.copy()
    other[1:] = 7  # h, w, e are not NEOX's business
    assert np.array_equal(cpu_rope(x, 40, None, NEOX, sec, 64, 1e6), cpu_rope(x, 0, other, NEOX, sec, 64, 1e6))
    # With every id equal, M-RoPE is plain NEOX rope (Qwen2-VL's text-only case).
    assert np.array_equal(cpu_rope(x, 40, None, MROPE, sec, 64, 1e6), cpu_rope(x, 40, None, NEOX, sec, 64, 1e6))


def test_vision_rope_refuses_wrong_n_rot(cpu_rope):
    x = np.zeros((2, 1, 64), np.float32)
    with pytest.raises(Exception, match="n_rot = head_dim / 2"):
        cpu_rope(x, 0, None, VISION, (16, 16, 16, 16), 64, 10000.0)


# ---- the engine ------------------------------------------------------------------------------------------


def mm_prompt(rng, n_vocab: int, n_embd: int, start: int = 0, grid=(3, 5)):
    """text, an image of grid[0]×grid[1] embedding rows (given out of order), text: (tokens, embd, pos [4, n],
    next_pos). Positions as Qwen2-VL gives them: text i at start + i in t/h/w; the image at t = p0,
    h = p0 + row, w = p0 + col; text after it continues at max id + 1."""
    gh, gw = grid
    n_img = gh * gw
    pre, post = 4, 6
    rows = rng.permutation(n_img)  # embd row of each image entry: exercises the row lookup
    embd = rng.normal(0, 1, (n_img, n_embd)).astype(np.float32)
    toks = np.concatenate([rng.integers(0, n_vocab, pre), -1 - rows, rng.integers(0, n_vocab, post)])
    p0 = start + pre
    t = np.concatenate([np.arange(start, p0), np.full(n_img, p0), np.zeros(post, int)])
    h = np.concatenate([np.arange(start, p0), p0 + np.arange(n_img) // gw, np.zeros(post, int)])
    w = np.concatenate([np.arange(start, p0), p0 + np.arange(n_img) % gw, np.zeros(post, int)])
    nxt = p0 + max(gh, gw)
    after = np.arange(nxt, nxt + post)
    t[pre + n_img:], h[pre + n_img:], w[pre + n_img:] = after, after, after
    pos = np.stack([t, h, w, np.zeros_like(t)]).astype(np.int32)
    return toks.astype(np.int32), embd, pos, int(after[-1]) + 1


def cosine(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("quant", ["f32", "f16"])
@pytest.mark.parametrize("stages,ubatch", [(1, 512), (1, 7), (2, 5)])
def test_image_prompt_matches_reference(synthetic_model, quant, stages, ubatch):
    """Tokens, embedding rows and image positions in one call, then plain text: every logit against the
    float64 reference, and next_pos after each call."""
    path = synthetic_model("qwen2vl", quant=quant)
    kw = SYNTHETIC["qwen2vl"][1]
    rng = np.random.default_rng(11)
    toks, embd, pos, nxt = mm_prompt(rng, kw["n_vocab"], kw["n_embd"])
    ref_model = load_reference_model(path)
    cache = ref_model.new_cache()
    ref = ref_model.forward_mm(toks, embd, pos, all_logits=True, cache=cache)
    eng = Engine(path, devices=",".join(f"cpu:{i}" for i in range(stages)), threads=1, ubatch=ubatch)
    got = eng._prefill_mm(toks, embd, pos, all_logits=True).logits
    assert rel_err(got, ref) < REL_TOL and cosine(got, ref) >= COS_MIN
    assert eng.config["next_pos"] == nxt and eng.n_past == len(toks)

    # Plain text continues at next_pos (t = h = w), not at the KV index.
    more = rng.integers(0, kw["n_vocab"], 5).astype(np.int32)
    plain = np.arange(nxt, nxt + 5)
    ref2 = ref_model.forward_mm(more, None, np.stack([plain, plain, plain, 0 * plain]), all_logits=True,
                                cache=cache)
    got2 = eng.prefill(more, all_logits=True).logits
    assert rel_err(got2, ref2) < REL_TOL and cosine(got2, ref2) >= COS_MIN
    assert eng.config["next_pos"] == nxt + 5 and eng.n_past == len(toks) + 5
    # The KV index would be a different (wrong) position: the reference with it disagrees clearly.
    wrong = ref_model.forward_mm(more, None, None, all_logits=True, cache=ref_model.new_cache())
    assert rel_err(got2, wrong) > 10 * REL_TOL


def test_schedules_and_stages_bit_identical_with_images(synthetic_model):
    """Pipelined == sequential bit for bit on 1 and 2 stages, with embedding rows and explicit positions
    spread over several ubatches; and the stage split changes no bit either (same kernels on the CPU)."""
    path = synthetic_model("qwen2vl")
    kw = SYNTHETIC["qwen2vl"][1]
    toks, embd, pos, _ = mm_prompt(np.random.default_rng(5), kw["n_vocab"], kw["n_embd"], start=3, grid=(4, 3))
    runs = []
    for devices in ("cpu:0", "cpu:0,cpu:1"):
        for schedule in ("pipelined", "sequential"):
            eng = Engine(path, devices=devices, threads=1, ubatch=4, schedule=schedule)
            eng.prefill([1, 2, 3])
            a = eng._prefill_mm(toks, embd, pos, all_logits=True).logits
            b = eng.prefill([4, 5], all_logits=True).logits
            runs.append((a, b, eng.kv_digest(), eng.config["next_pos"]))
    for r in runs[1:]:
        assert np.array_equal(r[0], runs[0][0]) and np.array_equal(r[1], runs[0][1])
        assert r[2:] == runs[0][2:]


def test_embedding_row_equal_to_a_token_gives_its_logits(synthetic_model):
    """On any model (here llama, no M-RoPE), an embedding row equal to token j's embedding is token j, bit for
    bit: rows go into the residual stream exactly where the embedding would."""
    path = synthetic_model("llama256", quant="f32")
    table = load_reference_model(path).w["token_embd.weight"].astype(np.float32)
    toks = np.array([5, 17, 3, 99, 42, 7, 8], np.int32)
    eng = Engine(path, threads=1, ubatch=3)
    want = eng.prefill(toks, all_logits=True).logits
    eng.reset()
    mixed = toks.copy()
    mixed[[1, 2, 5]] = [-1, -2, -3]
    embd = table[[17, 3, 7]]
    got = eng._prefill_mm(mixed, embd, None, all_logits=True).logits
    assert np.array_equal(got, want)
    assert eng.config["next_pos"] == eng.n_past == len(toks)


def test_bad_inputs_are_clear_errors_and_leave_the_sequence(synthetic_model):
    path = synthetic_model("qwen2vl")
    kw = SYNTHETIC["qwen2vl"][1]
    toks, embd, pos, nxt = mm_prompt(np.random.default_rng(2), kw["n_vocab"], kw["n_embd"])
    eng = Engine(path, threads=1, ubatch=8, n_ctx=40)
    eng._prefill_mm(toks, embd, pos)
    before = (eng.n_past, eng.config["next_pos"], eng.kv_digest())
    with pytest.raises(ValueError, match="embedding row 15 but embd has 15 rows"):
        eng._prefill_mm(np.array([3, -16], np.int32), embd)
    with pytest.raises(ValueError, match="embedding row 0 but embd has 0 rows"):
        eng._prefill_mm(np.array([-1], np.int32))
    with pytest.raises(ValueError, match="token id 150"):
        eng._prefill_mm(np.array([150], np.int32))
    with pytest.raises(ValueError, match=r"pos must have shape \(4, n=2\)"):
        eng._prefill_mm(np.array([1, 2], np.int32), None, np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match=r"n_embd=128"):
        eng._prefill_mm(np.array([-1], np.int32), np.zeros((1, 64), np.float32))
    with pytest.raises(ContextOverflowError, match="exceeds the context of 40"):
        eng._prefill_mm(np.arange(40 - len(toks) + 1, dtype=np.int32) % 150)
    with pytest.raises(ValueError, match="out of range"):
        eng.prefill([-1])  # plain prefill: negative ids are not rows
    assert (eng.n_past, eng.config["next_pos"], eng.kv_digest()) == before

    other = Engine(synthetic_model("qwen2"), threads=1)
    with pytest.raises(ValueError, match="no M-RoPE sections"):
        other._prefill_mm(np.array([1, 2], np.int32), None, np.zeros((4, 2), np.int32))
    other.prefill([1, 2, 3])
    assert other.config["next_pos"] == other.n_past == 3 and other.config["rope_sections"] == [0, 0, 0, 0]


@pytest.mark.parametrize("stages", [1, 2])
def test_state_keeps_next_pos(synthetic_model, tmp_path, stages):
    path = synthetic_model("qwen2vl")
    kw = SYNTHETIC["qwen2vl"][1]
    toks, embd, pos, nxt = mm_prompt(np.random.default_rng(8), kw["n_vocab"], kw["n_embd"])
    devices = ",".join(f"cpu:{i}" for i in range(stages))
    whole = Engine(path, devices=devices, threads=1, ubatch=6)
    whole._prefill_mm(toks, embd, pos)
    want = whole.prefill([9, 8, 7], all_logits=True).logits

    first = Engine(path, devices=devices, threads=1, ubatch=6)
    first._prefill_mm(toks, embd, pos)
    state = tmp_path / "img.tpkv"
    first.save_state(state)
    fresh = Engine(path, devices=devices, threads=1, ubatch=6)
    fresh.load_state(state)
    assert fresh.config["next_pos"] == nxt and fresh.n_past == len(toks)
    assert np.array_equal(fresh.prefill([9, 8, 7], all_logits=True).logits, want)
    fresh.reset()
    assert fresh.config["next_pos"] == 0


@pytest.mark.parametrize("sections,match", [
    ((8, 12, 13, 0), r"sums to 33; it must be in \[1, n_rot/2 = 32\]"),
    ((-1, 12, 12, 0), r"has an entry outside \[0, n_rot/2 = 32\]"),
    ((0, 0, 0, 0), "sums to 0"),
    ((8, 12, 12), "must be an array of 4 integers"),
    ((), "missing required key 'qwen2vl.rope.dimension_sections'"),
])
def test_bad_rope_sections_are_format_errors(tmp_path, sections, match):
    path = tmp_path / "bad.gguf"
    write_model(path, "qwen2vl", n_embd=128, n_head=2, n_ff=128, n_layer=1, n_vocab=64, quant="f32",
                rope_sections=sections)
    with pytest.raises(FormatError, match=match) as e:
        Engine(path)
    assert "rope.dimension_sections" in str(e.value)


def test_info_and_config_show_the_sections(synthetic_model, capsys):
    from turboprefill.cli import main

    path = synthetic_model("qwen2vl")
    assert main(["info", str(path)]) == 0
    assert "M-RoPE: rotary pairs per position id (t, h, w, e) = [8, 12, 12, 0]" in capsys.readouterr().out
    cfg = Engine(path, threads=1).config
    assert cfg["architecture"] == "qwen2vl" and cfg["rope_sections"] == [8, 12, 12, 0] and cfg["next_pos"] == 0


def test_version_1_state_loads_with_next_pos_at_n_past(synthetic_model, tmp_path):
    """States written before next_pos existed (format 1: no next_pos field) still load, with next_pos = n_past,
    which is what every model they could hold had."""
    import struct

    path = synthetic_model("llama")
    eng = Engine(path, threads=1)
    eng.prefill([1, 2, 3, 4, 5])
    want = eng.prefill([6, 7], all_logits=True).logits
    eng.reset()
    eng.prefill([1, 2, 3, 4, 5])
    v2 = tmp_path / "v2.tpkv"
    eng.save_state(v2)
    data = bytearray(v2.read_bytes())
    version, header_bytes = struct.unpack_from("<II", data, 8)
    n_stages = struct.unpack_from("<q", data, 48)[0]
    at = 56 + 8 * n_stages + 8  # next_pos follows n_past
    assert version == 2 and struct.unpack_from("<q", data, at)[0] == 5
    del data[at:at + 8]
    struct.pack_into("<II", data, 8, 1, header_bytes - 8)
    v1 = tmp_path / "v1.tpkv"
    v1.write_bytes(bytes(data))
    fresh = Engine(path, threads=1)
    fresh.load_state(v1)
    assert fresh.n_past == fresh.config["next_pos"] == 5
    assert np.array_equal(fresh.prefill([6, 7], all_logits=True).logits, want)


@pytest.mark.parametrize("devices", ["cpu:0", "cpu:0,cpu:1"])
def test_failed_image_prefill_leaves_the_sequence(synthetic_model, devices):
    """A stage error inside an image prefill (here injected at layer 2) changes neither n_past nor next_pos,
    and the sequence continues as if the call had not happened."""
    from turboprefill import TurboPrefillError

    path = synthetic_model("qwen2vl")
    kw = SYNTHETIC["qwen2vl"][1]
    toks, embd, pos, nxt = mm_prompt(np.random.default_rng(4), kw["n_vocab"], kw["n_embd"])
    eng = Engine(path, devices=devices, threads=1, ubatch=6)
    eng._prefill_mm(toks, embd, pos)
    want = Engine(path, devices=devices, threads=1, ubatch=6)
    want._prefill_mm(toks, embd, pos)
    eng._inject_fault(2)
    shifted = pos + (nxt - pos[0, 0])
    with pytest.raises(TurboPrefillError, match="injected fault"):
        eng._prefill_mm(toks, embd, shifted)
    eng._inject_fault(-1)
    assert eng.n_past == len(toks) and eng.config["next_pos"] == nxt
    assert np.array_equal(eng.prefill([1, 2, 3], all_logits=True).logits,
                          want.prefill([1, 2, 3], all_logits=True).logits)

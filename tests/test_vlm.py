"""Image + text prefill end to end (Engine(mmproj=...).prefill(chat with an image)): against llama.cpp's mtmd
on a committed fixture (scripts/make_qwen2vl_fixtures.py), against the float64 references of the vision
tower and the text model, across schedules, and the errors a user can run into."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("PIL")

from turboprefill import Engine  # noqa: E402
from turboprefill import multimodal as mm  # noqa: E402
from turboprefill.errors import ContextOverflowError  # noqa: E402
from turboprefill.writer import write_model  # noqa: E402
from turboprefill.writer_vision import write_mmproj  # noqa: E402
from turboprefill.writer_vl import write_pair  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures"


def _script():
    spec = importlib.util.spec_from_file_location("make_qwen2vl_fixtures", REPO / "scripts" / "make_qwen2vl_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FX = _script()
META = json.loads((FIX / "qwen2vl-synthetic.json").read_text())
DATA = np.load(FIX / "qwen2vl-synthetic.npz")


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("vl")
    tp, mp = d / "qwen2vl.gguf", d / "mmproj.gguf"
    write_pair(tp, mp, text=META["text_kwargs"], vision=META["vision_kwargs"])
    for p, key in ((tp, "text_sha256"), (mp, "mmproj_sha256")):
        assert hashlib.sha256(p.read_bytes()).hexdigest() == META[key], (
            f"{p.name} differs from the file the fixture was made from: the writer changed; rerun "
            "scripts/make_qwen2vl_fixtures.py")
    return tp, mp


@pytest.fixture(scope="module")
def image():
    return FX.make_image(**META["image"])


def test_matches_llama_cpp_mtmd(pair, image):
    tp, mp = pair
    with Engine(tp, mmproj=mp, devices="cpu", threads=2, ubatch=64, n_ctx=2048, layer_split=None) as eng:
        msgs = FX.messages(image)
        # Tokens: llama.cpp's text chunks around its media marker, ours around one <|image_pad|>.
        toks, imgs = mm.prompt_tokens(eng, msgs)
        pad = eng.tokenizer.token_id(mm.IMAGE_PAD)
        want = np.concatenate([DATA["text_0"], [pad], DATA["text_2"]])
        np.testing.assert_array_equal(toks, want)
        # The vision tower's rows.
        prep = mm.prepare_image(image, eng.vision.info["image_mean"], eng.vision.info["image_std"])
        assert prep.grid == (META["parts"][1]["rows"], META["parts"][1]["cols"])
        rows = eng.vision.encode(prep.pixels)
        row_cos = [cosine(a, b) for a, b in zip(rows, DATA["image_embd"])]
        assert min(row_cos) >= 0.999, min(row_cos)
        # The whole prompt: last-token logits, and where the next token's position lands.
        res = eng.prefill(msgs)
        c = cosine(res.logits, DATA["logits_last"])
        assert c >= 0.999, c
        assert int(np.argmax(res.logits)) == META["argmax_last"]
        assert eng.next_pos == META["n_pos_after_prompt"]
        assert eng.n_past == res.stats["tokens"] == len(DATA["text_0"]) + rows.shape[0] + len(DATA["text_2"])


def test_matches_float64_reference(pair, image):
    import reference
    import reference_vision

    tp, mp = pair
    with Engine(tp, mmproj=mp, devices="cpu", threads=2, ubatch=64, n_ctx=2048, layer_split=None) as eng:
        msgs = FX.messages(image)
        res = eng.prefill(msgs)
        toks, _ = mm.prompt_tokens(eng, msgs)
        prep = mm.prepare_image(image, eng.vision.info["image_mean"], eng.vision.info["image_std"])
        lay = mm.layout(toks, eng.tokenizer.token_id(mm.IMAGE_PAD), [prep.grid])
    rows = reference_vision.encode(reference_vision.load(mp), prep.pixels.astype(np.float64))
    ref = reference.load_reference_model(tp).forward_mm(lay.tokens, rows, lay.positions)
    c = cosine(res.logits, ref)
    assert c >= 0.999, c
    assert int(np.argmax(res.logits)) == int(np.argmax(ref))


def test_schedules_bit_identical_with_an_image(pair, image):
    tp, mp = pair
    out = {}
    for schedule in ("sequential", "pipelined"):
        # ubatch 16: the image's 54 rows span four ubatches, one shared with text
        with Engine(tp, mmproj=mp, devices="cpu:0,cpu:1", threads=1, ubatch=16, n_ctx=2048, layer_split=None,
                    schedule=schedule) as eng:
            r = eng.prefill(FX.messages(image), all_logits=True)
            nxt = eng.prefill([int(np.argmax(r.logits[-1]))])  # plain text continues after the image
            out[schedule] = (r.logits, nxt.logits, eng.kv_digest(), eng.next_pos, r.stats["ubatches"])
            assert r.trace.vision and r.trace.vision[0][1] == 54 and r.trace.vision[0][2] < 0
    s, p = out["sequential"], out["pipelined"]
    assert p[4] >= 4
    np.testing.assert_array_equal(s[0], p[0])
    np.testing.assert_array_equal(s[1], p[1])
    assert s[2:4] == p[2:4]


def test_image_prompts_on_two_sequences_at_once(pair, image):
    """Image prompts on sequences 0 and 1 from two threads (one shared vision tower) each give what the prompt
    gets alone, and a batched decode after them continues at each sequence's rope position past its image."""
    import threading

    tp, mp = pair
    kw = dict(mmproj=mp, devices="cpu:0,cpu:1", threads=1, ubatch=16, n_ctx=2048, layer_split=None)
    with Engine(tp, **kw) as eng:
        r = eng.prefill(FX.messages(image), all_logits=True)
        tok = int(np.argmax(r.logits[-1]))
        want = (r.logits, eng.prefill([tok]).logits, eng.kv_digest(), eng.next_pos)
    with Engine(tp, n_seq=2, **kw) as eng:
        res = {}
        threads = [threading.Thread(target=lambda s=s: res.__setitem__(
            s, eng.prefill(FX.messages(image), all_logits=True, seq=s))) for s in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        nxt = eng.decode([1, 0], [tok, tok])
        for seq, row in ((0, 1), (1, 0)):
            np.testing.assert_array_equal(res[seq].logits, want[0])
            np.testing.assert_array_equal(nxt[row], want[1])
            assert eng.kv_digest(seq) == want[2] and eng.seq_info(seq)[1] == want[3]
            assert res[seq].stats["image_tokens"] == 54


def test_stats_trace_and_generate(pair, image, tmp_path):
    tp, mp = pair
    with Engine(tp, mmproj=mp, devices="cpu", threads=2, ubatch=64, n_ctx=2048) as eng:
        msgs = FX.messages(image)
        r = eng.prefill(msgs)
        st = r.stats
        assert st["image_tokens"] == 54 and st["images"][0]["grid"] == (6, 9)
        assert st["images"][0]["source"] == (252, 168) and st["images"][0]["resized"] == (252, 168)
        assert st["image_encode_seconds"] > 0 and st["image_prepare_seconds"] >= 0
        r.trace.to_chrome_trace(tmp_path / "t.json")
        names = {e.get("args", {}).get("name") for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"]}
        assert "vision" in names
        first = int(np.argmax(r.logits))
        more = [int(np.argmax(eng.prefill([first]).logits))]
        eng.reset()
        assert eng.next_pos == 0
        assert eng.generate(msgs, max_new_tokens=2, stop_at_eos=False) == [first] + more
        eng.reset()
        # the same image given as images= with a string prompt that carries the placeholder
        text = mm.render_chat(mm.QWEN2VL_CHAT_TEMPLATE, FX.messages("x"))
        np.testing.assert_array_equal(eng.prefill(text, images=[image]).logits, r.logits)


def test_cli_prefill_with_an_image(pair, image, tmp_path, capsys):
    from PIL import Image

    from turboprefill.cli import main

    tp, mp = pair
    png = tmp_path / "img.png"
    Image.fromarray(image).save(png)
    assert main(["prefill", str(tp), "--mmproj", str(mp), "--image", str(png), "--prompt", "What is this?",
                 "--generate", "3", "--n-ctx", "1024"]) == 0
    out = capsys.readouterr().out
    assert "252×168 -> 252×168 px, 6×9 = 54 image tokens" in out
    assert "time to first token:" in out and "answer:" in out and "generation: 2 tokens" in out
    assert main(["prefill", str(tp), "--image", str(png)]) == 2  # no --mmproj
    capsys.readouterr()
    assert main(["bench", str(tp), "--mmproj", str(mp), "--image", str(png), "--repeat", "1", "--ubatch", "32",
                 "--devices", "cpu:0,cpu:1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| pipelined |" in out and "| sequential |" in out and "54 image tokens" in out
    assert "same first token in both schedules: True" in out


def test_errors(pair, image, tmp_path):
    tp, mp = pair
    with Engine(tp, devices="cpu", threads=1, n_ctx=1024) as eng:  # no mmproj
        with pytest.raises(ValueError, match="mmproj="):
            eng.prefill(FX.messages(image))
    bad = tmp_path / "narrow.gguf"
    write_mmproj(bad, proj_dim=128)
    with pytest.raises(ValueError, match="projects to 128 features but the text model .* n_embd 256"):
        Engine(tp, mmproj=bad, devices="cpu", threads=1)
    with Engine(tp, mmproj=mp, devices="cpu", threads=1, n_ctx=128) as eng:
        with pytest.raises(ContextOverflowError, match=r"needs 260 positions \(54 of them for 1 image"):
            eng.prefill(FX.messages(image))
        assert eng.n_past == 0 and eng.next_pos == 0
    with Engine(tp, mmproj=mp, devices="cpu", threads=1, n_ctx=1024) as eng:
        with pytest.raises(mm.ImageError, match="cannot read"):
            eng.prefill(FX.messages(io.BytesIO(b"not an image").getvalue()))
        with pytest.raises(mm.ImageError, match="zero size"):
            eng.prefill(FX.messages(np.zeros((0, 4, 3), np.uint8)))
        with pytest.raises(ValueError, match="1 image placeholder"):
            eng.prefill(mm.render_chat(mm.QWEN2VL_CHAT_TEMPLATE, FX.messages("x")), images=[image, image])
        with pytest.raises(ValueError, match="both in the chat messages and as images="):
            eng.prefill(FX.messages(image), images=[image])
        assert eng.n_past == 0
        # a huge image is resized, not refused: at most 4096 merged patches would need a bigger context
        big = np.zeros((3000, 4000, 3), np.uint8)
        with pytest.raises(ContextOverflowError, match="image"):
            eng.prefill(FX.messages(big))
    # A text model without M-RoPE sections (qwen2) given an image.
    q2 = tmp_path / "qwen2.gguf"
    write_model(q2, "qwen2", n_embd=256, n_head=4, n_layer=1, n_vocab=300, quant="f16",
                tokenizer=lambda wr, n: __import__("turboprefill.writer_vl", fromlist=["x"]).add_qwen_tokenizer(wr, n))
    with Engine(q2, mmproj=mp, devices="cpu", threads=1, n_ctx=1024) as eng:
        with pytest.raises(ValueError, match="no M-RoPE sections"):
            eng.prefill(FX.messages(image))

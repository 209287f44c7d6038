"""Tokenizer tests: our ids against llama.cpp's (fixtures from scripts/make_fixtures.py) for both real
models, decode round trips, and llama.cpp's rules on tiny hand-checked vocabularies (no model needed)."""

from __future__ import annotations

import hashlib
import json

import pytest

from turboprefill.tokenizer import Tokenizer

REAL_MODELS = {"smollm2": "smollm2_path", "gemma3-270m": "gemma3_path"}

ORDINARY = [
    "Hello, world! This is an ordinary sentence.",
    "The year 2024 had 366 days; pi is about 3.14159.",
    "def f(x):\n    return x * 2\n",
    "Ünïcödé, 中文, 日本語, 한국어 and emoji 🙂 too.",
    "  two leading spaces, a tab\there, and CRLF\r\nline ends  ",
]


# ---- real models vs llama.cpp ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(REAL_MODELS))
def real(request, fixtures_dir, gguf_metadata):
    """(model name, our Tokenizer, llama.cpp fixture dict) for each installed real model."""
    name = request.param
    path = request.getfixturevalue(REAL_MODELS[name])
    fx = json.loads((fixtures_dir / f"tokenizer_{name}.json").read_text())
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    if h.hexdigest() != fx["model_sha256"]:
        pytest.fail(f"{path} is not the file the fixtures were made from; rerun scripts/make_fixtures.py")
    return name, Tokenizer.from_metadata(gguf_metadata(path)), fx


def _first_diff(a: list[int], b: list[int]) -> str:
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at {k}: ours {a[k : k + 6]} vs llama.cpp {b[k : k + 6]} (lengths {len(a)}, {len(b)})"


@pytest.mark.realmodel
@pytest.mark.parametrize("source", ["text", "paragraph", "tricky", "special"])
def test_encode_matches_llama_cpp(real, source):
    """Same ids as llama_tokenize, with and without the model's BOS, for every fixture string."""
    name, tok, fx = real
    cases = [c for c in fx["cases"] if c["source"] == source]
    assert cases, f"no {source!r} cases in tokenizer_{name}.json"
    bad = []
    for c in cases:
        for add_bos, want in ((False, c["ids"]), (True, c["ids_bos"])):
            got = tok.encode(c["text"], add_bos=add_bos, special=c["special"])
            if got != want:
                bad.append(
                    f"{c['text'][:60]!r} add_bos={add_bos} special={c['special']}: {_first_diff(got, want)}"
                )
    assert not bad, f"{name}: {len(bad)} of {2 * len(cases)} encodings differ from llama.cpp:\n" + "\n".join(
        bad[:8]
    )


@pytest.mark.realmodel
def test_decode_matches_llama_detokenize(real):
    """decode(ids) == llama_detokenize(ids) (control tokens dropped) for every fixture string."""
    name, tok, fx = real
    bad = [c["text"][:60] for c in fx["cases"] if tok.decode(c["ids_bos"]) != c["detok"]]
    assert not bad, f"{name}: decode differs from llama.cpp for {len(bad)} strings, e.g. {bad[:5]}"


@pytest.mark.realmodel
def test_special_ids_and_vocab_size(real):
    _, tok, fx = real
    assert (tok.n_vocab, tok.bos_id, tok.eos_id) == (fx["n_vocab"], fx["bos_id"], fx["eos_id"])


@pytest.mark.realmodel
@pytest.mark.parametrize("text", ORDINARY)
def test_decode_round_trip(real, text):
    _, tok, _ = real
    assert tok.decode(tok.encode(text, add_bos=True)) == text


@pytest.mark.realmodel
def test_round_trip_whole_text(real, fixtures_dir):
    _, tok, _ = real
    text = (fixtures_dir / "tokenizer_text.txt").read_bytes().decode("utf-8")
    assert tok.decode(tok.encode(text)) == text


# ---- tiny vocabularies with hand-derived ids -------------------------------------------------------------


def _gpt2_chars() -> list[str]:
    """GPT-2's byte -> character table, written out independently of the module under test."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def _tiny_gpt2(pre: str) -> Tokenizer:
    # ids 0..255 are the single bytes; then merges' results, a control and a user-defined token
    # "</s>" is user-defined in the file, but llama.cpp forces it to control by its text (as in Gemma 3)
    tokens = _gpt2_chars() + ["he", "ll", "hell", "\u0120w", "<|end|>", "@@", "12", "</s>"]
    types = [1] * 256 + [1, 1, 1, 1, 3, 4, 1, 4]
    return Tokenizer.from_metadata(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": ["h e", "l l", "he ll", "\u0120 w", "1 2"],
            "tokenizer.ggml.bos_token_id": 260,
            "tokenizer.ggml.eos_token_id": 260,
            "tokenizer.ggml.add_bos_token": True,
        }
    )


def test_tiny_gpt2_merges_and_pretokens():
    tok = _tiny_gpt2("gpt2")
    # "hell" | " hello" | " w": merges by rank inside each pre-token, never across them
    assert tok.encode("hell hello w", add_bos=False) == [258, 32, 258, ord("o"), 259]
    assert tok.encode("hell", add_bos=True) == [260, 258]
    assert tok.decode([260, 258, 32, 258, ord("o"), 259]) == "hell hello w"
    assert tok.decode([260, 258], special=True) == "<|end|>hell"


def test_tiny_gpt2_digit_split_depends_on_pre():
    # gpt2 keeps "123" one pre-token (so "1 2" merges); smollm cuts digits apart first
    assert _tiny_gpt2("gpt2").encode("123", add_bos=False) == [262, ord("3")]
    assert _tiny_gpt2("smollm").encode("123", add_bos=False) == [ord("1"), ord("2"), ord("3")]


def test_tiny_gpt2_user_defined_and_control_partition():
    tok = _tiny_gpt2("gpt2")
    assert tok.encode("a@@b", add_bos=False) == [ord("a"), 261, ord("b")]  # user-defined: always cut out
    as_text = [ord(c) for c in "<|end|>"]
    assert tok.encode("<|end|>", add_bos=False) == as_text  # control: plain text unless special
    assert tok.encode("<|end|>", add_bos=False, special=True) == [260]
    assert tok.encode("</s>", add_bos=False) == [ord(c) for c in "</s>"]
    assert tok.encode("</s>", add_bos=False, special=True) == [263]


def _tiny_spm(add_space_prefix: bool) -> Tokenizer:
    # 0 <unk>, 1 <s>, 2 </s>, 3..258 bytes, then pieces with scores (higher merges first)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    for piece, score, t in [
        ("\u2581", -5.0, 1),
        ("a", -1.0, 1),
        ("b", -1.0, 1),
        ("ab", -2.0, 1),
        ("\u2581ab", -3.0, 1),
        ("\n", 0.0, 4),
        ("  ", 0.0, 4),
    ]:
        tokens.append(piece)
        scores.append(score)
        types.append(t)
    return Tokenizer.from_metadata(
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_space_prefix": add_space_prefix,
        }
    )


SP, A, B, AB, SPAB, NL, SPSP = range(259, 266)


def test_tiny_spm_merges_bytes_and_user_defined():
    tok = _tiny_spm(add_space_prefix=False)

    def byte(ch: str) -> int:
        return 3 + ord(ch)

    # "ab▁ab" merges to [ab, ▁ab]; "\n" is cut out first; "c" is unknown -> its byte
    assert tok.encode("ab ab\nc") == [1, AB, SPAB, NL, byte("c")]
    # a run of two spaces is a user-defined piece of the raw text, not two escaped "▁"
    assert tok.encode("ab  ab", add_bos=False) == [AB, SPSP, AB]
    assert tok.encode("é", add_bos=False) == [3 + 0xC3, 3 + 0xA9]  # byte fallback
    assert tok.decode(tok.encode("ab ab\nc é")) == "ab ab\nc é"


def test_tiny_spm_space_prefix_after_special():
    tok = _tiny_spm(add_space_prefix=True)
    # llama.cpp prefixes a space at the start and after every cut-out token
    assert tok.encode("ab\nab", add_bos=False) == [SPAB, NL, SPAB]
    assert tok.encode("ab\nc", add_bos=False) == [SPAB, NL, SP, 3 + ord("c")]


# ---- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["bert", "t5", "rwkv", ""])
def test_unknown_tokenizer_model_is_named(model):
    md = {"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": ["a", "b"]}
    with pytest.raises(ValueError, match=f"unsupported tokenizer.ggml.model '{model}'"):
        Tokenizer.from_metadata(md)


def test_unknown_bpe_pre_tokenizer_is_named():
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "no-such-pre",
        "tokenizer.ggml.tokens": ["a"],
        "tokenizer.ggml.merges": ["a a"],
    }
    with pytest.raises(ValueError, match="no-such-pre"):
        Tokenizer.from_metadata(md)


def test_missing_vocabulary():
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2"})


def test_decode_rejects_out_of_range_id():
    tok = _tiny_spm(add_space_prefix=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([10_000])

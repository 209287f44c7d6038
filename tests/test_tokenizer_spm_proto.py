"""The SentencePiece ModelProto built from a llama (SentencePiece-style) GGUF vocabulary.

tests/test_tokenizer.py checks ids against llama.cpp on real vocabularies; these tests cover what real
vocabularies rarely hold: token texts that are not valid UTF-8 (a protobuf string cannot carry them), and
the settings that make SentencePiece behave like llama.cpp (no normalization, BPE with byte fallback).
"""

from __future__ import annotations

import pytest
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from turboprefill.tokenizer import TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN, Tokenizer, _spm_model_proto

SP = "\u2581"
BYTES = [f"<0x{b:02X}>" for b in range(256)]
N0 = 3 + len(BYTES)  # id of the first ordinary piece


def vocab(pieces: list[str], scores: list[float] | None = None) -> dict:
    """<unk>, <s>, </s>, the 256 byte pieces, then ``pieces`` (GGUF metadata as describe_gguf returns it:
    invalid UTF-8 arrives as surrogate escapes)."""
    toks = ["<unk>", "<s>", "</s>", *BYTES, *pieces]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": toks,
        "tokenizer.ggml.token_type": [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL]
        + [TOKEN_BYTE] * 256
        + [TOKEN_NORMAL] * len(pieces),
        "tokenizer.ggml.scores": [0.0] * (N0 + len(pieces)) if scores is None else [0.0] * N0 + scores,
    }


def test_invalid_utf8_piece_keeps_later_ids_and_decodes_to_its_bytes():
    bad = b"\xff\xfe".decode("utf-8", "surrogateescape")
    tok = Tokenizer(vocab([f"{SP}a", bad, "b", f"{SP}ab"], scores=[-1.0, -1.0, -1.0, 0.0]))
    # "▁ab" is one piece (id N0+3): ids after the invalid piece did not shift
    assert tok.encode("ab") == [1, N0 + 3]
    assert tok.encode("a b") == [1, N0, 3 + 0xE2, 3 + 0x96, 3 + 0x81, N0 + 2]  # "▁b" is no piece: ▁ as bytes
    # the raw bytes come back on decode, and bytes SentencePiece never saw as a piece become byte tokens
    assert tok.token_to_bytes(N0 + 1) == b"\xff\xfe"
    assert tok.encode("\xff", add_bos=False) == [3 + 0xE2, 3 + 0x96, 3 + 0x81, 3 + 0xC3, 3 + 0xBF]


def test_placeholder_for_invalid_piece_never_collides_with_a_real_piece():
    bad = b"\x80".decode("utf-8", "surrogateescape")
    # the GGUF itself holds the text the first placeholder would get
    tok = Tokenizer(vocab([bad, f"<invalid utf-8 {N0}> ", "c"]))
    assert tok.token_to_bytes(N0) == b"\x80" and tok.encode("c", add_bos=False)[-1] == N0 + 2


def test_model_proto_is_bpe_with_byte_fallback_and_no_normalization():
    raw = [b"<unk>", b"\xe2\x96\x81a", b"\xc3"]
    m = spm_pb2.ModelProto.FromString(_spm_model_proto(raw, [0.0, -1.5, 0.0], [2, 1, 1], unk_id=0))
    assert [(p.piece, p.score, p.type) for p in m.pieces] == [
        ("<unk>", 0.0, m.SentencePiece.UNKNOWN),
        (f"{SP}a", -1.5, m.SentencePiece.NORMAL),
        ("<invalid utf-8 2> ", 0.0, m.SentencePiece.NORMAL),
    ]
    t, n = m.trainer_spec, m.normalizer_spec
    assert (t.model_type, t.byte_fallback, t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (t.BPE, True, 0, -1, -1, -1)
    assert (n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces) == (
        "identity",
        False,
        False,
        False,
    )


def test_runs_of_spaces_are_kept():
    # remove_extra_whitespaces would collapse them, add_dummy_prefix would add a second leading ▁
    tok = Tokenizer(vocab([f"{SP}{SP}", f"{SP}x"]))
    assert tok.encode("x  x", add_bos=False) == [N0 + 1, N0, 3 + ord("x")]  # ▁x ▁▁ x


def test_duplicate_piece_is_a_value_error():
    with pytest.raises(ValueError, match="cannot build a SentencePiece model .* already defined"):
        Tokenizer(vocab(["b", "b"]))

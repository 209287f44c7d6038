"""The "gpt-4o" (o200k, gpt-oss) BPE pre-tokenizer against llama.cpp's ids on a synthetic vocabulary.

tests/fixtures/tokenizer_gpt4o-synthetic.json (scripts/make_gpt4o_tokenizer_fixture.py) holds a byte-level
vocabulary whose merges join every pair of a set of characters, so the ids show where the split regex cut,
and llama.cpp's ids for tricky strings (contractions with capitals, digit runs, CJK, punctuation runs with
newlines and "/", runs of spaces, CRLF, non-ASCII letters next to ASCII capitals) and for the paragraphs of
tokenizer_text.txt. Needs only the fixture and HF `tokenizers`.
"""

from __future__ import annotations

import json

import pytest

from turboprefill.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def gpt4o_fixture(fixtures_dir):
    return json.loads((fixtures_dir / "tokenizer_gpt4o-synthetic.json").read_text())


def test_gpt4o_ids_match_llama_cpp(gpt4o_fixture):
    tok = Tokenizer.from_metadata(gpt4o_fixture["metadata"])
    mismatches = [
        (c["text"], got, c["ids"])
        for c in gpt4o_fixture["cases"]
        if (got := tok.encode(c["text"], add_bos=False)) != c["ids"]
    ]
    assert not mismatches, mismatches[:3]
    for c in gpt4o_fixture["cases"]:  # byte-level BPE round-trips
        assert tok.decode(c["ids"]) == c["text"]


@pytest.mark.parametrize("other", ["llama-bpe", "qwen2", "gpt2"])
def test_gpt4o_fixture_tells_other_split_regexes(gpt4o_fixture, other):
    """The fixture is sensitive to the regex: the neighbouring families' regexes give other ids
    (measured: llama-bpe differs on 9 of 51 cases, qwen2 on 15)."""
    md = dict(gpt4o_fixture["metadata"], **{"tokenizer.ggml.pre": other})
    tok = Tokenizer.from_metadata(md)
    differ = sum(tok.encode(c["text"], add_bos=False) != c["ids"] for c in gpt4o_fixture["cases"])
    assert differ >= 3

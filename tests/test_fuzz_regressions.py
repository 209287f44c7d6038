"""Inputs the fuzzers in fuzz/ found (tests/fixtures/fuzz-regressions), each loaded through the Python API:
each must end in a clean error that says what is wrong, never a crash, a MemoryError or a stray exception."""

from __future__ import annotations

from pathlib import Path

import pytest

from turboprefill import Engine, FormatError
from turboprefill.ggufinfo import describe_gguf
from turboprefill.tokenizer import Tokenizer

REG = Path(__file__).resolve().parent / "fixtures" / "fuzz-regressions"


def test_block_count_beyond_the_tensor_table_is_a_format_error():
    # tp_fuzz_gguf: qwen2.block_count = 3774873601 sized the per-layer table before any tensor was looked up
    # (ASan: allocation-size-too-big, 2.9 TB)
    path = REG / "block-count-huge.gguf"
    assert describe_gguf(path)["metadata"]["qwen2.block_count"] == 3774873601  # the file still says so
    with pytest.raises(FormatError, match=r"block_count \d+ but the file holds only \d+ tensors"):
        Engine(path, devices="cpu", threads=1)


def test_merge_of_a_text_not_in_the_vocabulary_is_a_value_error():
    # tokenizer_fuzz: HF tokenizers raised a bare Exception ("Token `12` out of vocabulary")
    with pytest.raises(ValueError, match="cannot build a BPE tokenizer from tokenizer.ggml.tokens/merges"):
        Tokenizer.from_gguf(REG / "tokenizer-merge-not-in-vocab.gguf")


def test_text_with_lone_surrogates_is_a_value_error():
    # tokenizer_fuzz: a str with lone surrogates reached HF tokenizers, which raised TypeError
    path = REG / "tokenizer-text-lone-surrogates.gguf"
    text = describe_gguf(path)["metadata"]["fuzz.text"]  # invalid UTF-8 in the file -> surrogate escapes
    tok = Tokenizer.from_gguf(path)
    with pytest.raises(ValueError, match=r"not valid Unicode \(surrogates not allowed at \d+\)"):
        tok.encode(text)
    assert tok.encode(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))  # the same text, repaired


def test_merges_that_are_not_strings_are_a_value_error():
    # tokenizer_fuzz in CI's 60 s run: tokenizer.ggml.merges held integers; parsing called .find on an int
    path = REG / "tokenizer-integer-merges.gguf"
    merges = describe_gguf(path)["metadata"]["tokenizer.ggml.merges"]
    assert not all(isinstance(m, str) for m in merges)
    with pytest.raises(ValueError, match="tokenizer.ggml.merges must be an array of strings"):
        Tokenizer.from_gguf(path)

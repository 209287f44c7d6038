"""Atheris fuzzer: the Python tokenizer built from a GGUF's metadata.

One input = one GGUF file, read by the engine's own reader (``describe_gguf``, which tp_fuzz_gguf fuzzes
in C++) exactly as ``Engine.tokenize`` gets it; the file's ``fuzz.text`` string key is the text to encode,
so the fuzzer mutates vocabulary and text together (seeds: fuzz/corpus/tokenizer, from make_corpus.py).

A hostile vocabulary may be refused, but only with ValueError (FormatError is one) carrying a message; every
other exception is a finding. A vocabulary that loads must then, for any text: encode to ids inside the
vocabulary (with and without special-token parsing), decode those ids to a str, and add BOS/EOS only
when asked. Run it with fuzz/run.sh tokenizer SECONDS.
"""

from __future__ import annotations

import atexit
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["turboprefill.tokenizer"]):
    from turboprefill.tokenizer import Tokenizer

from turboprefill.errors import TurboPrefillError
from turboprefill.ggufinfo import describe_gguf

# Per-input work is bounded so that one slow input is not reported as a hang: llama.cpp-sized vocabularies
# are not what this fuzzer is about (test_tokenizer.py covers the real ones).
MAX_TOKENS = 4096
MAX_TEXT = 2048

_fd, _PATH = tempfile.mkstemp(prefix="tp-tok-fuzz-", suffix=".gguf")
os.close(_fd)


def _metadata(data: bytes) -> dict | None:
    with open(_PATH, "wb") as f:
        f.write(data)
    try:
        return describe_gguf(_PATH)["metadata"]
    except (TurboPrefillError, ValueError, OSError):
        return None  # not a GGUF: the C++ fuzzer's business


def test_one_input(data: bytes) -> None:
    md = _metadata(data)
    if md is None:
        return
    tokens = md.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) > MAX_TOKENS:
        return
    text = md.get("fuzz.text", "Hello world")
    if not isinstance(text, str):
        text = repr(text)
    text = text[:MAX_TEXT]
    try:
        tok = Tokenizer.from_metadata(md)
    except ValueError as e:
        if not str(e):
            raise AssertionError("a refused vocabulary must say why") from e
        return
    n = tok.n_vocab
    if any("\ud800" <= c <= "\udfff" for c in text):  # invalid UTF-8 in the key: not Unicode text
        try:
            tok.encode(text)
        except ValueError:
            return
        raise AssertionError("encode must refuse text with lone surrogates with ValueError")
    for special in (False, True):
        ids = tok.encode(text, add_bos=True, special=special)
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < n)]
        if bad:
            raise AssertionError(f"encode returned ids outside [0, {n}): {bad[:8]}")
        if not isinstance(tok.decode(ids, special=special), str):
            raise AssertionError("decode must return str")
    # add_bos=True adds exactly what the metadata asks for around the same ids, nothing else
    plain = tok.encode(text, add_bos=False)
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    eos = [tok.eos_id] if tok.add_eos and tok.eos_id is not None else []
    if tok.encode(text, add_bos=True) != bos + plain + eos:
        raise AssertionError("add_bos=True must only add BOS/EOS around the ids of add_bos=False")


def main() -> None:
    atexit.register(os.unlink, _PATH)  # atheris.Fuzz() leaves through sys.exit
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

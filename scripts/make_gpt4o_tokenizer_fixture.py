#!/usr/bin/env python3
"""Write tests/fixtures/tokenizer_gpt4o-synthetic.json: llama.cpp's ids for a synthetic "gpt-4o" vocabulary.

No o200k vocabulary is installed here, so the split regex (the part of gpt-oss's tokenizer that is new to
us; the BPE itself is the same byte-level BPE as SmolLM2's) is tested on a synthetic vocabulary built to
make pre-token boundaries visible in the ids: the 256 byte-level tokens plus one merge for every ordered
pair of a set of characters (letters of both cases, digits, the apostrophe, space, newline, CR, tab, "/",
punctuation, the bytes of a few CJK characters). A merge never crosses a pre-token boundary, so where two
such characters meet, the ids say whether the regex split there. The JSON stores the vocabulary (tokens,
merges) next to llama.cpp's ids, so the test needs neither this script nor llama_cpp.

Usage: python scripts/make_gpt4o_tokenizer_fixture.py [--out tests/fixtures]
Needs: pip install llama-cpp-python gguf.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CASES = [
    "DON'T",
    "don't",
    "Don'T stop",
    "I'M HERE",
    "they'LL",
    "'s 'S",
    "McDonald's",
    "HTTPServer",
    "iPhone",
    "camelCaseWord",
    "ÖBC",
    "ÅÖ",
    "Ångström",
    "naïve",
    "e\u0301",
    "12345",
    "1234567",
    "3.14159",
    "a1b22c333d4444",
    "中文",
    "你好，世界！",
    "日本語テキスト",
    "!!\n\n",
    "!!!???",
    "x!!/\n\nnext",
    "path/to/file",
    "a/b/\n",
    "  spaces",
    "   three  two ",
    "trailing   ",
    "\r\n",
    "a\r\nb",
    "\r\n\r\n",
    "line1\nline2\n\n\nline3",
    " \t \n ",
    "\t\tindent",
    "    def f(x):\n        return x + 1\n",
    "Hello, World! It's 2024.",
    "don't DON'T Don't dOn'T",
    "\u00a0nbsp",
    "🙂 ok",
]

_CHARS = (
    "abcdenostDNOST'"  # letters of both cases and the apostrophe: contractions and case runs
    "0123456789"
    " \n\r\t/!?.,"
)
_CJK = "中文你好世界"


def _byte_map() -> dict[int, str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def synthetic_vocab() -> tuple[list[str], list[str]]:
    """(tokens, merges): 256 byte-level tokens, then one merged token per merge, in merge-rank order."""
    bm = _byte_map()
    tokens = [bm[b] for b in range(256)]
    merges = []
    units = [bm[ord(c)] for c in _CHARS]
    for a in units:
        for b in units:
            merges.append(f"{a} {b}")
    for ch in _CJK:  # a CJK character's 3 bytes: merge the first two, then with the third
        x, y, z = (bm[b] for b in ch.encode("utf-8"))
        merges += [f"{x} {y}", f"{x + y} {z}"]
    seen = set(tokens)
    for m in merges:
        left, right = m[: m.find(" ", 1)], m[m.find(" ", 1) + 1 :]
        t = left + right
        if t not in seen:
            tokens.append(t)
            seen.add(t)
    return tokens, merges


def write_vocab_gguf(path: Path, tokens: list[str], merges: list[str]) -> None:
    """A vocabulary-only GGUF llama.cpp loads with vocab_only (hparams of a tiny llama, no tensors)."""
    import gguf

    wr = gguf.GGUFWriter(str(path), "llama")
    wr.add_context_length(256)
    wr.add_embedding_length(64)
    wr.add_block_count(1)
    wr.add_feed_forward_length(128)
    wr.add_head_count(1)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("gpt-4o")
    wr.add_token_list(tokens)
    wr.add_token_types([1] * len(tokens))
    wr.add_token_merges(merges)
    wr.add_bool("tokenizer.ggml.add_bos_token", False)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    args = ap.parse_args(argv)

    import llama_cpp

    tokens, merges = synthetic_vocab()
    text = (args.out / "tokenizer_text.txt").read_bytes().decode("utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpt4o-vocab.gguf"
        write_vocab_gguf(path, tokens, merges)
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        cases = [
            {"text": s, "ids": llm.tokenize(s.encode("utf-8"), add_bos=False, special=False)}
            for s in [*CASES, *text.split("\n\n"), text]
        ]
    fixture = {
        "llama_cpp_python": llama_cpp.__version__,
        "note": "ids: llama_tokenize(add_special=False, parse_special=False) with tokenizer.ggml.pre = gpt-4o; "
        "metadata: the vocabulary-only GGUF's tokenizer keys (scripts/make_gpt4o_tokenizer_fixture.py)",
        "metadata": {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-4o",
            "tokenizer.ggml.add_bos_token": False,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * len(tokens),
            "tokenizer.ggml.merges": merges,
        },
        "cases": cases,
    }
    out = args.out / "tokenizer_gpt4o-synthetic.json"
    out.write_text(json.dumps(fixture, ensure_ascii=True, indent=0) + "\n")
    print(f"{out}: {len(tokens)} tokens, {len(merges)} merges, {len(cases)} cases, {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

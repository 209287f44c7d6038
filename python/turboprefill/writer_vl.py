"""Synthetic Qwen2.5-VL pairs: a `qwen2vl` text model with a real (tiny) vocabulary and chat template, and
its mmproj (writer_vision.py), so that the whole user path — chat template, tokenizer, image placeholders,
vision tower, M-RoPE prefill — runs on test-sized files, in this engine and in llama.cpp's mtmd.

The vocabulary is GPT-2 byte-level BPE with Qwen's pre-tokenizer ("qwen2"): the 256 byte symbols, merges
learned from a fixed English text until the vocabulary has n_vocab entries, and Qwen2-VL's control tokens
(<|endoftext|>, <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>)
at the end, as in the real vocabulary. llama.cpp needs a vocabulary for mtmd to tokenize a prompt around its
media marker; the engine needs one to find <|image_pad|>.
"""

from __future__ import annotations

import os
from collections import Counter

from .multimodal import QWEN2VL_CHAT_TEMPLATE

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")

_CORPUS = (
    "You are a helpful assistant. Describe this image in detail. What is in the picture? "
    "The image shows a cat sitting on a red chair next to the window, and the sun is shining. "
    "There are two people in the street; one of them is holding an umbrella because it is raining. "
    "Please answer the question about the photo: how many objects can you see, and what colour are they? "
    "A small dog runs across the green field while children play with a yellow ball near the trees."
)


def _byte_symbols() -> list[str]:
    from .tokenizer import _gpt2_byte_map

    return sorted(_gpt2_byte_map().values())


def qwen_vocab(n_vocab: int) -> dict:
    """Tokens, token types and merges of an n_vocab-entry byte-level BPE vocabulary (see the module doc)."""
    from .tokenizer import _gpt2_byte_map

    base = _byte_symbols()
    n_merges = n_vocab - len(base) - len(SPECIAL_TOKENS)
    if n_merges < 0:
        raise ValueError(f"qwen_vocab: n_vocab {n_vocab} < {len(base) + len(SPECIAL_TOKENS)} "
                         "(256 byte symbols + the control tokens)")
    bmap = _gpt2_byte_map()
    words = Counter()
    for i, w in enumerate(_CORPUS.split(" ")):
        text = (" " if i else "") + w
        words[tuple(bmap[b] for b in text.encode())] += 1
    merges: list[str] = []
    vocab = list(base)
    seen = set(vocab)
    while len(merges) < n_merges:
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        # most frequent pair, ties by the pair itself so the vocabulary is the same on every machine
        cands = sorted(((-c, p) for p, c in pairs.items() if p[0] + p[1] not in seen))
        if not cands:
            break
        a, b = cands[0][1]
        merges.append(f"{a} {b}")
        vocab.append(a + b)
        seen.add(a + b)
        new = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    # A corpus too small for the requested size: pad with unreachable reserved tokens (Qwen has them too).
    while len(vocab) < n_vocab - len(SPECIAL_TOKENS):
        vocab.append(f"[PAD{len(vocab)}]")
    tokens = vocab + list(SPECIAL_TOKENS)
    types = [1] * len(vocab) + [3] * len(SPECIAL_TOKENS)
    return {"tokens": tokens, "types": types, "merges": merges}


def add_qwen_tokenizer(wr, n_vocab: int, chat_template: str = QWEN2VL_CHAT_TEMPLATE) -> dict:
    """Write the tokenizer keys llama.cpp's converter writes for Qwen2.5-VL (gpt2 model, pre "qwen2",
    EOS and padding <|im_end|> / <|endoftext|>, no BOS) and the chat template. Returns the vocabulary."""
    v = qwen_vocab(n_vocab)
    ids = {t: i for i, t in enumerate(v["tokens"])}
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("qwen2")
    wr.add_token_list(v["tokens"])
    wr.add_token_types(v["types"])
    wr.add_token_merges(v["merges"])
    wr.add_eos_token_id(ids["<|im_end|>"])
    wr.add_pad_token_id(ids["<|endoftext|>"])
    wr.add_bos_token_id(ids["<|endoftext|>"])
    wr.add_add_bos_token(False)
    wr.add_chat_template(chat_template)
    return v


def write_pair(text_path: str | os.PathLike, mmproj_path: str | os.PathLike, *, text: dict | None = None,
               vision: dict | None = None) -> dict:
    """Write a synthetic qwen2vl text model (with vocabulary) and a matching mmproj (projection width =
    the text model's n_embd). `text` and `vision` are keyword arguments for writer.write_model and
    writer_vision.write_mmproj. Returns {"text": ..., "mmproj": ...} as those functions return."""
    from .writer import write_model
    from .writer_vision import write_mmproj

    text = dict(text or {})
    vision = dict(vision or {})
    t = write_model(text_path, "qwen2vl", tokenizer=add_qwen_tokenizer, **text)
    vision.setdefault("proj_dim", t["config"]["n_embd"])
    m = write_mmproj(mmproj_path, **vision)
    return {"text": t, "mmproj": m}

"""Write the fuzzers' seed corpora: fuzz/corpus/gguf/ (C++ GGUF reader + engine load) and
fuzz/corpus/tokenizer/ (Python tokenizer from GGUF metadata).

GGUF seeds are the synthetic models turboprefill.writer makes, one per architecture and tensor-type family,
with dimensions as small as the formats allow: a fuzzer mutates small inputs far faster, and every load
check (shapes against the config, types, offsets, alignment) is reached the same way at 32 as at 4096.
Tokenizer seeds are metadata-only GGUFs holding a tiny vocabulary of each kind plus a ``fuzz.text`` key, the
text the tokenizer fuzzer encodes (so that the fuzzer mutates the text and the vocabulary together).

    PYTHONPATH=python python fuzz/make_corpus.py   # needs the `test` extra (gguf)
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf

from turboprefill.tokenizer import _gpt2_byte_map
from turboprefill.writer import write_model

HERE = Path(__file__).resolve().parent

# name -> (architecture, write_model keywords). n_embd 32 is the smallest row that 32-element blocks
# (Q4_0..Q8_0) fit. K-quant matrices fall back to Q5_0/Q8_0 at this width; a K-quant seed would need rows of
# 256 (~200 KiB), and the reader handles every type id through the same block-size table anyway.
TINY = dict(n_embd=32, n_head=2, n_head_kv=1, n_ff=64, n_layer=2, n_vocab=16, n_ctx=64)
GGUF_SEEDS = {
    "llama-q4_k_m": ("llama", dict(TINY, rope_freqs=True)),
    "llama-f32": ("llama", dict(TINY, quant="f32", n_layer=1)),
    "llama-q8_0-align64": ("llama", dict(TINY, quant="q8_0", alignment=64)),
    "qwen2-f16": ("qwen2", dict(TINY, quant="f16")),
    "qwen3-q4_0": ("qwen3", dict(TINY, quant="q4_0", head_dim=16)),
    "gemma3-bf16": ("gemma3", dict(TINY, quant="bf16", head_dim=16, n_layer=3, sliding_window=4)),
    "qwen2-q4_1": ("qwen2", dict(TINY, quant="q4_1", n_layer=1)),
    "qwen2vl-q8_0": ("qwen2vl", dict(TINY, quant="q8_0", head_dim=16)),
}
# mmproj seeds (writer_vision.write_mmproj): the vision loader's keys and tensors at the smallest sizes. The
# two 14×14×3 patch kernels take most of the file; a width of 16 keeps it under run.sh's -max_len (64 KiB).
MMPROJ_SEEDS = {
    "mmproj-qwen25vl-f16": dict(n_embd=16, n_layer=2, n_head=2, n_ff=32, proj_dim=32, n_wa_pattern=2),
}

_TEXT = "Hello  world!\r\n\tcafé 123 <s> </s> <|endoftext|>  x\U0001f600"


def _spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, the 256 byte pieces, a few merges' worth of pieces and a user-defined run of spaces."""
    toks = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]]
    types = [2, 3, 3] + [6] * 256
    words = ["▁", "▁H", "▁Hello", "el", "lo", "▁w", "or", "ld", "▁world", "é", "▁caf", "12", "3"]
    toks += words + ["  ", "<start_of_turn>"]
    types += [1] * len(words) + [4, 3]
    scores = [0.0] * 259 + [-float(i) for i in range(len(words))] + [0.0, 0.0]
    return toks, scores, types


def _bpe_vocab() -> tuple[list[str], list[str], list[int]]:
    """GPT-2 byte-level vocabulary: all 256 byte characters, a few merges, one control token."""
    base = sorted(_gpt2_byte_map().values())
    merges = ["H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "1 2"]
    toks = base + [m.replace(" ", "") for m in merges] + ["<|endoftext|>"]
    types = [1] * (len(toks) - 1) + [3]
    return toks, merges, types


def write_tokenizer_seed(path: Path, kind: str, pre: str) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("fuzz.text", _TEXT)
    if kind == "llama":
        toks, scores, types = _spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_list(toks)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_space_prefix(pre == "space-prefix")
    else:
        toks, merges, types = _bpe_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(toks)
        w.add_token_merges(merges)
        w.add_token_types(types)
        w.add_bos_token_id(len(toks) - 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_image_seeds(d: Path) -> None:
    """Small images in each format Pillow decodes for users (the image fuzzer mutates the encoded bytes)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for fmt, mode, ext in [("PNG", "RGB", "png"), ("PNG", "L", "grey.png"), ("PNG", "RGBA", "rgba.png"),
                           ("JPEG", "RGB", "jpg"), ("GIF", "P", "gif"), ("BMP", "RGB", "bmp"),
                           ("WEBP", "RGB", "webp"), ("TIFF", "RGB", "tiff")]:
        b = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(b, format=fmt)
        (d / f"seed.{ext}").write_bytes(b.getvalue())


# Chat templates for the chat fuzzer: Qwen2-VL's (the one the engine falls back to) and the shapes of
# other families' templates (ChatML, Llama 3 headers, Gemma turns with raise_exception on roles).
CHAT_SEEDS = {
    "qwen2vl": None,  # multimodal.QWEN2VL_CHAT_TEMPLATE
    "chatml": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "llama3": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
              "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    "gemma": "{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'model'] %}"
             "{{ raise_exception('roles must be user/assistant') }}{% endif %}<start_of_turn>"
             "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
             "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
}


def write_chat_seeds(d: Path) -> None:
    """FuzzedDataProvider input whose first part decodes to the template: a length, then UTF-8 text."""
    from turboprefill.multimodal import QWEN2VL_CHAT_TEMPLATE

    for name, t in CHAT_SEEDS.items():
        text = (t or QWEN2VL_CHAT_TEMPLATE).encode()
        # ConsumeIntInRange reads its bytes from the end; ConsumeUnicodeNoSurrogates starts with a byte that
        # picks the width (bit 0 clear: ASCII bytes). The tail sets message count and shapes.
        (d / f"{name}.bin").write_bytes(b"\x00" + text + b"\x01\x02\x00\x01" + len(text).to_bytes(2, "big"))


def main() -> int:
    for sub in ("image", "chat"):
        (HERE / "corpus" / sub).mkdir(parents=True, exist_ok=True)
    write_image_seeds(HERE / "corpus" / "image")
    write_chat_seeds(HERE / "corpus" / "chat")
    gdir, tdir = HERE / "corpus" / "gguf", HERE / "corpus" / "tokenizer"
    gdir.mkdir(parents=True, exist_ok=True)
    tdir.mkdir(parents=True, exist_ok=True)
    for name, (arch, kw) in GGUF_SEEDS.items():
        write_model(gdir / f"{name}.gguf", arch, seed=1, **kw)
    from turboprefill.writer_vision import write_mmproj

    for name, kw in MMPROJ_SEEDS.items():
        write_mmproj(gdir / f"{name}.gguf", seed=1, **kw)
    for kind, pre in [
        ("llama", "space-prefix"),
        ("llama", "none"),
        ("gpt2", "smollm"),
        ("gpt2", "llama-bpe"),
        ("gpt2", "qwen2"),
    ]:
        write_tokenizer_seed(tdir / f"{kind}-{pre}.gguf", kind, pre)
    # the tokenizer seeds are GGUF files too: the C++ fuzzer gets the string-array paths from them
    for p in tdir.glob("*.gguf"):
        (gdir / f"vocab-{p.name}").write_bytes(p.read_bytes())
    total = sum(p.stat().st_size for p in (HERE / "corpus").rglob("*.gguf"))
    print(f"wrote {len(list(gdir.iterdir()))} + {len(list(tdir.iterdir()))} seeds, {total / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

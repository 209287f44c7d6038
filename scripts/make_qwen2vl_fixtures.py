#!/usr/bin/env python3
"""Write the llama.cpp oracle fixture of a synthetic Qwen2.5-VL pair (run it again only to refresh it).

Owns tests/fixtures/qwen2vl-synthetic.npz + .json. The models are not committed: the JSON records the writers'
arguments and both files' sha256, and the test regenerates them bit-identically with
turboprefill.writer_vl.write_pair (and checks the hashes before comparing anything).

The pair: a qwen2vl text model (Q4_K_M, n_embd 256, head_dim 64, M-RoPE sections [8, 12, 12, 0], a 512-entry
byte-level BPE vocabulary with Qwen's control tokens and chat template) and an F16 mmproj
(qwen2.5vl_merger: width 160 with heads of 80 as in the real tower, windowed attention with full attention
every 2nd layer, merger to 256). The image is seeded noise smoothed into blobs, 252×168 px: a 9×6 grid of
merged patches, so its 4×4-patch windows are partial in both directions. Its size is already what
smart_resize picks, so llama.cpp does not resample it (its resize is a copy at equal size) and both
engines see the same pixels.

The prompt is the chat template with the image and a question followed by a paragraph, so positions after
the image run well past the image's own ids. llama.cpp runs it through mtmd (mtmd_tokenize with its media
marker, mtmd_helper_eval_chunks, CPU, 2 threads, n_batch 64 so the image spans several ubatches).

Stored: the token ids of every text chunk as llama.cpp tokenized them, the image chunk's grid, llama.cpp's
image embeddings (the vision tower's output, float32) and the last token's logits (float32), plus in the JSON
the settings and the llama-cpp-python version.

Usage: PYTHONPATH=python python scripts/make_qwen2vl_fixtures.py [--out tests/fixtures]
Needs: the built native library (the writer quantizes with it), pip install llama-cpp-python gguf numpy pillow.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

TEXT = dict(n_layer=4, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512, n_vocab=512, n_ctx=4096,
            quant="q4_k_m", seed=7, rope_sections=[8, 12, 12, 0])
VISION = dict(n_embd=160, n_layer=4, n_head=2, n_ff=320, n_wa_pattern=2, weight_type="f16", seed=8)
IMAGE = dict(width=252, height=168, seed=9)
QUESTION = ("What is in the picture? Please describe it in detail. " +
            "The image shows a cat sitting on a red chair next to the window, and the sun is shining. " * 6)
N_BATCH = 64
N_CTX = 2048


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_image(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: seeded noise blurred into smooth blobs (images are not white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.random((height // 14 + 2, width // 14 + 2, 3))
    ys = np.linspace(0, small.shape[0] - 1.001, height)
    xs = np.linspace(0, small.shape[1] - 1.001, width)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    a = small[y0][:, x0]
    b = small[y0][:, x0 + 1]
    c = small[y0 + 1][:, x0]
    d = small[y0 + 1][:, x0 + 1]
    img = (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def messages(image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def llama_run(llama_cpp, mtmd, text_path: Path, mmproj_path: Path, prompt: str, img: np.ndarray) -> dict:
    llm = llama_cpp.Llama(model_path=str(text_path), n_ctx=N_CTX, n_batch=N_BATCH, n_ubatch=N_BATCH,
                          n_threads=2, n_threads_batch=2, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = 2
    params.warmup = False
    params.print_timings = False
    ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), llm.model, params)
    if not ctx:
        raise SystemExit("llama.cpp's mtmd could not load the mmproj")
    h, w, _ = img.shape
    buf = (ctypes.c_uint8 * img.size).from_buffer_copy(np.ascontiguousarray(img).tobytes())
    bitmap = mtmd.mtmd_bitmap_init(w, h, buf)
    marker = mtmd.mtmd_default_marker().decode()
    text = prompt.replace("<|vision_start|><|image_pad|><|vision_end|>", marker)
    inp = mtmd.mtmd_input_text(text.encode(), len(text.encode()), False, True)
    chunks = mtmd.mtmd_input_chunks_init()
    bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
    if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), bitmaps, 1) != 0:
        raise SystemExit("mtmd_tokenize failed")
    parts: list = []
    embd = None
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        ch = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(ch) == 0:  # text
            n = ctypes.c_size_t()
            p = mtmd.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
            parts.append([int(p[j]) for j in range(n.value)])
        else:
            it = mtmd.mtmd_input_chunk_get_tokens_image(ch)
            nx, ny = mtmd.mtmd_image_tokens_get_nx(it), mtmd.mtmd_image_tokens_get_ny(it)
            parts.append({"rows": int(ny), "cols": int(nx)})
            if mtmd.mtmd_encode_chunk(ctx, ch) != 0:
                raise SystemExit("mtmd_encode_chunk failed")
            n_tok = mtmd.mtmd_input_chunk_get_n_tokens(ch)
            ptr = mtmd.mtmd_get_output_embd(ctx)
            n_embd = llama_cpp.llama_model_n_embd(llm.model)
            embd = np.ctypeslib.as_array(ptr, shape=(n_tok * n_embd,)).reshape(n_tok, n_embd).copy()
    new_n_past = llama_cpp.llama_pos(0)
    if mtmd.mtmd_helper_eval_chunks(ctx, llm.ctx, chunks, 0, 0, N_BATCH, True, ctypes.byref(new_n_past)) != 0:
        raise SystemExit("mtmd_helper_eval_chunks failed")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()
    mtmd.mtmd_input_chunks_free(chunks)
    mtmd.mtmd_bitmap_free(bitmap)
    mtmd.mtmd_free(ctx)
    llm.close()
    return {"parts": parts, "embd": embd, "logits": logits, "n_pos": int(new_n_past.value)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures"))
    a = ap.parse_args()
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    from turboprefill.multimodal import QWEN2VL_CHAT_TEMPLATE, render_chat
    from turboprefill.writer_vl import write_pair

    out = Path(a.out)
    with tempfile.TemporaryDirectory() as td:
        tp, mp = Path(td) / "qwen2vl.gguf", Path(td) / "mmproj.gguf"
        info = write_pair(tp, mp, text=TEXT, vision=VISION)
        img = make_image(**IMAGE)
        prompt = render_chat(QWEN2VL_CHAT_TEMPLATE, messages("image"))
        r = llama_run(llama_cpp, mtmd, tp, mp, prompt, img)
        meta = {
            "llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
            "text_kwargs": TEXT,
            "vision_kwargs": VISION,
            "image": IMAGE,
            "question": QUESTION,
            "text_sha256": sha256(tp),
            "mmproj_sha256": sha256(mp),
            "text_tensor_types": sorted({t["type"] for t in info["text"]["tensors"].values()}),
            "parts": [p if isinstance(p, dict) else {"tokens": len(p)} for p in r["parts"]],
            "n_pos_after_prompt": r["n_pos"],
            "settings": {"backend": "cpu", "n_ctx": N_CTX, "n_batch": N_BATCH, "n_threads": 2,
                         "mmproj": "mtmd_init_from_file, use_gpu false, warmup false"},
            "argmax_last": int(np.argmax(r["logits"])),
            "npz_keys": "text_<i> int32: tokens of the i-th text chunk; image_embd float32 [n_image_tokens, "
            "n_embd]: the vision tower's output; logits_last float32 [n_vocab]",
        }
        arrays = {f"text_{i}": np.asarray(p, dtype=np.int32) for i, p in enumerate(r["parts"]) if isinstance(p, list)}
        np.savez_compressed(out / "qwen2vl-synthetic.npz", image_embd=r["embd"].astype(np.float32),
                            logits_last=r["logits"].astype(np.float32), **arrays)
        (out / "qwen2vl-synthetic.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(json.dumps({k: meta[k] for k in ("parts", "n_pos_after_prompt", "argmax_last")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

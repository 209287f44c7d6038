#!/usr/bin/env python3
"""Image + question → first answer token, sequential vs pipelined, on a synthetic Qwen2.5-VL pair.

What the VLM seed measured on 4 GPUs (one 1920×1080 image, ubatch 128, layer split), here on 2 CPU stages:
the time to first token (image preparation + vision tower + text prefill) and the prefill's tokens/s, with
the two schedules run alternately on the same engine settings so the ratio is measured under the same load.
The vision tower runs once per request on stage 0's device before the text prefill, in both schedules.

The models keep Qwen2.5-VL-72B's shape ratios at a size two cores can run: the text model has GQA 8:1,
heads of 128, n_ff/n_embd = 3.6, M-RoPE sections [16, 24, 24, 0], Q4_K_M; the vision tower has heads of 80,
n_ff/n_embd = 2.7, windowed attention (112 px) with full attention on every 8th layer
(as the real tower's layers 7, 15, 23, 31 of 32),
F16 weights, and a merger to the text width. A Full HD image is 2691 image tokens (69×39 merged patches).

    python bench/vlm.py --image 1920x1080 --repeat 2 --out bench/results/qwen2vl-fullhd
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from turboprefill.bench import image_ttft, image_ttft_table, machine_info
from turboprefill.writer_vl import write_pair


def synthetic_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]: smooth seeded colour blobs (a natural image is not white noise)."""
    rng = np.random.default_rng(seed)
    gy, gx = height // 64 + 2, width // 64 + 2
    small = rng.random((gy, gx, 3))
    ys = np.linspace(0, gy - 1.001, height)
    xs = np.linspace(0, gx - 1.001, width)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = small[y0][:, x0] * (1 - fx) + small[y0][:, x0 + 1] * fx
    bot = small[y0 + 1][:, x0] * (1 - fx) + small[y0 + 1][:, x0 + 1] * fx
    return np.clip(np.rint((top * (1 - fy) + bot * fy) * 255), 0, 255).astype(np.uint8)


def llama_cpp_times(text_path: Path, mmproj_path: Path, img: np.ndarray, question: str, threads: int,
                    ubatch: int) -> dict:
    """llama.cpp's own numbers on the same files and image (llama-cpp-python's mtmd): vision encode and the
    whole prompt's evaluation (mtmd_helper_eval_chunks: encode + text prefill), one CPU stage, `threads`."""
    import ctypes

    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    from turboprefill.multimodal import IMAGE_MARKUP, QWEN2VL_CHAT_TEMPLATE, render_chat

    llm = llama_cpp.Llama(model_path=str(text_path), n_ctx=8192, n_batch=ubatch, n_ubatch=ubatch, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup, params.print_timings = False, threads, False, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), llm.model, params)
    h, w, _ = img.shape
    buf = (ctypes.c_uint8 * img.size).from_buffer_copy(np.ascontiguousarray(img).tobytes())
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = render_chat(QWEN2VL_CHAT_TEMPLATE, msgs).replace(IMAGE_MARKUP, mtmd.mtmd_default_marker().decode())
    out = {}
    for key in ("encode", "prompt"):
        bitmap = mtmd.mtmd_bitmap_init(w, h, buf)
        chunks = mtmd.mtmd_input_chunks_init()
        inp = mtmd.mtmd_input_text(text.encode(), len(text.encode()), False, True)
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        t0 = time.perf_counter()
        if key == "encode":
            parts = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
            image_chunk = next(c for c in parts if mtmd.mtmd_input_chunk_get_type(c) != 0)  # 0: text
            assert mtmd.mtmd_encode_chunk(ctx, image_chunk) == 0
        else:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
            n_past = llama_cpp.llama_pos(0)
            assert mtmd.mtmd_helper_eval_chunks(ctx, llm.ctx, chunks, 0, 0, ubatch, True, ctypes.byref(n_past)) == 0
        out[key] = time.perf_counter() - t0
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
    mtmd.mtmd_free(ctx)
    llm.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="1920x1080", help="WIDTHxHEIGHT of the synthetic image")
    ap.add_argument("--devices", default="cpu:0,cpu:1")
    ap.add_argument("--threads", type=int, default=1, help="threads per text stage")
    ap.add_argument("--vision-threads", type=int, default=0, help="vision tower threads (0: all cores)")
    ap.add_argument("--ubatch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=1024, help="text width (72B: 8192)")
    ap.add_argument("--n-layer", type=int, default=12, help="text layers (72B: 80)")
    ap.add_argument("--vision-embd", type=int, default=320, help="vision width (real: 1280)")
    ap.add_argument("--vision-layers", type=int, default=8, help="vision layers (real: 32)")
    ap.add_argument("--question", default="Describe this image in detail.")
    ap.add_argument("--out", default=None, help="directory for results.md and results.json")
    ap.add_argument("--llama-cpp", action="store_true", help="also time llama.cpp (llama-cpp-python's mtmd) on the "
                    "same files: vision encode and the whole prompt on one CPU stage with all cores")
    a = ap.parse_args()
    width, height = (int(x) for x in a.image.lower().split("x"))

    head = 128
    text = dict(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_embd // head, n_head_kv=max(1, a.n_embd // head // 8),
                head_dim=head, n_ff=int(round(a.n_embd * 3.6 / 256)) * 256, n_vocab=2048, n_ctx=8192,
                quant="q4_k_m", seed=1, rope_sections=[16, 24, 24, 0])
    vision = dict(n_embd=a.vision_embd, n_layer=a.vision_layers, n_head=a.vision_embd // 80,
                  n_ff=int(round(a.vision_embd * 2.7 / 32)) * 32, n_wa_pattern=min(8, a.vision_layers),
                  weight_type="f16", seed=2)
    meta = machine_info()
    with tempfile.TemporaryDirectory() as td:
        tp, mp = Path(td) / "qwen2vl.gguf", Path(td) / "mmproj.gguf"
        write_pair(tp, mp, text=text, vision=vision)
        img = synthetic_image(width, height)
        res = image_ttft(str(tp), str(mp), img, a.question, devices=a.devices,
                         threads=a.threads, ubatch=a.ubatch, repeat=a.repeat, n_ctx=8192,
                         vision_threads=a.vision_threads or None)
        ref = None
        if a.llama_cpp:
            cores = meta["cores"] or 1
            ref = llama_cpp_times(tp, mp, img, a.question, cores, a.ubatch)
            ours = image_ttft(str(tp), str(mp), img, a.question, devices="cpu", threads=cores, ubatch=a.ubatch,
                              repeat=1, n_ctx=8192)["sequential"]
    lines = [
        f"# Image prefill: {width}×{height} image, synthetic Qwen2.5-VL shape, {a.devices}",
        "",
        f"machine: {meta['cpu']} ({meta['cores']} cores), git {meta['git_sha']}, {meta['date']}",
        f"command: python {' '.join(sys.argv)}",
        f"text model: {text}",
        f"vision tower: {vision}",
        f"ubatch {a.ubatch}, {a.threads} thread(s) per text stage, best of {a.repeat}",
        "",
        *image_ttft_table(res),
    ]
    if ref is not None:
        lines += ["", f"One CPU stage with all {meta['cores']} cores, same files and image (llama-cpp-python "
                  f"{__import__('llama_cpp').__version__}, its mtmd):", "",
                  "| engine | vision encode (s) | image + question to first token (s) |", "|---|---:|---:|",
                  f"| llama.cpp | {ref['encode']:.3f} | {ref['prompt']:.3f} |",
                  f"| turboprefill | {ours['encode']:.3f} | {ours['ttft']:.3f} |", "",
                  f"vision encode {ref['encode'] / ours['encode']:.2f}× llama.cpp's speed, whole prompt "
                  f"{ref['prompt'] / ours['ttft']:.2f}×"]
    print("\n".join(lines))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text("\n".join(lines) + "\n")
        (out / "results.json").write_text(json.dumps({"meta": meta, "runs": res["all"], "text": text,
                                                      "vision": vision, "image": [width, height]}, indent=1) + "\n")
    return 0 if res["same_first_token"] else 1


if __name__ == "__main__":
    sys.exit(main())

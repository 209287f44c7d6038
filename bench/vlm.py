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
        res = image_ttft(str(tp), str(mp), synthetic_image(width, height), a.question, devices=a.devices,
                         threads=a.threads, ubatch=a.ubatch, repeat=a.repeat, n_ctx=8192,
                         vision_threads=a.vision_threads or None)
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

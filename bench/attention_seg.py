#!/usr/bin/env python3
"""The vision tower's segmented attention (cpu_attention_seg) of two builds, timed alternately in one process,
and the Full HD encode of a synthetic tower with each build, alternately in subprocesses.

Shapes are Qwen2.5-VL's on a Full HD image: 10764 patches, heads of 80; `--heads 4` is bench/vlm.py's tower
(the real one has 16). "full" is the one segment of the full-attention layers, "win" the 64-patch windows of
the others. GFLOP/s count 4 · head_dim · n_head · Σ_s len_s² (Q·Kᵀ and P·V, 2 flops a multiply-add).

    cp build/libturboprefill.so /tmp/old.so   # at the commit to compare against, then rebuild
    python bench/attention_seg.py --old /tmp/old.so --new build/libturboprefill.so --encode
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import cffi
import numpy as np

_CDEF = """
int32_t tp_cpu_test_attention_seg(float* out, const float* q, const float* k, const float* v, int64_t n_tok,
                                  int32_t n_head, int32_t head_dim, float kq_scale, const int32_t* seg,
                                  int64_t n_seg, int32_t threads);
"""

_ENCODE = """
import sys, time
sys.path.insert(0, "bench")
from turboprefill import multimodal
from turboprefill.vision import VisionEncoder
from vlm import synthetic_image
enc = VisionEncoder(sys.argv[1], threads=int(sys.argv[2]))
px = multimodal.prepare_image(synthetic_image(1920, 1080), enc.info["image_mean"], enc.info["image_std"]).pixels
t0 = time.perf_counter()
enc.encode(px)
print(time.perf_counter() - t0)
"""


def time_op(lib, ffi, n, nh, hd, seg, threads, reps):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(n, nh * hd)).astype(np.float32) for _ in range(3))
    out = np.empty_like(q)
    bounds = np.asarray(seg, np.int32)
    p = lambda a, t="float *": ffi.cast(t, a.ctypes.data)  # noqa: E731
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        lib.tp_cpu_test_attention_seg(
            p(out), p(q), p(k), p(v), n, nh, hd, 1 / math.sqrt(hd), p(bounds, "int32_t *"), len(seg) - 1, threads
        )
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="libturboprefill.so of the build to compare against")
    ap.add_argument("--new", required=True)
    ap.add_argument("--n", type=int, default=10764)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=80)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="old/new alternations")
    ap.add_argument("--encode", action="store_true", help="also time the synthetic tower's Full HD encode")
    a = ap.parse_args()
    from turboprefill.bench import machine_info

    print(json.dumps({"machine": machine_info(), "old": a.old, "new": a.new}), flush=True)
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    libs = {"old": ffi.dlopen(os.path.abspath(a.old)), "new": ffi.dlopen(os.path.abspath(a.new))}
    n, nh, hd = a.n, a.heads, a.head_dim
    cases = {"full": [0, n], "win": list(range(0, n, 64)) + [n]}
    rows = []
    for name, seg in cases.items():
        flops = 4 * hd * nh * sum((e - b) ** 2 for b, e in zip(seg, seg[1:]))
        reps = 1 if name == "full" else 5
        t = {"old": math.inf, "new": math.inf}
        outs = {}
        for _ in range(a.rounds):
            for which in ("old", "new"):
                dt, outs[which] = time_op(libs[which], ffi, n, nh, hd, seg, a.threads, reps)
                t[which] = min(t[which], dt)
        row = {
            "case": name,
            "n": n,
            "n_seg": len(seg) - 1,
            "heads": nh,
            "head_dim": hd,
            "threads": a.threads,
            "old_s": t["old"],
            "new_s": t["new"],
            "old_gflops": flops / t["old"] / 1e9,
            "new_gflops": flops / t["new"] / 1e9,
            "speedup": t["old"] / t["new"],
            "max_diff": float(np.abs(outs["old"] - outs["new"]).max()),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.encode:
        from turboprefill.writer_vision import write_mmproj

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "mmproj.gguf")
            write_mmproj(
                path,
                n_embd=nh * hd,
                n_layer=8,
                n_head=nh,
                n_ff=864,
                proj_dim=1024,
                n_wa_pattern=8,
                weight_type="f16",
                seed=2,
            )
            t = {"old": math.inf, "new": math.inf}
            for _ in range(a.rounds):
                for which in ("old", "new"):
                    env = dict(os.environ, TURBOPREFILL_LIB=os.path.abspath(getattr(a, which)))
                    r = subprocess.run(
                        [sys.executable, "-c", _ENCODE, path, str(a.threads)],
                        env=env,
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    t[which] = min(t[which], float(r.stdout.split()[-1]))
            row = {
                "case": "encode_fullhd",
                "threads": a.threads,
                "old_s": t["old"],
                "new_s": t["new"],
                "speedup": t["old"] / t["new"],
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| case | old s | new s | old GFLOP/s | new GFLOP/s | speedup |\n|---|---|---|---|---|---|")
    for r in rows:
        g = f"{r['old_gflops']:.1f} | {r['new_gflops']:.1f}" if "old_gflops" in r else "– | –"
        print(f"| {r['case']} | {r['old_s']:.3f} | {r['new_s']:.3f} | {g} | {r['speedup']:.2f}× |")


if __name__ == "__main__":
    main()

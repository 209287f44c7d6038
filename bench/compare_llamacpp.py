#!/usr/bin/env python3
"""Our CPU prefill vs llama.cpp's (llama-cpp-python) on the same GGUF, prompt and thread count.

Runs alternate (ours, llama.cpp, ours, ...) on one random prompt and keep the best of --repeat for each,
so the ratio is measured in one run under the same machine load. llama-cpp-python is installed on demand
(it compiles llama.cpp: about 8 minutes on 2 cores).

Example:  python bench/compare_llamacpp.py gemma3-270m smollm2 --ctx 512,2048 --threads 1,2
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from turboprefill import Engine
from turboprefill.bench import machine_info
from turboprefill.models import resolve_model


def llama_cpp():
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        print("llama-cpp-python is not installed; installing it (compiles llama.cpp, ~8 min)...", flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "llama-cpp-python"])
        return importlib.import_module("llama_cpp")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=["gemma3-270m", "smollm2"])
    ap.add_argument("--ctx", default="512,2048")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--ubatch", type=int, default=512, help="ubatch for both engines (llama.cpp n_ubatch)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    a = ap.parse_args()
    lc = llama_cpp()
    meta = {**machine_info(), "llama_cpp_python": getattr(lc, "__version__", "?")}
    rows = []
    print("| model | tokens | threads | ours tok/s | llama.cpp tok/s | ours / llama.cpp |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in a.models:
        path = str(resolve_model(name))
        for ctx in [int(x) for x in a.ctx.split(",")]:
            for th in [int(x) for x in a.threads.split(",")]:
                eng = Engine(path, devices="cpu", threads=th, ubatch=a.ubatch, n_ctx=ctx)
                llm = lc.Llama(path, n_ctx=ctx, n_batch=a.ubatch, n_ubatch=a.ubatch, n_threads=th,
                               n_threads_batch=th, logits_all=False, verbose=False)
                toks = np.random.default_rng(ctx).integers(0, eng.config["n_vocab"], ctx).tolist()
                eng.prefill(toks[:32])  # warm-up both
                eng.reset()
                llm.reset()
                llm.eval(toks[:32])
                ours, theirs = [], []
                for _ in range(a.repeat):
                    eng.reset()
                    t = time.perf_counter()
                    eng.prefill(toks)
                    ours.append(time.perf_counter() - t)
                    llm.reset()
                    t = time.perf_counter()
                    llm.eval(toks)
                    theirs.append(time.perf_counter() - t)
                o, lc_tps = ctx / min(ours), ctx / min(theirs)
                row = {"model": Path(path).name, "tokens": ctx, "threads": th, "ours_tok_s": o,
                       "llama_cpp_tok_s": lc_tps,
                       "ratio": o / lc_tps, "meta": meta}
                rows.append(row)
                print(f"| {Path(path).name} | {ctx} | {th} | {o:.1f} | {lc_tps:.1f} | {o / lc_tps:.2f} |", flush=True)
                eng.close()
                del llm
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"\nmachine: {meta['cpu']} ({meta['cores']} cores), git {meta['git_sha']}, "
          f"llama-cpp-python {meta['llama_cpp_python']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

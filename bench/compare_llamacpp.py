#!/usr/bin/env python3
"""Our CPU prefill vs llama.cpp's (llama-cpp-python) on the same GGUF, prompt and thread count.

Runs alternate (ours, llama.cpp, ours, ...) on one random prompt and keep the best of --repeat for each,
so the ratio is measured in one run under the same machine load. llama-cpp-python is installed on demand
(it compiles llama.cpp: about 8 minutes on 2 cores).

Example:  python bench/compare_llamacpp.py gemma3-270m smollm2 --ctx 512,2048 --threads 1,2
          python bench/compare_llamacpp.py synthetic:gpt-oss --ctx 512,2048 --threads 2

A model is a .gguf path, a PyPI model name (turboprefill.models), or synthetic:NAME for one of the
SYNTHETIC shapes below, written once to bench/out/ by turboprefill.writer.
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

# Synthetic models with the proportions of the real ones, small enough for a 2-core machine.
# gpt-oss: gpt-oss-20b's ratios scaled down (n_embd 2880 -> 960, 64 -> 16 query heads of 64, 8 -> 2 KV
# heads, 32 experts top-4 of n_ff_exp = n_embd, 24 -> 4 layers), llama.cpp's MXFP4 mix (experts MXFP4,
# other matrices Q8_0): ~190 MB.
SYNTHETIC = {
    "gpt-oss": ("gpt-oss", dict(n_embd=960, n_head=16, n_head_kv=2, head_dim=64, n_expert=32, n_expert_used=4,
                                n_ff=960, n_ff_exp=960, n_layer=4, n_vocab=8192, quant="mxfp4", n_ctx=8192)),
}  # fmt: skip


def model_path(name: str) -> str:
    if not name.startswith("synthetic:"):
        return str(resolve_model(name))
    from turboprefill.writer import write_model

    arch, kw = SYNTHETIC[name.split(":", 1)[1]]
    path = Path(__file__).resolve().parent / "out" / f"synthetic-{name.split(':', 1)[1]}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_model(path, arch, **kw)
    return str(path)


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
    print("| model | tokens | threads | ours tok/s | llama.cpp tok/s | ours / llama.cpp | experts / ubatch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in a.models:
        path = model_path(name)
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
                    res = eng.prefill(toks)
                    ours.append(time.perf_counter() - t)
                    llm.reset()
                    t = time.perf_counter()
                    llm.eval(toks)
                    theirs.append(time.perf_counter() - t)
                o, lc_tps = ctx / min(ours), ctx / min(theirs)
                # MoE: distinct experts a ubatch's tokens are routed to, per layer (weights streamed per ubatch).
                ex = res.stats.get("experts_per_ubatch")
                row = {"model": Path(path).name, "tokens": ctx, "threads": th, "ours_tok_s": o,
                       "llama_cpp_tok_s": lc_tps, "ratio": o / lc_tps, "experts_per_ubatch": ex, "meta": meta}
                rows.append(row)
                exs = f"{ex:.1f}" if ex is not None else "-"
                print(f"| {Path(path).name} | {ctx} | {th} | {o:.1f} | {lc_tps:.1f} | {o / lc_tps:.2f} | {exs} |",
                      flush=True)
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

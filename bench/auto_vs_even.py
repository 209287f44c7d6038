#!/usr/bin/env python3
"""Balanced stages and cost-shaped ubatches vs the PoC's even split and fixed ubatches, on 2 CPU stages.

For each prompt length the two engines run alternately on the same prompt (best of --repeat), so the
ratio between them is measured under the same machine load. Efficiency = measured speedup over running
every step one at a time / the ideal M·P/(M+P−1) (the stats of Engine.prefill). The simulator, calibrated
from two other configurations' traces at each length (even split, ubatch/2 and 2·ubatch: per-stage fit),
predicts both engines at that length; its error is printed next to the measurement.

Example (the table in bench/README.md):
    python bench/auto_vs_even.py gemma3-270m --ctx 2048,8192 --ubatch 256 --repeat 3
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from turboprefill import Engine
from turboprefill.bench import machine_info
from turboprefill.costmodel import fit_handoff, fit_overhead, fit_trace, trace_rows, windows_of
from turboprefill.models import resolve_model
from turboprefill.simulate import simulate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="gemma3-270m", help="GGUF path or PyPI model name")
    ap.add_argument("--ctx", default="2048,8192")
    ap.add_argument("--ubatch", type=int, default=256, help="fixed ubatch, and ubatch_max of auto")
    ap.add_argument("--devices", default="cpu:0,cpu:1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    model = str(resolve_model(a.model))
    ctxs = [int(x) for x in a.ctx.split(",")]

    def make(n: int) -> dict:
        # Engines sized for the prompt (n_ctx = n), as a user would: the auto split is planned for a prompt
        # filling n_ctx, so each length gets its own plan. "cal:*" are the simulator's calibration: even
        # split at two other ubatch sizes, so per-token and per-step costs separate in the fit (positions
        # vary within a run, which gives the per-pair cost). Neither measured engine is such a configuration:
        # both simulated rows are predictions (tests/test_simulate.py calibrates the same way).
        kw = dict(devices=a.devices, threads=a.threads, n_ctx=n)
        return {
            "even + fixed": Engine(model, layer_split=None, ubatch=a.ubatch, **kw),
            "auto + auto": Engine(model, layer_split="auto", ubatch="auto", ubatch_max=a.ubatch, **kw),
            "cal:small": Engine(model, layer_split=None, ubatch=max(8, a.ubatch // 2), **kw),
            "cal:large": Engine(model, layer_split=None, ubatch=2 * a.ubatch, **kw),
        }

    meta = machine_info()
    print(f"model {model}; devices {a.devices}, {a.threads} thread(s) per stage; machine {meta['cpu']} "
          f"({meta['cores']} cores), git {meta['git_sha']}, {meta['date']}")
    print(f"command: python {' '.join(sys.argv)}")
    rows = []
    for n in ctxs:
        engines = make(n)
        ref = engines["even + fixed"]
        windows = windows_of(ref.layer_swa, ref.config["n_swa"])
        n_embd = ref.config["n_embd"]
        splits = {k: e.config["layer_split"] for k, e in engines.items()}
        print(f"ctx {n}: auto split {splits['auto + auto']} ({engines['auto + auto'].config['split_plan']['basis']})")
        toks = np.random.default_rng(0).integers(0, ref.config["n_vocab"], n).astype(np.int32)
        for e in engines.values():
            e.prefill(toks[:64])  # warm-up
        best = {}
        for _ in range(a.repeat):
            for name, e in engines.items():  # alternate: all see the same load
                e.reset()
                r = e.prefill(toks)
                if name not in best or r.stats["seconds"] < best[name].stats["seconds"]:
                    best[name] = r
        # Calibrate the simulator from this length's calibration run (per-stage fit); across lengths the
        # CPU's per-pair cost is not constant (the KV cache leaves the caches), see bench/README.md.
        split = splits["even + fixed"]
        ranges, b = [], 0
        for k in split:
            ranges.append((b, b + k))
            b += k
        cal = [best.pop("cal:small"), best.pop("cal:large")]
        tr = trace_rows(cal[0].trace, 0) + trace_rows(cal[1].trace, 0)
        handoff = float(np.median([fit_handoff(r.trace) for r in cal]))
        overhead = float(np.median([fit_overhead(r) for r in cal]))
        costs = [fit_trace([x for x in tr if x[0] == s], 0, ranges, windows) for s in range(len(split))]
        for name, r in best.items():
            ev = sorted((x for x in r.trace.events if x.stage == 0), key=lambda x: x.ubatch)
            bounds = [0] + list(np.cumsum([x.n_tokens for x in ev]))
            pred = simulate(costs, splits[name], windows, bounds, n_embd, "pipelined", handoff=handoff,
                            draws=64)[0] + overhead
            s = r.stats
            rows.append((n, name, splits[name], s["ubatches"], s["tokens_per_second"], s["ideal_speedup"],
                         s["efficiency"], pred, s["seconds"]))
    print()
    print("| ctx | engine | split | M | tok/s | ideal | efficiency | simulated s | measured s | sim. error |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for n, name, split, M, tps, ideal, eff, pred, sec in rows:
        print(f"| {n} | {name} | {split} | {M} | {tps:.0f} | {ideal:.2f}x | {100 * eff:.0f}% | {pred:.2f} | "
              f"{sec:.2f} | {100 * (pred / sec - 1):+.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

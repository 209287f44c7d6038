#!/usr/bin/env python3
"""Balanced stages and cost-shaped ubatches vs the PoC's even split and fixed ubatches, on 2 CPU stages.

For each prompt length the engines run in rounds, each engine once per round on the same prompt, so
ratios between them are measured under the same machine load; the table shows medians over rounds of
each round's values (and the best round's tok/s). Efficiency = measured speedup over running every step
one at a time / the ideal M·P/(M+P−1) (the stats of Engine.prefill); scaling = speedup over one stage
alone (ubatch 2·--ubatch, same prompt and round) / P. The simulator, calibrated from the
round's runs of two other configurations (even split, ubatch/2 and 2·ubatch: per-stage fit), predicts the
round's other runs; its median error is printed next to the measurement. --sweep adds the auto split
with other fixed ubatch sizes, to check the cost-shaped cut's count against the measured best size.

Example (the table in bench/README.md):
    python bench/auto_vs_even.py /tmp/sched_bench_gemma3_6.gguf --ctx 2048,8192 --ubatch 256 --repeat 7
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
    ap.add_argument("--sweep", default="", help="also run the auto split with these fixed ubatch sizes "
                    "(comma-separated), to compare auto's cut with the measured best fixed size")
    a = ap.parse_args()
    model = str(resolve_model(a.model))
    ctxs = [int(x) for x in a.ctx.split(",")]
    sweep = [int(x) for x in a.sweep.split(",") if x and int(x) != a.ubatch]

    def make(n: int) -> dict:
        # Engines sized for the prompt (n_ctx = n), as a user would: the auto split is planned for a prompt
        # filling n_ctx, so each length gets its own plan. "cal:*" are the simulator's calibration: even
        # split at two other ubatch sizes, so per-token and per-step costs separate in the fit (positions
        # vary within a run, which gives the per-pair cost). The compared engines are not such configurations,
        # so their simulated rows are predictions (a sweep row is in-sample when the auto split is even and
        # its size is a calibration size); tests/test_simulate.py calibrates the same way.
        # "auto + fixed" separates what the split gains from what the cut gains.
        kw = dict(devices=a.devices, threads=a.threads, n_ctx=n)
        engines = {
            "even + fixed": Engine(model, layer_split=None, ubatch=a.ubatch, **kw),
            "auto + fixed": Engine(model, layer_split="auto", ubatch=a.ubatch, **kw),
            "auto + auto": Engine(model, layer_split="auto", ubatch="auto", ubatch_max=a.ubatch, **kw),
        }
        for u in sweep:
            engines[f"auto + fixed {u}"] = Engine(model, layer_split="auto", ubatch=u, **kw)
        engines["cal:small"] = Engine(model, layer_split=None, ubatch=max(8, a.ubatch // 2), **kw)
        engines["cal:large"] = Engine(model, layer_split=None, ubatch=2 * a.ubatch, **kw)
        # One stage with one stage's threads: the yardstick of "scaling", which unlike the efficiency does
        # not depend on how many ubatches an engine cut (the efficiency's ideal does).
        engines["ref:1 stage"] = Engine(model, devices=a.devices.split(",")[0], threads=a.threads, n_ctx=n,
                                        layer_split=None, ubatch=2 * a.ubatch)
        return engines

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
        # Each round runs every engine once on the same prompt (so all see the same load) and is judged on
        # its own: ratios to the round's even + fixed run, efficiencies, and the simulator calibrated from
        # the round's two calibration runs (per-stage fit; across lengths the CPU's per-pair cost is not
        # constant, the KV cache leaves the caches) predicting the round's other runs. Columns are medians
        # over rounds (a burst of other jobs moves one round, not the median); tok/s is the best round.
        split = splits["even + fixed"]
        ranges, b = [], 0
        for k in split:
            ranges.append((b, b + k))
            b += k
        per = {name: [] for name in engines if ":" not in name}
        for _ in range(a.repeat):
            got = {}
            for name, e in engines.items():
                e.reset()
                got[name] = e.prefill(toks)
            cal = [got.pop("cal:small"), got.pop("cal:large")]
            single = got.pop("ref:1 stage").stats["seconds"]
            tr = trace_rows(cal[0].trace, 0) + trace_rows(cal[1].trace, 0)
            handoff = float(np.median([fit_handoff(r.trace) for r in cal]))
            overhead = float(np.median([fit_overhead(r) for r in cal]))
            costs = [fit_trace([x for x in tr if x[0] == s], 0, ranges, windows) for s in range(len(split))]
            for name, r in got.items():
                ev = sorted((x for x in r.trace.events if x.stage == 0), key=lambda x: x.ubatch)
                bounds = [0] + list(np.cumsum([x.n_tokens for x in ev]))
                pred = simulate(costs, splits[name], windows, bounds, n_embd, "pipelined", handoff=handoff,
                                draws=64)[0] + overhead
                per[name].append((r, bounds, pred / r.stats["seconds"] - 1,
                                  got["even + fixed"].stats["seconds"] / r.stats["seconds"],
                                  single / r.stats["seconds"] / len(split)))
        for name, rs in per.items():
            s = rs[0][0].stats
            sizes = np.diff(rs[0][1])

            def med(f, rs=rs):
                return float(np.median([f(x) for x in rs]))

            rows.append((n, name, splits[name], s["ubatches"], f"{sizes[0]}…{sizes[-1]}",
                         max(x[0].stats["tokens_per_second"] for x in rs), med(lambda x: x[3]),
                         [med(lambda x, i=i: x[0].stats["stage_busy_seconds"][i]) for i in range(len(split))],
                         s["ideal_speedup"], med(lambda x: x[0].stats["efficiency"]), med(lambda x: x[4]),
                         med(lambda x: x[2])))
        for e in engines.values():
            e.close()
    print()
    print("| ctx | engine | split | M | ubatch first…last | best tok/s | speed vs even + fixed | stage busy s "
          "| ideal | efficiency | scaling | sim. error |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, name, split, M, sizes, tps, rel, busy, ideal, eff, scaling, err in rows:
        print(f"| {n} | {name} | {split} | {M} | {sizes} | {tps:.0f} | {rel:.2f}x | "
              f"{' / '.join(f'{x:.3f}' for x in busy)} | {ideal:.2f}x | {100 * eff:.0f}% | "
              f"{100 * scaling:.0f}% | {100 * err:+.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

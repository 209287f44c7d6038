"""`turboprefill simulate`: the simulator (simulate.py) on this machine's measured costs or on device profiles.

Two uses:
- a GGUF model and cpu devices: calibrate the cost model on this machine (split.measure_stage_costs), then
  predict a prefill for the given ubatch/split/schedule, optionally next to a measured run of it;
- `--rfc`: the issue's GPU setups (4×RTX 3090 Llama-3-70B, 8×RTX 5060 Ti GPT-OSS-120B, 16K prompts),
  each profile's one assumed efficiency fitted to the stock sequential measurement, and the PoC's host
  cost per layer per wave fitted to the 3090 rig's PoC measurement; the rest predicted.
"""

from __future__ import annotations

from dataclasses import replace

from .costmodel import plan_split, windows_of
from .simulate import (
    MODELS,
    PROFILES,
    auto_bounds,
    even,
    fit_efficiency,
    fit_wave_overhead,
    fixed_bounds,
    ideal_seconds,
    simulate,
)

# The issue's measurements (tok/s, 16K prompt): stock llama.cpp layer split and the proof of concept.
RFC_SETUPS = [
    # (label, profile, gpus, model, stock tok/s, PoC tok/s)
    ("4×RTX 3090, Llama-3-70B Q4_K_M", "rtx3090", 4, "llama3-70b-q4km", 442.0, 968.0),
    ("8×RTX 5060 Ti, GPT-OSS-120B", "rtx5060ti", 8, "gpt-oss-120b", 1963.0, 4380.0),
]


def rfc_rows(n: int = 16384, ubatch: int = 512) -> list[dict]:
    """Per setup: two unknowns, each fitted to one of the RFC's measurements and checked on the other rig.
    eff (the profile's fraction of peak) makes the stock sequential run match; the PoC's host cost per layer
    per wave (graph build, launch and synchronization of each GPU's layers from its one thread, which the
    lockstep model without it misses) is fitted to the first setup's PoC run and applied unchanged to the
    others, whose own fit is shown next to it."""
    rows = []
    ref_eff = ref_wave = None
    for label, prof_name, P, model_name, stock, poc in RFC_SETUPS:
        prof, model = PROFILES[prof_name], MODELS[model_name]
        eff = fit_efficiency(prof, model, P, n, stock, "sequential", ubatch)
        wave = fit_wave_overhead(prof, model, P, n, poc, eff, ubatch)
        if ref_eff is None:
            ref_eff, ref_wave = eff, wave
        c = prof.cost(model, eff)
        costs, w = [c] * P, model.windows
        fixed = fixed_bounds(n, ubatch)
        split_auto = plan_split(costs, w, n=n, ubatch=ubatch)
        auto = auto_bounds(c, w, n, ubatch // 4, ubatch, n_stages=P)

        def tps(split, bounds, schedule, staging=False, cost=costs, w=w, model=model, prof=prof, wave=0.0):
            t, _ = simulate(cost, split, w, bounds, model.n_embd, schedule, prof.link, host_staging=staging,
                            wave_overhead=wave)
            return n / t

        cross = [prof.cost(model, ref_eff)] * P  # the 3090's efficiency applied to this card's peaks
        rows.append({
            "setup": label,
            "eff": eff,
            "stock_measured": stock,
            "stock_from_3090_eff": tps(even(model.n_layer, P), fixed, "sequential", cost=cross),
            "poc_measured": poc,
            "poc_no_host_cost": tps(even(model.n_layer, P), fixed, "lockstep"),
            "wave_overhead": wave,
            "poc_predicted": tps(even(model.n_layer, P), fixed, "lockstep", wave=ref_wave),
            "pipelined_even": tps(even(model.n_layer, P), fixed, "pipelined"),
            "pipelined_even_staged": tps(even(model.n_layer, P), fixed, "pipelined", staging=True),
            # Pessimistic: this engine's stage threads pay the PoC's host cost on every step too, but each on
            # its own thread, so it delays only that stage instead of every GPU.
            "pipelined_even_host_cost": tps(even(model.n_layer, P), fixed, "pipelined",
                                            cost=[replace(c, step=c.step + ref_wave * k)
                                                  for k in even(model.n_layer, P)]),
            "pipelined_auto_split": tps(split_auto, fixed, "pipelined"),
            "pipelined_auto": tps(split_auto, auto, "pipelined"),
            "ideal": n / ideal_seconds(costs, even(model.n_layer, P), w, fixed),
            "split_auto": split_auto,
        })
    return rows


def rfc_table(rows: list[dict]) -> str:
    ref = rows[0]["setup"].split(",")[0]
    out = [f"| setup | assumed eff (fit: stock) | stock measured | stock predicted ({ref} eff) | PoC measured "
           f"| PoC, lockstep without host cost | host ms per layer per wave (fit: PoC) "
           f"| PoC predicted ({ref} host cost) | pipelined, even, fixed 512 (peer) | same, host staging "
           f"| same + host cost per step per stage | pipelined, auto split, fixed 512 "
           f"| pipelined, auto split + auto ubatch | ideal (no bubbles) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['setup']} | {100 * r['eff']:.1f}% | {r['stock_measured']:.0f} | "
                   f"{r['stock_from_3090_eff']:.0f} | {r['poc_measured']:.0f} | {r['poc_no_host_cost']:.0f} | "
                   f"{1e3 * r['wave_overhead']:.2f} | {r['poc_predicted']:.0f} | "
                   f"{r['pipelined_even']:.0f} | {r['pipelined_even_staged']:.0f} | "
                   f"{r['pipelined_even_host_cost']:.0f} | {r['pipelined_auto_split']:.0f} | "
                   f"{r['pipelined_auto']:.0f} | {r['ideal']:.0f} |")
    return "\n".join(out)


def run(a) -> int:
    if a.rfc:
        print(rfc_table(rfc_rows(a.ctx[0] if a.ctx else 16384)))
        return 0
    from .engine import Engine
    from .models import resolve_model
    from .split import even_split, stage_entries

    path = str(resolve_model(a.model))
    entries = stage_entries(a.devices)
    P = len(entries)
    threads = [int(x) for x in a.threads.split(",")] if a.threads else [1] * P
    if len(threads) == 1:
        threads *= P
    with Engine(path, devices="cpu", threads=1, layer_split=None) as probe:
        windows = windows_of(probe.layer_swa, probe.config["n_swa"])
        n_embd = probe.config["n_embd"]
    # CPU stages share the machine (cores, caches, memory bandwidth), so they are measured running together,
    # as a pipelined prefill on an even split at the longest length asked for, each stage fitted on its own.
    from .split import measure_stage_costs

    costs = measure_stage_costs(path, a.devices, threads, len(windows), repeats=a.repeat, n_tokens=max(a.ctx))
    for s, c in enumerate(costs):
        print(f"stage {s} ({threads[s]} threads): tok {c.tok * 1e6:.2f} µs/token/layer, pair "
              f"{c.pair * 1e9:.2f} ns/pair/layer, step {c.step * 1e3:.3f} ms, head {c.head * 1e3:.2f} ms")
    split = (plan_split(costs, windows, n=max(a.ctx), ubatch=a.ubatch_max) if a.split == "auto"
             else even_split(len(windows), P) if a.split == "even" else [int(x) for x in a.split.split(",")])
    print(f"layer split: {split}")
    for n in a.ctx:
        for u in a.ubatch:
            bounds = (auto_bounds(costs[0], windows, n, max(1, a.ubatch_max // 8), a.ubatch_max, n_stages=P)
                      if u == "auto"
                      else fixed_bounds(n, int(u)))
            t, trace = simulate(costs, split, windows, bounds, n_embd, a.schedule)
            line = f"ctx {n} ubatch {u}: predicted {t:.3f} s ({n / t:.0f} tok/s, {len(bounds) - 1} ubatches)"
            if a.measure:
                eng = Engine(path, devices=a.devices, threads=threads, layer_split=split, schedule=a.schedule,
                             **({"ubatch": "auto", "ubatch_max": a.ubatch_max,
                                 "ubatch_cost": (costs[0].tok, costs[0].pair, costs[0].step * P / len(windows))}
                                if u == "auto" else {"ubatch": int(u)}))
                import numpy as np

                toks = np.random.default_rng(0).integers(0, eng.config["n_vocab"], n).astype(np.int32)
                eng.prefill(toks[:64])
                best = None
                for _ in range(a.repeat):
                    eng.reset()
                    s = eng.prefill(toks).stats["seconds"]
                    best = s if best is None else min(best, s)
                line += f", measured {best:.3f} s, error {100 * (t / best - 1):+.1f}%"
            print(line)
            if a.plot:
                trace.plot(a.plot.replace("{ctx}", str(n)).replace("{ubatch}", str(u)),
                           title=f"simulated: ctx {n}, ubatch {u}, split {split}")
    return 0

"""layer_split="auto": give each stage the layers that make the stages' predicted times equal.

A pipeline runs at the pace of its slowest stage, and stages differ: the first embeds, the last runs the
output head, sliding-window layers are cheaper than full-attention ones, and devices (or thread counts)
differ in speed. The plan comes from costmodel.plan_split over per-stage DeviceCosts:

- identical stages (same device kind, same threads): FLOP counts (the engine's ubatch cost defaults plus
  2·n_vocab·n_embd for the head), no measurement, so the split is deterministic and free;
- different stages: each stage's cost measured by a short calibration prefill on an even split (pipelined,
  so stages contend for the machine as they will later), fitted per stage, and cached per model + device
  + threads in costmodel.cache_dir()/costs.json so that later engines skip the measurement.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import numpy as np

from .costmodel import DeviceCost, _model_key, cache_dir, fit_trace, plan_split, stage_times, trace_rows, windows_of

# The split is planned for a prompt that fills the engine's context, up to this many tokens: attention's
# share (and with it the weight of full-attention vs sliding-window layers) grows with the prompt, and an
# engine is sized (n_ctx) for the prompts it will see.
PLAN_TOKENS = 16384
CAL_TOKENS = 384  # calibration prompt: long enough for attention to show, short enough to be cheap


def stage_entries(devices: str) -> list[str]:
    """One entry per stage, as the engine expands them ("cuda" = every visible GPU)."""
    out = []
    for e in (x.strip() for x in devices.split(",")):
        if e == "cpu":
            out.append(f"cpu:{len(out)}")
        elif e == "cuda":
            from .engine import cuda_devices

            out += [f"cuda:{g['index']}" for g in cuda_devices()["gpus"]]
        else:
            out.append(e)
    return out


def _kind(entry: str) -> str:
    if entry.startswith("cuda"):
        from .engine import cuda_devices

        idx = entry.split(":")[1] if ":" in entry else "0"
        gpus = cuda_devices()["gpus"]
        if not idx.isdigit() or int(idx) >= len(gpus):
            return entry  # not a visible GPU: the engine's own check reports it
        return "cuda:" + gpus[int(idx)]["name"].replace(" ", "_")
    return "cpu"


def device_kinds(devices: str) -> list[str]:
    """Per stage, what its speed depends on besides threads: "cpu" or "cuda:<GPU name>"."""
    return [_kind(e) for e in stage_entries(devices)]


def even_split(n_layer: int, P: int) -> list[int]:
    return [n_layer // P + (1 if s < n_layer % P else 0) for s in range(P)]


def _load_cache() -> dict:
    try:
        return json.loads((cache_dir() / "costs.json").read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: measure again


def _store_cache(entries: dict) -> None:
    table = _load_cache()
    table.update(entries)
    path = cache_dir() / "costs.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # read-only home: the plan holds, the next engine measures again


def measure_stage_costs(path: str, devices: str, threads: list[int], n_layer: int, repeats: int = 2,
                        n_tokens: int = CAL_TOKENS) -> list[DeviceCost]:
    """Per-stage DeviceCost from a calibration prefill on an even split; each step's time is the best of
    `repeats`. Ubatch sizes vary (a cost-shaped cut) so that per-token and per-step costs separate."""
    from .engine import Engine

    split = even_split(n_layer, len(threads))
    eng = Engine(path, devices=devices, threads=threads, layer_split=split, ubatch="auto", ubatch_min=16,
                 ubatch_max=96, ubatch_cost=(1.0, 0.02))
    windows = windows_of(eng.layer_swa, eng.config["n_swa"])
    n = min(n_tokens, eng.config["n_ctx"])
    toks = np.random.default_rng(0).integers(0, eng.config["n_vocab"], n).astype(np.int32)
    eng.prefill(toks[:32])  # warm-up: page faults, thread start
    best: dict[tuple[int, int], tuple] = {}
    for _ in range(repeats):
        eng.reset()
        for r in trace_rows(eng.prefill(toks).trace, 0):
            k = (r[0], r[1])
            if k not in best or r[4] - r[3] < best[k][4] - best[k][3]:
                best[k] = r
    eng.close()
    ranges, b = [], 0
    for k in split:
        ranges.append((b, b + k))
        b += k
    costs = []
    for s in range(len(split)):
        rows = [r for r in best.values() if r[0] == s]
        costs.append(fit_trace(rows, 0, ranges, windows))
    return costs


def auto_split(path: str, devices: str, threads: int | list[int] | None, cfg: dict, windows: list[int],
               flop_cost: DeviceCost, ubatch: int, kinds: list[str] | None = None) -> dict:
    """The split plan: {"split", "basis", "costs", "predicted_stage_times", "unit", "tokens", "ubatch", ...}:
    the layers per stage, where the costs came from, and each stage's predicted time for a prompt of
    `tokens` (and the even split's, for comparison)."""
    kinds = kinds or device_kinds(devices)
    P = len(kinds)
    if isinstance(threads, (list, tuple)):
        per = [int(t) for t in threads]
    else:
        per = [int(threads or 0) or max(1, (os.cpu_count() or 1) // P)] * P
    keys = [f"{_model_key(path)}:{k}:t{t}" for k, t in zip(kinds, per)]
    if len(set(keys)) == 1:
        costs, basis = [flop_cost] * P, "flop counts (identical stages)"
        unit = "flop-equivalents"
    else:
        table = _load_cache()
        if all(k in table for k in keys):
            costs, basis = [DeviceCost(**table[k]["cost"]) for k in keys], "measured (cached)"
            unit = "seconds"
        else:
            measured = measure_stage_costs(path, devices, per, cfg["n_layer"])
            # Stages of one key share a device kind: their fits are averaged. The head and embedding are
            # properties of the model on that device, seen only by the last / first stage's fit.
            by_key: dict[str, list[DeviceCost]] = {}
            for k, c in zip(keys, measured):
                by_key.setdefault(k, []).append(c)
            merged = {}
            for k, cs in by_key.items():
                merged[k] = DeviceCost(tok=float(np.mean([c.tok for c in cs])),
                                       pair=float(np.mean([c.pair for c in cs])),
                                       head=max(c.head for c in cs), embed=max(c.embed for c in cs),
                                       step=float(np.mean([c.step for c in cs])))
            _store_cache({k: {"cost": asdict(c), "model": path} for k, c in merged.items()})
            costs, basis = [merged[k] for k in keys], "measured"
            unit = "seconds"
    n = min(PLAN_TOKENS, cfg["n_ctx"])
    split = plan_split(costs, windows, n=n, ubatch=ubatch)
    return {
        "split": split,
        "basis": basis,
        "stage_threads": per,
        "costs": [asdict(c) for c in costs],
        "predicted_stage_times": stage_times(costs, split, windows, n, ubatch),
        "even_split": even_split(len(windows), P),
        "predicted_even_times": stage_times(costs, even_split(len(windows), P), windows, n, ubatch),
        "unit": unit,
        "tokens": n,
        "ubatch": ubatch,
    }

"""One model of cost (DESIGN §8), used three ways: equal-cost ubatch cuts (the engine's planner in
csrc/pipeline/plan.cpp, called through the C ABI), layer splits with equal stage times (plan_split), and
the pipeline simulator (simulate.py).

A device runs one (stage, ubatch) step of tokens at positions [p, p + t) in

    step + Σ_layers (tok · t + pair · pairs(p, t, window_l) + wread)
         + embed · t (first stage) + head (last ubatch of the last stage)

pairs(p, t, w) = Σ_{q=p}^{p+t-1} min(q + 1, w) (query-key pairs; w = ∞ for full attention). tok is the
per-token cost of one decoder layer (matmuls, norms, rope: linear in tokens), pair the attention's cost
per pair, head the output norm + lm_head of the one row a prefill returns, step a fixed cost per step
(thread hand-offs, launches), wread a layer's weight streaming per step (device profiles). The
coefficients come from measured traces (fit_trace, calibrate) or from a device profile (simulate.PROFILES).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ._native import check, ffi, lib


def pair_count(p: int, t: int, w: int = 0) -> float:
    """Query-key pairs of tokens at positions [p, p + t) with window w (0: full causal attention)."""

    def full(a: int, b: int) -> float:
        return (b * (b + 1) - a * (a + 1)) / 2.0 if b > a else 0.0

    if w <= 0:
        return full(p, p + t)
    split = min(max(w - 1, p), p + t)
    return full(p, split) + (p + t - split) * float(w)


def plan_ubatches(layer_swa: list[int], n_swa: int, tok: float, pair: float, n: int, pos0: int, umin: int,
                  umax: int, step: float = 0.0, n_stages: int = 1) -> list[int]:
    """The engine's equal-cost ubatch boundaries [0, b_1, ..., n] (csrc/pipeline/plan.cpp); step is the
    per-layer fixed cost of a ubatch, which with n_stages > 1 sets how many ubatches are worth it."""
    swa = ffi.new("int8_t[]", [1 if x else 0 for x in layer_swa])
    cap = n + 1
    out, m = ffi.new("int64_t[]", cap), ffi.new("int64_t *")
    check(lib.tp_plan_ubatches(swa, len(layer_swa), n_swa, tok, pair, step, n_stages, n, pos0, umin, umax, out,
                               cap, m))
    return [int(out[i]) for i in range(m[0])]


@dataclass
class DeviceCost:
    """Seconds per unit of work on one device (see the module docstring)."""

    tok: float  # per token per decoder layer
    pair: float  # per attention pair per decoder layer
    head: float = 0.0  # per prefill: the output head of the returned row (last stage)
    embed: float = 0.0  # per token: the embedding gather (first stage)
    step: float = 0.0  # per (stage, ubatch) step
    wread: float = 0.0  # per layer per step: streaming the layer's weights once per ubatch (device profiles;
    #                     on a measured cpu it is folded into step, which a fit cannot tell apart from it)
    jitter: float = 0.0  # log-std of measured step times around the model (fit_trace); 0 = deterministic

    def layers_time(self, p: int, t: int, windows: list[int]) -> float:
        """Time of tokens [p, p + t) through layers with these windows (0 = full attention)."""
        return sum(self.tok * t + self.pair * pair_count(p, t, w) + self.wread for w in windows)

    def step_time(self, p: int, t: int, windows: list[int], first: bool, last: bool) -> float:
        return self.step + self.layers_time(p, t, windows) + (self.embed * t if first else 0.0) + (
            self.head if last else 0.0)


def windows_of(layer_swa: list[int], n_swa: int) -> list[int]:
    return [n_swa if s and n_swa > 0 else 0 for s in layer_swa]


def fit_trace(events, pos0: int, layer_ranges: list[tuple[int, int]], windows: list[int]) -> DeviceCost:
    """Least-squares DeviceCost from measured steps of one device kind. events: (stage, ubatch, n_tokens,
    start, end, pos) tuples or TraceEvent-like objects plus positions; layer_ranges[s] = (begin, end) of
    stage s. The output head runs once per prefill in the last stage's last step; embedding is a table
    gather that a fit cannot separate from the first layer's per-token cost (both are linear in tokens on
    stage 0), so it is folded into tok and reported as 0."""
    rows, y = [], []
    P = len(layer_ranges)
    last_m = max(e[1] for e in events)
    for s, m, t, start, end, p in events:
        b, e = layer_ranges[s]
        w = windows[b:e]
        rows.append([len(w) * t, sum(pair_count(p, t, x) for x in w), 1.0,
                     1.0 if (s == P - 1 and m == last_m) else 0.0])
        y.append(end - start)
    A, y = np.array(rows, dtype=np.float64), np.array(y)
    # Columns on their own scale so that lstsq treats them alike. Coefficients must be >= 0: the most
    # negative one (a term the data cannot tell from another, e.g. per-token vs per-pair cost on layers
    # whose window is full: pairs = window × tokens) is dropped and the rest refitted, so that the kept
    # terms still explain the measured times (clipping instead would bias every prediction).
    keep = [0, 1, 2, 3]
    while True:
        sub = A[:, keep]
        scale = np.maximum(np.abs(sub).max(axis=0), 1e-30)
        x = np.linalg.lstsq(sub / scale, y, rcond=None)[0] / scale
        if (x >= 0).all() or len(keep) == 1:
            break
        del keep[int(np.argmin(x))]
    coef = dict.fromkeys(range(4), 0.0)
    coef.update({k: max(0.0, float(v)) for k, v in zip(keep, x)})
    fit = A @ np.array([coef[k] for k in range(4)])
    # Relative spread of the measured steps around the fit: other jobs and cache effects make step times
    # jitter, and in a pipeline that jitter makes stages wait on each other (simulate's `draws`).
    jitter = float(np.std(np.log(np.maximum(y, 1e-12) / np.maximum(fit, 1e-12)))) if len(y) > 4 else 0.0
    return DeviceCost(tok=coef[0], pair=coef[1], step=coef[2], head=coef[3], jitter=jitter)


def fit_handoff(trace) -> float:
    """Seconds from stage s finishing a ubatch to stage s+1 starting it, when s+1 was idle and waiting for
    it (median over such hand-offs): the copy plus the consumer's wake-up, which step times do not contain.
    0 without such hand-offs (one stage)."""
    at = {(e.stage, e.ubatch): e for e in trace.events}
    gaps = []
    for (s, m), e in at.items():
        nxt, prev = at.get((s + 1, m)), at.get((s + 1, m - 1))
        if nxt is not None and (prev is None or prev.end < e.end):
            gaps.append(max(0.0, nxt.start - e.end))
    return float(np.median(gaps)) if gaps else 0.0


def fit_overhead(result) -> float:
    """Seconds of a prefill outside its steps (thread start and join, the KV reserve, the first hand-off's
    wait on stage 0): wall seconds minus the time from 0 to the last step's end, plus the first start."""
    ev = result.trace.events
    return max(0.0, result.stats["seconds"] - max(e.end for e in ev) + min(e.start for e in ev))


def trace_rows(trace, pos0: int) -> list[tuple]:
    """(stage, ubatch, n_tokens, start, end, position of the ubatch's first token) for fit_trace."""
    first = {}
    pos = pos0
    for e in sorted((e for e in trace.events if e.stage == 0), key=lambda e: e.ubatch):
        first[e.ubatch] = pos
        pos += e.n_tokens
    return [(e.stage, e.ubatch, e.n_tokens, e.start, e.end, first[e.ubatch]) for e in trace.events]


# ---- calibration --------------------------------------------------------------------------------------

def cache_dir() -> Path:
    base = os.environ.get("TURBOPREFILL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "turboprefill")
    return Path(base)


def _model_key(path: str) -> str:
    st = os.stat(path)
    with open(path, "rb") as f:
        head = f.read(1 << 20)  # header + metadata: tells models apart without hashing the weights
    return hashlib.sha1(head + f"{st.st_size}".encode()).hexdigest()[:16]


def calibrate(path: str, device: str = "cpu", threads: int = 1, n_tokens: int = 384,
              ubatches: tuple[int, ...] = (32, 96), repeats: int = 2, use_cache: bool = True) -> DeviceCost:
    """Measure one device's DeviceCost for a model with short single-stage prefills (cached per model,
    device and thread count in cache_dir()/costs.json). Each step's time is the best of `repeats` runs,
    so a busy machine inflates the fit less."""
    from .engine import Engine

    key = f"{_model_key(path)}:{device}:t{threads}:n{n_tokens}"
    cache = cache_dir() / "costs.json"
    table = {}
    if use_cache and cache.exists():
        try:
            table = json.loads(cache.read_text())
        except (OSError, ValueError):
            table = {}  # a damaged cache is rebuilt, never fatal
        if key in table:
            return DeviceCost(**table[key]["cost"])
    rows = []
    for u in ubatches:
        eng = Engine(path, devices=device, threads=threads, ubatch=u, layer_split=None)
        windows = windows_of(eng.layer_swa, eng.config["n_swa"])
        n = min(n_tokens, eng.config["n_ctx"])
        toks = np.random.default_rng(0).integers(0, eng.config["n_vocab"], n).astype(np.int32)
        eng.prefill(toks[: min(n, u)])  # warm-up: first-touch page faults, thread start
        best: dict[int, tuple] = {}
        for _ in range(repeats):
            eng.reset()
            for r in trace_rows(eng.prefill(toks).trace, 0):
                if r[1] not in best or r[4] - r[3] < best[r[1]][4] - best[r[1]][3]:
                    best[r[1]] = r
        rows += list(best.values())
        eng.close()
    cost = fit_trace(rows, 0, [(0, len(windows))], windows)
    if use_cache:
        table[key] = {"cost": asdict(cost), "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "model": path}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(table, indent=1))
            tmp.replace(cache)
        except OSError:
            pass  # a read-only home: the plan still works, it just measures again next time
    return cost


# ---- layer split --------------------------------------------------------------------------------------

def stage_times(costs: list[DeviceCost], split: list[int], windows: list[int], n: int, ubatch: int) -> list[float]:
    """Predicted busy seconds of each stage for a prefill of n tokens in ubatches of `ubatch`."""
    out, b = [], 0
    P = len(split)
    for s, (c, k) in enumerate(zip(costs, split)):
        w = windows[b:b + k]
        t = 0.0
        for p in range(0, n, ubatch):
            t += c.step_time(p, min(ubatch, n - p), w, s == 0, False)
        out.append(t + (c.head if s == P - 1 else 0.0))
        b += k
    return out


def plan_split(costs: list[DeviceCost], windows: list[int], n: int = 2048, ubatch: int = 512) -> list[int]:
    """Contiguous layer counts per stage (each >= 1) that minimize the slowest stage's predicted time for a
    prefill of n tokens: a pipeline runs at the pace of its slowest stage. Exact (dynamic programming over
    (stage, first layer)); ties go to the split closest to even."""
    L, P = len(windows), len(costs)
    if P > L:
        raise ValueError(f"{P} stages for {L} layers; every stage needs at least one layer")
    pts = [(p, min(ubatch, n - p)) for p in range(0, n, ubatch)]
    # Prefix sums of each stage's per-layer time, so a stage's cost over layers [b, e) is O(1).
    pre = []
    for c in costs:
        per = [sum(c.tok * t + c.pair * pair_count(p, t, w) + c.wread for p, t in pts) for w in windows]
        pre.append(np.concatenate([[0.0], np.cumsum(per)]))

    def cost(s: int, b: int, e: int) -> float:
        c = costs[s]
        fixed = c.step * len(pts) + (c.embed * n if s == 0 else 0.0) + (c.head if s == P - 1 else 0.0)
        return float(pre[s][e] - pre[s][b]) + fixed

    memo: dict[tuple[int, int], tuple[float, float, list[int]]] = {}

    def best(s: int, b: int) -> tuple[float, float, list[int]]:
        # (max stage time, squared deviation from even, split) for stages s.. over layers b..L
        if (s, b) in memo:
            return memo[(s, b)]
        even = L / P
        if s == P - 1:
            r = (cost(s, b, L), (L - b - even) ** 2, [L - b])
        else:
            r = None
            for e in range(b + 1, L - (P - 1 - s) + 1):
                sub = best(s + 1, e)
                cand = (max(cost(s, b, e), sub[0]), sub[1] + (e - b - even) ** 2, [e - b] + sub[2])
                # Smaller bottleneck wins; within 1e-6 (float noise) the split nearer even does.
                if r is None or cand[0] < r[0] * (1 - 1e-6) or (cand[0] <= r[0] * (1 + 1e-6) and cand[1] < r[1]):
                    r = cand
        memo[(s, b)] = r
        return r

    return best(0, 0)[2]

"""The pipeline simulator (simulate.py) against measured CPU runs of the same model.

Calibration and measurement run interleaved in the same process: each round runs every configuration
once; the round's two calibration prefills (two ubatch sizes, so the per-token and per-step costs
separate; positions vary within a run, which gives the per-pair cost) give per-stage DeviceCosts, the
hand-off wake-up, the per-prefill overhead and the steps' jitter, and the simulator predicts that round's
other prefills (other ubatch sizes, lengths and a cost-shaped cut). Tolerance: the issue's 10% on the
median error over rounds. The simulator's dynamics (fill/drain bubbles, ring slots, stages waiting on
each other's jittering steps) are what this checks; the load of other processes on a shared machine is
what it cannot model, hence predictions from calibrations seconds apart and a median over rounds.
The measured runs use the calibration's schedule (pipelined): on a 2-core machine that other jobs also
load, two concurrent stages run each step slower than one stage alone, so a sequential run (one stage
busy at a time) is faster per step than a pipelined calibration says; the deterministic test below checks
the sequential schedule's rule instead.
"""

from __future__ import annotations

import numpy as np
import pytest

from turboprefill import Engine
from turboprefill.costmodel import DeviceCost, fit_handoff, fit_overhead, fit_trace, trace_rows
from turboprefill.simulate import (
    LINKS,
    PROFILES,
    ModelSpec,
    fit_efficiency,
    fit_wave_overhead,
    fixed_bounds,
    link_seconds,
    simulate,
)

TOLERANCE = 0.10  # the bound on |predicted / measured - 1|
REPEATS = 7  # rounds, each calibrating and measuring every configuration once


def _engine(path, devices, split, **kw):
    eng = Engine(path, devices=devices, threads=1, layer_split=split, **kw)
    eng.prefill(np.zeros(32, dtype=np.int32))  # warm-up: page faults, thread start
    return eng


@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 2])
def test_simulator_predicts_measured_cpu_runs(tmp_path, stages):
    from turboprefill.writer import write_model

    path = str(tmp_path / "sim.gguf")
    write_model(path, "llama", n_vocab=256, n_embd=256, n_layer=4, n_head=4, n_head_kv=1, n_ff=768, n_ctx=4096)
    toks = np.random.default_rng(0).integers(0, 256, 2048).astype(np.int32)
    devices = ",".join(f"cpu:{i}" for i in range(stages))
    split = [4] if stages == 1 else [2, 2]
    # Calibration: a run at each of two ubatch sizes, so that per-token and per-step costs
    # separate in the fit (positions vary within a run, which separates the attention's per-pair cost).
    # Validation: other ubatch sizes, lengths and a cost-shaped cut.
    cal_points = [(1536, 32), (1536, 128)]
    points = [(1536, 64), (1024, 48), (1280, "auto")]
    runs = {p: _engine(path, devices, split, **({"ubatch": p[1]} if p[1] != "auto" else
                                                 {"ubatch": "auto", "ubatch_min": 16, "ubatch_max": 96}))
            for p in cal_points + points}
    # Rounds run every configuration in turn, and each round's calibration runs predict that round's
    # runs: a burst of other jobs then slows a calibration and the runs it predicts alike (they are
    # seconds apart), where fits from the fastest runs of all rounds would meet measurements from other
    # moments. The verdict per configuration is the median error over rounds: a burst that hits one
    # round's calibration but not its runs (or the reverse) moves one round, not the median.
    ranges, b = [], 0
    for k in split:
        ranges.append((b, b + k))
        b += k
    errors = {p: [] for p in runs}
    for _ in range(REPEATS):
        got = {}
        for p, eng in runs.items():
            eng.reset()
            got[p] = eng.prefill(toks[:p[0]])
        rows = [r for p in cal_points for r in trace_rows(got[p].trace, 0)]
        costs = [fit_trace([r for r in rows if r[0] == s], 0, ranges, [0] * 4) for s in range(stages)]
        handoff = float(np.median([fit_handoff(got[p].trace) for p in cal_points]))
        overhead = float(np.median([fit_overhead(got[p]) for p in cal_points]))
        for (n, u), res in got.items():
            ev = sorted((e for e in res.trace.events if e.stage == 0), key=lambda e: e.ubatch)
            bounds = [0] + [int(x) for x in np.cumsum([e.n_tokens for e in ev])]
            assert bounds == (fixed_bounds(n, u) if u != "auto" else bounds)
            predicted = simulate(costs, split, [0] * 4, bounds, 256, "pipelined", handoff=handoff, draws=64)[0]
            errors[(n, u)].append((predicted + overhead) / res.stats["seconds"] - 1)
    median = {p: float(np.median(e)) for p, e in errors.items()}
    report = "\n".join(f"{stages} stage(s), n={n} ubatch={u}: median error {100 * median[(n, u)]:+.1f}% (rounds "
                       f"{' '.join(f'{100 * e:+.0f}' for e in errors[(n, u)])})" for n, u in runs)
    print(report)
    # In-sample (the calibration runs themselves) and out-of-sample points, both within the tolerance.
    assert all(abs(e) <= TOLERANCE for e in median.values()), report


def test_simulated_schedules_follow_the_pipeline_rules():
    """Deterministic: equal stages of cost c, M ubatches: pipelined = (M + P - 1)·c, sequential = M·P·c,
    and a slow link shows up once per hand-off."""
    c = DeviceCost(tok=1e-3, pair=0.0)
    P, M, u = 4, 10, 8
    b = fixed_bounds(M * u, u)
    t_pipe, trace = simulate([c] * P, [1] * P, [0] * P, b, 16, "pipelined", link="none")
    t_seq, _ = simulate([c] * P, [1] * P, [0] * P, b, 16, "sequential", link="none")
    step = u * 1e-3
    assert t_pipe == pytest.approx((M + P - 1) * step, rel=1e-9)
    assert t_seq == pytest.approx(M * P * step, rel=1e-9)
    assert len(trace.events) == P * M and trace.n_stages == P
    t_slow, _ = simulate([c] * 2, [1, 1], [0, 0], b, 1 << 20, "sequential", link="pcie3")
    copy = link_seconds("pcie3", u * (1 << 20) * 4)
    assert t_slow == pytest.approx(M * (2 * step + copy), rel=1e-9)
    assert link_seconds("pcie4", 1e9, host_staging=True) == pytest.approx(2 * link_seconds("pcie4", 1e9))
    assert set(PROFILES) >= {"rtx3090", "rtx5060ti", "p104-100", "a100", "h100"} and "nvlink3090" in LINKS


def test_profile_efficiency_fit_reproduces_its_anchor():
    m = ModelSpec("toy", 8, 1024, 8, 2, 128, 4096, 32000)
    eff = fit_efficiency(PROFILES["rtx3090"], m, 2, 4096, 20000.0, "sequential", 512)
    c = PROFILES["rtx3090"].cost(m, eff)
    t, _ = simulate([c] * 2, [4, 4], m.windows, fixed_bounds(4096, 512), m.n_embd, "sequential", "pcie4")
    assert 4096 / t == pytest.approx(20000.0, rel=1e-3)


def test_lockstep_host_cost_is_paid_per_layer_of_each_busy_stage_and_fits_its_anchor():
    """Lockstep waves: wave w ends at its slowest step, then the host pays wave_overhead per layer of every
    busy stage. Equal stages of cost c, split [1, 3] on free links: M + P - 1 waves of c, plus h for each
    (ubatch, layer) pair. fit_wave_overhead inverts it for a profile."""
    c = DeviceCost(tok=1e-3, pair=0.0)
    M, u, h = 6, 8, 2e-4
    b = fixed_bounds(M * u, u)
    base, _ = simulate([c] * 2, [1, 3], [0] * 4, b, 16, "lockstep", link="none")
    with_h, _ = simulate([c] * 2, [1, 3], [0] * 4, b, 16, "lockstep", link="none", wave_overhead=h)
    assert with_h - base == pytest.approx(h * M * 4, rel=1e-9)
    m = ModelSpec("toy", 8, 1024, 8, 2, 128, 4096, 32000)
    eff = fit_efficiency(PROFILES["rtx3090"], m, 2, 4096, 20000.0, "sequential", 512)
    wave = fit_wave_overhead(PROFILES["rtx3090"], m, 2, 4096, 30000.0, eff, 512)
    assert wave > 0
    t, _ = simulate([PROFILES["rtx3090"].cost(m, eff)] * 2, [4, 4], m.windows, fixed_bounds(4096, 512), m.n_embd,
                    "lockstep", "pcie4", wave_overhead=wave)
    assert 4096 / t == pytest.approx(30000.0, rel=1e-9)

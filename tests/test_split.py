"""layer_split="auto" (split.py, costmodel.plan_split): stages get the layers that equalize their predicted
times. Checked against brute force over every split, on identical stages (deterministic FLOP plan), and on
stages of different speed (measured costs, cached per model + device + threads)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from turboprefill import Engine
from turboprefill.costmodel import DeviceCost, plan_split, stage_times
from turboprefill.split import even_split

from conftest import SYNTHETIC


def brute_force(costs, windows, n, ubatch):
    L, P = len(windows), len(costs)
    best = None
    for cuts in itertools.combinations(range(1, L), P - 1):
        split = [b - a for a, b in zip((0,) + cuts, cuts + (L,))]
        t = max(stage_times(costs, split, windows, n, ubatch))
        best = t if best is None else min(best, t)
    return best


@pytest.mark.parametrize("speeds", [(1, 1), (2, 1), (1, 3), (1, 1, 1), (3, 1, 2), (1, 2, 2, 1)])
@pytest.mark.parametrize("windows", [[0] * 12, [16, 16, 16, 16, 16, 0] * 2])
def test_plan_split_minimizes_the_slowest_stage(speeds, windows):
    costs = [DeviceCost(tok=1.0 / v, pair=0.002 / v, head=300.0 / v, step=5.0) for v in speeds]
    split = plan_split(costs, windows, n=1024, ubatch=128)
    assert sum(split) == len(windows) and min(split) >= 1
    got = max(stage_times(costs, split, windows, 1024, 128))
    assert got == pytest.approx(brute_force(costs, windows, 1024, 128), rel=1e-9)


def test_faster_stage_gets_more_layers_and_head_moves_layers_off_the_last():
    w = [0] * 12
    fast_first = plan_split([DeviceCost(tok=0.5, pair=0), DeviceCost(tok=1.0, pair=0)], w, n=512, ubatch=128)
    assert fast_first[0] > fast_first[1]
    heavy_head = plan_split([DeviceCost(tok=1.0, pair=0), DeviceCost(tok=1.0, pair=0, head=2000.0)], w, 512, 128)
    assert heavy_head[0] > heavy_head[1]
    assert plan_split([DeviceCost(tok=1.0, pair=0)] * 2, w, 512, 128) == [6, 6]


def test_identical_stages_plan_without_measuring(synthetic_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOPREFILL_CACHE", str(tmp_path / "cache"))
    path = synthetic_model("gemma3")
    eng = Engine(path, devices="cpu:0,cpu:1", threads=1)
    plan = eng.config["split_plan"]
    assert plan["basis"].startswith("flop counts") and plan["split"] == eng.config["layer_split"]
    assert sum(plan["split"]) == 7 and len(plan["predicted_stage_times"]) == 2
    assert max(plan["predicted_stage_times"]) <= max(plan["predicted_even_times"]) * (1 + 1e-12)
    assert not (tmp_path / "cache").exists()  # nothing measured, nothing cached
    again = Engine(path, devices="cpu:0,cpu:1", threads=1)
    assert again.config["layer_split"] == plan["split"]  # deterministic
    assert Engine(path, threads=1).config["split_plan"] is None  # one stage: nothing to split
    assert Engine(path, devices="cpu:0,cpu:1", threads=1, layer_split=None).config["layer_split"] == [4, 3]
    assert Engine(path, devices="cpu:0,cpu:1", threads=1, layer_split=[2, 5]).config["layer_split"] == [2, 5]


def test_different_stages_use_cached_costs(synthetic_model, tmp_path, monkeypatch):
    """Stages of 2 and 1 threads: the plan reads their costs from the cache (written here with a known 2×
    speed ratio, so the outcome does not depend on this machine's load) and gives the fast stage more."""
    from turboprefill.costmodel import _model_key

    cache = tmp_path / "cache"
    monkeypatch.setenv("TURBOPREFILL_CACHE", str(cache))
    path = synthetic_model("llama", n_layer=12)
    key = _model_key(str(path))
    cache.mkdir()
    (cache / "costs.json").write_text(json.dumps({
        f"{key}:cpu:t2": {"cost": dict(tok=1e-4, pair=1e-7, head=0.0, embed=0.0, step=0.0)},
        f"{key}:cpu:t1": {"cost": dict(tok=2e-4, pair=2e-7, head=0.0, embed=0.0, step=0.0)},
    }))
    fast_first = Engine(path, devices="cpu:0,cpu:1", threads=[2, 1]).config
    assert fast_first["split_plan"]["basis"] == "measured (cached)"
    assert fast_first["layer_split"] == [8, 4]
    assert Engine(path, devices="cpu:0,cpu:1", threads=[1, 2]).config["layer_split"] == [4, 8]


def test_measured_costs_are_cached_and_give_a_valid_split(synthetic_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOPREFILL_CACHE", str(tmp_path / "cache"))
    path = synthetic_model("llama", n_layer=6)
    eng = Engine(path, devices="cpu:0,cpu:1", threads=[2, 1])
    plan = eng.config["split_plan"]
    assert plan["basis"] == "measured" and sum(plan["split"]) == 6 and min(plan["split"]) >= 1
    # A fit may drop a term the calibration cannot separate, but every stage must cost something.
    assert all(c["tok"] + c["pair"] + c["step"] > 0 for c in plan["costs"])
    assert all(t > 0 for t in plan["predicted_stage_times"])
    table = json.loads((tmp_path / "cache" / "costs.json").read_text())
    assert len(table) == 2  # one entry per (model, device kind, threads)
    again = Engine(path, devices="cpu:0,cpu:1", threads=[2, 1])
    assert again.config["split_plan"]["basis"] == "measured (cached)"
    assert again.config["layer_split"] == plan["split"]
    # Whatever the split, the results are those of one stage.
    toks = np.random.default_rng(0).integers(0, SYNTHETIC["llama"][1]["n_vocab"], 50)
    assert np.array_equal(again.prefill(toks).logits, Engine(path, threads=1).prefill(toks).logits)


def test_per_stage_threads_errors(synthetic_model):
    path = synthetic_model("llama")
    with pytest.raises(ValueError, match="threads has 3 entries"):
        Engine(path, devices="cpu:0,cpu:1", threads=[1, 1, 1], layer_split=None)
    with pytest.raises(ValueError, match=">= 1"):
        Engine(path, devices="cpu:0,cpu:1", threads=[1, 0], layer_split=None)
    with pytest.raises(ValueError, match='"auto"'):
        Engine(path, devices="cpu:0,cpu:1", layer_split="balanced")


def test_even_split_matches_the_engine():
    assert even_split(7, 2) == [4, 3] and even_split(12, 5) == [3, 3, 2, 2, 2]


def test_info_shows_the_split_plan(synthetic_model, capsys, tmp_path, monkeypatch):
    from turboprefill.cli import main

    monkeypatch.setenv("TURBOPREFILL_CACHE", str(tmp_path / "cache"))
    path = synthetic_model("gemma3")
    assert main(["info", str(path), "--devices", "cpu:0,cpu:1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    want = Engine(path, devices="cpu:0,cpu:1", threads=1).config["layer_split"]
    assert f"layer split on cpu:0,cpu:1: {want}" in out
    assert "stage 1:" in out and "flop counts" in out and "even split" in out


def test_auto_ubatch_uses_measured_costs_of_the_split(synthetic_model, tmp_path, monkeypatch):
    """With measured stage costs (cached here with a strong attention term) ubatch="auto" cuts with them,
    not with FLOP counts: the trace shows the planner's cut for the measured coefficients."""
    from turboprefill.costmodel import _model_key, plan_ubatches

    cache = tmp_path / "cache"
    monkeypatch.setenv("TURBOPREFILL_CACHE", str(cache))
    path = synthetic_model("llama", n_layer=12)
    key = _model_key(str(path))
    cache.mkdir()
    cost = dict(tok=1e-4, pair=1e-5, head=0.0, embed=0.0, step=0.0)
    (cache / "costs.json").write_text(json.dumps({f"{key}:cpu:t2": {"cost": cost}, f"{key}:cpu:t1": {"cost": cost}}))
    eng = Engine(path, devices="cpu:0,cpu:1", threads=[2, 1], ubatch="auto", ubatch_min=4, ubatch_max=64)
    res = eng.prefill(np.arange(300) % 300)
    got = [0] + [int(x) for x in np.cumsum([e.n_tokens for e in sorted(
        (e for e in res.trace.events if e.stage == 0), key=lambda e: e.ubatch)])]
    assert got == plan_ubatches([0] * 12, 0, 1e-4, 1e-5, 300, 0, 4, 64)
    assert got != plan_ubatches([0] * 12, 0, *eng_flop(path), 300, 0, 4, 64)


def eng_flop(path):
    from turboprefill._native import ffi, lib

    e = Engine(path, threads=1)
    tok, pair = ffi.new("double *"), ffi.new("double *")
    lib.tp_engine_cost_defaults(e._handle(), tok, pair)
    return tok[0], pair[0]


@pytest.mark.parametrize("n_ctx, want", [(2048, [3, 3]), (8192, [5, 1])])
def test_flop_split_of_the_bench_model_is_the_measured_best(tmp_path, monkeypatch, n_ctx, want):
    """bench/README.md's model (Gemma-3-shaped, 6 layers: five 256-token sliding windows, then one full
    layer) on 2 identical stages. Stage busy times measured there (same prompt, alternating): at 2K [3, 3]
    0.087 / 0.107 s beats [4, 2] 0.115 / 0.079 s; at 8K the full layer alone balances five windowed ones.
    The FLOP plan must find both; with attention weighted 2× (plan.cpp's kAttnFlopCost before) it chose
    [4, 2] at 2K."""
    from turboprefill.writer import write_model

    monkeypatch.setenv("TURBOPREFILL_CACHE", str(tmp_path / "cache"))
    path = str(tmp_path / "g6.gguf")
    write_model(path, "gemma3", n_vocab=4096, n_embd=128, n_layer=6, n_head=2, n_head_kv=1, head_dim=64, n_ff=384,
                n_ctx=8192, sliding_window=256)
    eng = Engine(path, devices="cpu:0,cpu:1", threads=1, n_ctx=n_ctx, ubatch=256)
    assert eng.config["split_plan"]["basis"].startswith("flop counts")
    assert eng.config["layer_split"] == want

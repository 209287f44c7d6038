"""Cost-shaped ubatches (ubatch="auto", csrc/pipeline/plan.h): the cut has ubatches of about equal modelled
cost within [ubatch_min, ubatch_max], and because the CPU kernels compute every (row, token) in an order
independent of the batch composition, the logits and KV cache equal a fixed-ubatch run bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from turboprefill import Engine
from turboprefill.costmodel import pair_count, plan_ubatches

from conftest import SYNTHETIC


def prompt(n: int, n_vocab: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, n_vocab, n)]


def cost(b, e, tok, pair, swa, n_swa):
    return sum(tok * (e - b) + pair * pair_count(b, e - b, n_swa if w else 0) for w in swa)


@pytest.mark.parametrize("n,pos0", [(1, 0), (83, 0), (2048, 0), (5000, 0), (3000, 4000), (700, 9000)])
@pytest.mark.parametrize("swa", [[0] * 4, [1, 1, 1, 0]])
def test_plan_is_equal_cost_within_bounds(n, pos0, swa):
    tok, pair, n_swa, umin, umax = 1.0, 0.01, 256, 32, 512
    b = plan_ubatches(swa, n_swa, tok, pair, n, pos0, umin, umax)
    assert b[0] == 0 and b[-1] == n and all(x < y for x, y in zip(b, b[1:]))
    sizes = np.diff(b)
    assert sizes.max() <= umax
    if n >= umin:
        assert sizes.min() >= umin
    costs = [cost(pos0 + x, pos0 + y, tok, pair, swa, n_swa) for x, y in zip(b, b[1:])]
    if len(costs) > 1 and sizes.min() > umin:
        # Equal up to one token of the dearest ubatch (boundaries are whole tokens).
        one_token = tok * len(swa) + pair * len(swa) * (pos0 + n)
        assert max(costs) - min(costs) <= 2 * one_token
    # Fewest ubatches: one fewer would need one larger than umax, at the same total cost.
    first_umax = cost(pos0, pos0 + min(umax, n), tok, pair, swa, n_swa)
    assert len(costs) <= max(int(np.ceil(sum(costs) / first_umax - 1e-9)), -(-n // umax))


def test_late_ubatches_shrink_when_attention_dominates():
    b = plan_ubatches([0] * 2, 0, 1.0, 0.05, 4096, 0, 16, 512)
    sizes = np.diff(b)
    assert sizes[0] == max(sizes) and sizes[-1] < sizes[0] / 2


def test_plan_rejects_bad_bounds():
    with pytest.raises(ValueError, match="ubatch_min"):
        plan_ubatches([0], 0, 1.0, 0.1, 100, 0, 64, 32)


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
@pytest.mark.parametrize("stages", [1, 2])
def test_auto_ubatch_bit_identical_to_fixed(synthetic_model, name, stages):
    path = synthetic_model(name)
    n_vocab = SYNTHETIC[name][1]["n_vocab"]
    devices = ",".join(f"cpu:{i}" for i in range(stages))
    a, b = prompt(150, n_vocab, 3), prompt(61, n_vocab, 4)
    fixed = Engine(path, devices=devices, threads=1, ubatch=16)
    fixed.prefill(a)
    ref = fixed.prefill(b, all_logits=True)
    # Strong attention coefficient so the cut really varies in size on these short prompts.
    auto = Engine(path, devices=devices, threads=1, ubatch="auto", ubatch_min=3, ubatch_max=40,
                  ubatch_cost=(1.0, 0.05))
    first = auto.prefill(a)
    sizes = sorted({e.n_tokens for e in first.trace.events})
    assert len(sizes) > 2, sizes
    got = auto.prefill(b, all_logits=True)
    assert np.array_equal(got.logits, ref.logits)
    assert auto.kv_digest() == fixed.kv_digest()


def test_engine_uses_the_planned_cut(synthetic_model):
    """The engine's trace shows exactly the boundaries the planner returns (one planner, two callers)."""
    path = synthetic_model("gemma3")
    eng = Engine(path, threads=1, ubatch="auto", ubatch_min=4, ubatch_max=48, ubatch_cost=(1.0, 0.02))
    cfg_swa = eng.layer_swa
    eng.prefill(prompt(30, 200, 5))
    res = eng.prefill(prompt(200, 200, 6))
    want = plan_ubatches(cfg_swa, eng.config["n_swa"], 1.0, 0.02, 200, 30, 4, 48)
    got = [0] + list(np.cumsum([e.n_tokens for e in sorted(res.trace.events, key=lambda e: e.ubatch)]))
    assert got == want
    assert eng.config["ubatch"] == "auto" and eng.config["ubatch_min_max"] == (4, 48)


def test_auto_ubatch_argument_errors(synthetic_model):
    path = synthetic_model("llama")
    with pytest.raises(ValueError, match="ubatch_min"):
        Engine(path, ubatch="auto", ubatch_min=600, ubatch_max=512)
    with pytest.raises(ValueError, match='"auto"'):
        Engine(path, ubatch="big")
    with pytest.raises(ValueError, match="ubatch_min/ubatch_max"):
        Engine(path, ubatch=64, ubatch_max=128)
    with pytest.raises(ValueError, match="cost"):
        Engine(path, ubatch="auto", ubatch_cost=(1.0, 0.0))


def test_ubatch_count_trades_fill_and_drain_against_step_cost():
    """With a per-ubatch cost and P > 1 stages, M = sqrt((P-1)·C/step) (T(M) = C + (P-1)·C/M + M·step is
    least there), clamped to [ceil(n / umax), n / umin]; one stage keeps the fewest equal-cost ubatches."""
    swa, tok, pair, n, umin, umax = [0] * 4, 1.0, 0.001, 4096, 16, 1024
    total = sum(tok * n + pair * pair_count(0, n, 0) for _ in swa)
    fewest = len(plan_ubatches(swa, 0, tok, pair, n, 0, umin, umax)) - 1
    assert len(plan_ubatches(swa, 0, tok, pair, n, 0, umin, umax, step=50.0, n_stages=1)) - 1 == fewest
    for P, step in [(2, 50.0), (4, 50.0), (2, 5.0)]:
        b = plan_ubatches(swa, 0, tok, pair, n, 0, umin, umax, step=step, n_stages=P)
        want = min(max(round(np.sqrt((P - 1) * total / (step * len(swa)))), -(-n // umax)), n // umin)
        assert len(b) - 1 == want, (P, step)
        assert np.diff(b).max() <= umax
    huge = plan_ubatches(swa, 0, tok, pair, n, 0, umin, umax, step=1e9, n_stages=4)
    assert list(np.diff(huge)) == [umax] * (n // umax)  # a step dearer than any bubble: as few as umax allows
    # Fewer ubatches than an all-equal cut needs: the cheap early ones stop at umax, the rest cost the same.
    b = plan_ubatches(swa, 0, tok, 0.01, n, 0, umin, 512, step=400.0, n_stages=2)  # M* = 15
    sizes = np.diff(b)
    assert sizes[0] == 512 and sizes[-1] < 512
    late = [cost(x, y, tok, 0.01, swa, 0) for x, y in zip(b, b[1:]) if y - x < 512]
    assert max(late) - min(late) <= 2 * (tok + 0.01 * n) * len(swa)

"""Intra-prompt pipeline: stages on several CPU devices, both schedules, trace and stats, errors,
cancellation, and the activation ring."""

from __future__ import annotations

import _thread
import gc
import json
import os
import threading
import time

import numpy as np
import pytest

from turboprefill import CancelledError, Engine, TurboPrefillError
from turboprefill._native import ffi, lib

from conftest import SYNTHETIC


def prompt(n: int, n_vocab: int, seed: int = 2) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, n_vocab, n)]


def run(path, toks, **kw):
    eng = Engine(path, threads=1, **kw)
    res = eng.prefill(toks, all_logits=True)
    return res, eng.kv_digest(), eng


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_schedules_bit_identical_across_stage_counts(synthetic_model, name, stages):
    """Same kernels, same order per ubatch: logits and KV caches equal bit for bit, for every stage count
    and against the single-stage engine."""
    path = synthetic_model(name)
    toks = prompt(101, SYNTHETIC[name][1]["n_vocab"])
    devices = ",".join(f"cpu:{i}" for i in range(stages))
    single, single_kv, _ = run(path, toks, devices="cpu", ubatch=7)
    for schedule in ("sequential", "pipelined"):
        res, kv, _ = run(path, toks, devices=devices, ubatch=7, schedule=schedule)
        assert np.array_equal(res.logits, single.logits), schedule
        assert kv == single_kv, schedule


@pytest.mark.parametrize("ubatch", [1, 7, 64, 96, 512])
@pytest.mark.parametrize("n_tok", [1, 65, 200])
def test_schedules_bit_identical_across_ubatch_sizes(synthetic_model, ubatch, n_tok):
    path = synthetic_model("gemma3")
    toks = prompt(n_tok, 200, seed=ubatch)
    seq, seq_kv, _ = run(path, toks, devices="cpu:0,cpu:1,cpu:2", ubatch=ubatch, schedule="sequential")
    pip, pip_kv, _ = run(path, toks, devices="cpu:0,cpu:1,cpu:2", ubatch=ubatch, schedule="pipelined")
    assert np.array_equal(seq.logits, pip.logits)
    assert seq_kv == pip_kv


def test_kv_digest_sees_the_cache(synthetic_model):
    """The digest that the schedule tests compare must change when the cache does."""
    path = synthetic_model("llama")
    _, a, _ = run(path, prompt(30, 300, seed=1), devices="cpu:0,cpu:1", ubatch=8)
    _, b, _ = run(path, prompt(30, 300, seed=2), devices="cpu:0,cpu:1", ubatch=8)
    assert a != b


def test_layer_split_and_stage_placement(synthetic_model):
    path = synthetic_model("gemma3")
    toks = prompt(50, 200)
    base, base_kv, _ = run(path, toks, devices="cpu", ubatch=16)
    res, kv, eng = run(path, toks, devices=["cpu:0", "cpu:1"], ubatch=16, layer_split=[5, 2])
    assert eng.config["n_stages"] == 2
    assert np.array_equal(res.logits, base.logits) and kv == base_kv


def test_trace_and_stats(synthetic_model, tmp_path):
    path = synthetic_model("qwen2")
    res, _, _ = run(path, prompt(70, 150), devices="cpu:0,cpu:1,cpu:2", ubatch=16)
    ev = res.trace.events
    assert len(ev) == 3 * 5 and res.trace.n_stages == 3 and res.trace.n_ubatches == 5
    for s in range(3):
        mine = sorted((e for e in ev if e.stage == s), key=lambda e: e.ubatch)
        assert [e.ubatch for e in mine] == list(range(5))
        assert all(e.start <= e.end for e in mine)
        assert all(a.end <= b.start for a, b in zip(mine, mine[1:]))  # a stage does one ubatch at a time
    for m in range(5):  # ubatch m reaches stage s+1 only after stage s finished it
        by_stage = {e.stage: e for e in ev if e.ubatch == m}
        assert by_stage[0].end <= by_stage[1].start and by_stage[1].end <= by_stage[2].start
    assert [e.n_tokens for e in ev if e.stage == 0] == [16, 16, 16, 16, 6]
    st = res.stats
    assert st["tokens"] == 70 and st["stages"] == 3 and st["ubatches"] == 5
    assert st["ideal_speedup"] == pytest.approx(5 * 3 / (5 + 3 - 1))
    assert 0.0 <= st["bubble_fraction"] < 1.0
    assert len(st["stage_busy_seconds"]) == 3 and all(b > 0 for b in st["stage_busy_seconds"])
    res.trace.to_chrome_trace(tmp_path / "t.json")
    doc = json.loads((tmp_path / "t.json").read_text())
    assert sum(1 for e in doc["traceEvents"] if e["ph"] == "X") == 15
    res.trace.plot(tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sequential_schedule_runs_one_ubatch_at_a_time(synthetic_model):
    path = synthetic_model("llama256")
    res, _, _ = run(path, prompt(64, 200), devices="cpu:0,cpu:1", ubatch=8, schedule="sequential")
    ev = sorted(res.trace.events, key=lambda e: (e.ubatch, e.stage))
    for a, b in zip(ev, ev[1:]):  # strictly one step after another
        assert a.end <= b.start


def test_stage_error_names_stage_and_layer_and_engine_recovers(synthetic_model):
    path = synthetic_model("gemma3")
    toks = prompt(60, 200)
    # Even split pinned (layer_split=None): the test names which stage owns layer 4, and the default
    # "auto" split of this model puts its five cheap sliding-window layers on stage 0.
    eng = Engine(path, devices="cpu:0,cpu:1,cpu:2", threads=1, ubatch=8, layer_split=None)
    good = eng.prefill(toks).logits
    eng.reset()
    eng._inject_fault(4)  # layers 0-2 | 3-4 | 5-6: stage 1
    with pytest.raises(TurboPrefillError, match=r"stage 1 \(cpu:1, layers 3-4\), layer 4: injected fault"):
        eng.prefill(toks)
    assert eng.n_past == 0
    eng._inject_fault(-1)
    assert np.array_equal(eng.prefill(toks).logits, good)


def _slow_engine(synthetic_model, **kw):
    # ~2.4 s or more of compute (idle 2-core EPYC): a long prompt through small ubatches, so that the cancel at
    # 0.3 s still finds it running on a loaded machine. Cancelled, it costs only those 0.3 s.
    path = synthetic_model("llama256", n_ctx=8192)
    return Engine(path, devices="cpu:0,cpu:1", threads=1, ubatch=4, n_ctx=8192, **kw), prompt(8000, 200)


def test_cancel_from_another_thread(synthetic_model):
    eng, toks = _slow_engine(synthetic_model)
    threading.Timer(0.3, eng.cancel).start()
    t0 = time.monotonic()
    with pytest.raises(CancelledError):
        eng.prefill(toks)
    assert time.monotonic() - t0 < 0.3 + 1.0
    assert eng.n_past == 0
    assert eng.prefill(toks[:10]).logits.shape == (200,)  # still usable


def test_ctrl_c_cancels_within_a_second(synthetic_model):
    eng, toks = _slow_engine(synthetic_model)
    threading.Timer(0.3, _thread.interrupt_main).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        eng.prefill(toks)
    assert time.monotonic() - t0 < 0.3 + 1.0
    assert eng.prefill(toks[:10]).logits.shape == (200,)


def _threads() -> int:
    # Python threads that are finishing (a prefill's helper thread, an earlier test's Timer) are joined
    # first, so that only native threads the engine failed to stop can make the count grow. Engines of
    # earlier tests kept alive only by reference cycles (a pytest.raises traceback) are collected first: each
    # holds its stage threads until freed, and a collection mid-test would change the count.
    gc.collect()
    for t in threading.enumerate():
        if t is not threading.main_thread():
            t.join(timeout=5)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_no_thread_or_memory_leak_across_engines(synthetic_model):
    path = synthetic_model("qwen3")
    toks = prompt(40, 150)

    def cycle():
        eng = Engine(path, devices="cpu:0,cpu:1", threads=2, ubatch=8)
        eng.prefill(toks)
        eng.close()

    for _ in range(5):
        cycle()
    threads, rss = _threads(), _rss_mib()
    for _ in range(60):
        cycle()
    # A joined Python thread (the prefill's helper) may still be leaving the kernel's task list for a moment:
    # give exiting threads up to 2 s; a leaked thread never leaves.
    deadline = time.time() + 2.0
    while _threads() > threads and time.time() < deadline:
        time.sleep(0.01)
    assert _threads() == threads
    assert _rss_mib() - rss < 20  # MiB; one engine of this model holds < 2 MiB


@pytest.mark.parametrize("capacity", [1, 2, 3, 8])
def test_ring_stress(capacity):
    errors = ffi.new("int64_t *")
    assert lib.tp_ring_stress(capacity, 200_000, 0, 7, errors) == 0
    assert errors[0] == 0
    assert lib.tp_ring_stress(capacity, 5_000, 3000, 11, errors) == 0  # randomized delays
    assert errors[0] == 0

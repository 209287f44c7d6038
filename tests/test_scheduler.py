"""The server's scheduler driven directly (no HTTP): the prompt ubatch cap while answers stream (issue #12's
"a long prompt never stalls streaming answers for more than about one ubatch time")."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from turboprefill import Engine
from turboprefill.sampling import SamplingParams, Step
from turboprefill.server import scheduler
from turboprefill.server.scheduler import Request, Scheduler
from turboprefill.writer_vl import add_qwen_tokenizer


class Collector:
    """A request's consumer: its steps, and an event once it finished."""

    def __init__(self, first_token: threading.Event | None = None):
        self.steps: list = []
        self.done = threading.Event()
        self.first_token = first_token

    def __call__(self, ev) -> None:
        self.steps.append(ev)
        if self.first_token is not None:
            self.first_token.set()
        if not isinstance(ev, Step) or ev.finish_reason is not None:
            self.done.set()


def prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 200, n)]


@pytest.mark.parametrize("stream_ubatch, stall_target, cap", [
    (0, None, None),  # no cap
    (8, None, 8),
    ("auto", None, None),  # 0.1 s of this tiny model's prompt work is more than its whole ubatch of 32
    ("auto", 1e-4, 16),  # a target so short that the cap is the floor
])
def test_prompt_ubatches_are_capped_while_an_answer_streams(synthetic_model, monkeypatch, stream_ubatch,
                                                            stall_target, cap):
    """Request A streams a long answer; request B's long prompt arrives meanwhile: B's ubatches are cut to the
    cap (none when there is none), and once nothing streams the engine is back to its full ubatches. Both
    answers are the ones each gets alone."""
    if stall_target is not None:
        monkeypatch.setattr(scheduler, "STALL_TARGET", stall_target)
    path = synthetic_model("llama256", n_ctx=4096, n_vocab=400, tokenizer=add_qwen_tokenizer)
    eng = Engine(path, devices="cpu:0,cpu:1", threads=1, ubatch=32, n_ctx=4096, n_seq=2)
    greedy = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    pa, pb = prompt(20, 1), prompt(1500, 2)
    alone = {}
    for name, p in (("a", pa), ("b", pb)):
        c = Collector()
        sch = Scheduler(eng, 1, 4)
        sch.submit(Request(p, greedy if name == "a" else SamplingParams(temperature=0, max_tokens=1), c))
        assert c.done.wait(120)
        sch.close()
        alone[name] = [s.token for s in c.steps]

    sch = Scheduler(eng, 2, 4, stream_ubatch=stream_ubatch)
    first = Collector()
    sch.submit(Request(prompt(40, 4), SamplingParams(temperature=0, max_tokens=1), first))  # measures the rate
    assert first.done.wait(60)
    streaming = threading.Event()
    a, b = Collector(streaming), Collector()
    sch.submit(Request(pa, greedy, a))
    assert streaming.wait(60)
    sch.submit(Request(pb, SamplingParams(temperature=0, max_tokens=1), b))
    assert b.done.wait(120) and a.done.wait(120)
    sch.close()
    assert [s.token for s in a.steps] == alone["a"] and [s.token for s in b.steps] == alone["b"]
    # B (one token: its last call is the prefill) took the slot A left.
    trace, _ = eng._trace(1)
    sizes = [e.n_tokens for e in sorted(trace.events, key=lambda e: e.ubatch) if e.stage == 0]
    assert sum(sizes) == 1500
    if cap:
        assert max(sizes) == cap, sizes
    else:
        assert sizes.count(32) == 1500 // 32, sizes
    eng.free_seq(0)
    eng.free_seq(1)
    res = eng.prefill(prompt(64, 3))
    assert [e.n_tokens for e in res.trace.events if e.stage == 0] == [32, 32]


def test_negative_cap_is_an_error(synthetic_model):
    eng = Engine(synthetic_model("llama256", n_vocab=400, tokenizer=add_qwen_tokenizer), n_seq=1)
    for bad in (-1, "fast", 1.5j):
        with pytest.raises(ValueError, match="stream_ubatch"):
            Scheduler(eng, 1, 4, stream_ubatch=bad)


def test_a_model_without_vocabulary_fails_the_request_not_the_scheduler(synthetic_model):
    """Sampling needs the vocabulary: without one the request gets a 500 and the scheduler goes on."""
    eng = Engine(synthetic_model("llama256"), n_seq=1)
    sch = Scheduler(eng, 1, 4)
    try:
        for seed in (1, 2):  # the slot was given back: the second request is served (and fails) too
            c = Collector()
            sch.submit(Request(prompt(10, seed), SamplingParams(temperature=0, max_tokens=3), c))
            assert c.done.wait(60)
            assert len(c.steps) == 1 and c.steps[0].status == 500 and "vocabulary" in c.steps[0].message
    finally:
        sch.close()

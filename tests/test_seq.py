"""Several sequences in one engine (issue #12): per-slot KV caches, prefills of different sequences interleaved
through the pipeline, batched decode, and the errors, cancellation and faults around them.

The oracle is always the same engine configuration run on one sequence alone: a sequence's logits and KV
cache must be bit-identical whatever else ran beside it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from turboprefill import CancelledError, ContextOverflowError, Engine
from turboprefill._native import ffi, lib

from conftest import SYNTHETIC

MODELS = ["llama", "qwen3", "gemma3", "gpt-oss", "qwen2vl"]  # dense, qk-norm, sliding window, MoE, M-RoPE


def prompt(n: int, n_vocab: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, n_vocab, n)]


def vocab(name: str) -> int:
    return SYNTHETIC[name][1]["n_vocab"]


def engine(path, n_seq=1, **kw):
    kw = {"devices": "cpu:0,cpu:1", "threads": 1, "ubatch": 7, **kw}
    return Engine(path, n_seq=n_seq, **kw)


def alone(path, chunks, **kw):
    """Each chunk prefilled (all logits) in turn on a fresh one-sequence engine: (logits list, kv digest)."""
    eng = engine(path, **kw)
    out = [eng.prefill(c, all_logits=True).logits for c in chunks]
    return out, eng.kv_digest()


def in_threads(*fns):
    """Runs the functions in threads started together; returns their results (re-raising the first error)."""
    results: list = [None] * len(fns)
    errors: list = []

    def wrap(i, f):
        try:
            results[i] = f()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i, f)) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("schedule", ["pipelined", "sequential"])
def test_interleaved_prefills_equal_each_alone(synthetic_model, name, schedule):
    """Two threads prefill two sequences (two chunks each) at once: each slot's logits and KV cache are bit
    for bit those of the sequence alone."""
    path = synthetic_model(name)
    a = [prompt(61, vocab(name), 1), prompt(23, vocab(name), 2)]
    b = [prompt(45, vocab(name), 3), prompt(9, vocab(name), 4)]
    a_alone, a_kv = alone(path, a, schedule=schedule)
    b_alone, b_kv = alone(path, b, schedule=schedule)
    eng = engine(path, n_seq=2, schedule=schedule)

    def run(seq, chunks):
        return [eng.prefill(c, all_logits=True, seq=seq).logits for c in chunks]

    a_got, b_got = in_threads(lambda: run(0, a), lambda: run(1, b))
    for got, want in zip(a_got + b_got, a_alone + b_alone):
        np.testing.assert_array_equal(got, want)
    assert eng.kv_digest(0) == a_kv and eng.kv_digest(1) == b_kv
    assert eng.seq_info(0)[0] == 84 and eng.seq_info(1)[0] == 54


@pytest.mark.parametrize("name", MODELS)
def test_decode_batch_equals_each_alone(synthetic_model, name):
    """Three sequences at different lengths decoded in one batch (three steps): every row equals the one-token
    prefill of that sequence alone, and so do the KV caches."""
    path = synthetic_model(name)
    prompts = [prompt(n, vocab(name), 10 + n) for n in (5, 17, 40)]
    steps = [[int(t) for t in np.random.default_rng(s).integers(0, vocab(name), 3)] for s in range(3)]
    eng = engine(path, n_seq=3)
    for s, p in enumerate(prompts):
        eng.prefill(p, seq=s)
    got = [eng.decode([2, 0, 1], [steps[k][2], steps[k][0], steps[k][1]]) for k in range(3)]
    for s in range(3):
        want, kv = alone(path, [prompts[s]] + [[steps[k][s]] for k in range(3)])
        row = [1, 2, 0][s]  # where sequence s sits in the decode batch
        for k in range(3):
            np.testing.assert_array_equal(got[k][row], want[k + 1][0])
        assert eng.kv_digest(s) == kv
        assert eng.seq_info(s) == (len(prompts[s]) + 3,) * 2


@pytest.mark.parametrize("name", MODELS)
def test_greedy_decode_equals_generate(synthetic_model, name):
    """A greedy loop over decode() on sequence 1 of a shared engine picks the tokens Engine.generate picks
    (greedy by one-token prefills) on a one-sequence engine."""
    path = synthetic_model(name)
    p = prompt(30, vocab(name), 7)
    want = engine(path).generate(p, max_new_tokens=10, stop_at_eos=False)
    eng = engine(path, n_seq=2)
    eng.prefill(prompt(12, vocab(name), 8), seq=0)  # another sequence in the engine meanwhile
    nxt = int(np.argmax(eng.prefill(p, seq=1).logits))
    got = [nxt]
    while len(got) < 10:
        logits = eng.decode([1, 0], [nxt, 3])
        nxt = int(np.argmax(logits[0]))
        got.append(nxt)
    assert got == want


def test_free_and_reuse_slot(synthetic_model):
    """A freed slot starts over at position 0 and, reused for a shorter prompt, gives that prompt's exact
    results; the other slot is untouched."""
    path = synthetic_model("gemma3")
    a, b, c = prompt(50, 200, 1), prompt(20, 200, 2), prompt(33, 200, 3)
    eng = engine(path, n_seq=2)
    eng.prefill(a, seq=1)
    eng.prefill(c, seq=0)
    c_kv = eng.kv_digest(0)
    eng.free_seq(1)
    assert eng.seq_info(1) == (0, 0)
    got = eng.prefill(b, all_logits=True, seq=1).logits
    (want,), b_kv = alone(path, [b])
    np.testing.assert_array_equal(got, want)
    assert eng.kv_digest(1) == b_kv and eng.kv_digest(0) == c_kv
    assert eng.n_past == 33 and eng.config["n_seq"] == 2


def test_second_request_enters_before_first_leaves(synthetic_model):
    """Continuous scheduling on 2 stages: request B (submitted while A runs) has its first ubatch on stage 0
    before A's last ubatch has left stage 1."""
    path = synthetic_model("llama256", n_ctx=4096)
    eng = Engine(path, devices="cpu:0,cpu:1", threads=1, ubatch=8, n_ctx=4096, n_seq=2)
    starts: dict = {}
    results: dict = {}

    def req(seq, toks, delay):
        time.sleep(delay)
        starts[seq] = time.monotonic()
        results[seq] = eng.prefill(toks, seq=seq)

    in_threads(lambda: req(0, prompt(1200, 200, 1), 0.0), lambda: req(1, prompt(64, 200, 2), 0.15))
    ta, tb = results[0].trace.events, results[1].trace.events
    a_last_end = starts[0] + max(e.end for e in ta if e.stage == 1)
    b_first_start = starts[1] + min(e.start for e in tb if e.stage == 0 and e.ubatch == 0)
    assert b_first_start < a_last_end
    assert {e.ubatch for e in tb} == set(range(8)) and results[1].stats["tokens"] == 64


def test_decode_not_stalled_by_long_prefill(synthetic_model):
    """A decode issued while a 2000-token prompt runs on 2 pipelined stages completes before that prompt does:
    it overtakes the prompt's queued ubatches at stage 0."""
    path = synthetic_model("llama256", n_ctx=4096)
    eng = Engine(path, devices="cpu:0,cpu:1", threads=1, ubatch=4, n_ctx=4096, n_seq=2)
    eng.prefill(prompt(10, 200, 3), seq=1)
    done: dict = {}

    def long_prefill():
        eng.prefill(prompt(2000, 200, 4), seq=0)
        done["prefill"] = time.monotonic()

    def one_decode():
        time.sleep(0.05)
        eng.decode([1], [5])
        done["decode"] = time.monotonic()

    in_threads(long_prefill, one_decode)
    assert done["decode"] < done["prefill"]
    assert eng.seq_info(0)[0] == 2000 and eng.seq_info(1)[0] == 11


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("schedule", ["pipelined", "sequential"])
def test_ubatch_limit_cuts_ubatches_and_keeps_results(synthetic_model, name, schedule):
    """set_ubatch_limit(3) cuts every planned ubatch of 7 into pieces of at most 3 (7 -> 3, 3, 1): the trace shows
    them, and the logits (every token) and KV cache are bit-identical to the planned ubatches' on the CPU."""
    path = synthetic_model(name)
    chunks = [prompt(30, vocab(name), 11), prompt(9, vocab(name), 12)]
    ref, ref_kv = alone(path, chunks, schedule=schedule)
    eng = engine(path, schedule=schedule)
    eng.set_ubatch_limit(3)
    res = [eng.prefill(c, all_logits=True) for c in chunks]
    for r, want, c in zip(res, ref, chunks):
        np.testing.assert_array_equal(r.logits, want)
        sizes = [e.n_tokens for e in sorted(r.trace.events, key=lambda e: e.ubatch) if e.stage == 0]
        full, tail = divmod(len(c), 7)
        assert sizes == [3, 3, 1] * full + [3] * (tail // 3) + ([tail % 3] if tail % 3 else []), sizes
    assert eng.kv_digest() == ref_kv
    eng.set_ubatch_limit(None)
    assert [e.n_tokens for e in eng.prefill(prompt(14, vocab(name), 13)).trace.events if e.stage == 0] == [7, 7]


def test_ubatch_limit_applies_to_a_running_prefill(synthetic_model):
    """A limit set while a long prompt runs cuts the rest of that prompt's ubatches (the server lowers it when a
    request starts streaming), and the prompt's logits stay those of an uncut run."""
    path = synthetic_model("llama256", n_ctx=4096)
    toks = prompt(4000, 200, 5)
    eng = Engine(path, devices="cpu:0,cpu:1", threads=1, ubatch=64, n_ctx=4096, n_seq=2)
    want = eng.prefill(toks, seq=1).logits
    eng.free_seq(1)

    def lower():  # as soon as the prompt's first ubatch is in the pipeline (about 60 more to come)
        while not any(eng.in_flight()):
            time.sleep(0.0005)
        eng.set_ubatch_limit(16)

    res, _ = in_threads(lambda: eng.prefill(toks, seq=0), lower)
    sizes = [e.n_tokens for e in sorted(res.trace.events, key=lambda e: e.ubatch) if e.stage == 0]
    assert sum(sizes) == 4000 and sizes[0] == 64 and 16 in sizes, sizes
    k = sizes.index(16)
    assert all(n == 64 for n in sizes[:k]) and all(n == 16 for n in sizes[k:]), sizes
    np.testing.assert_array_equal(res.logits, want)
    with pytest.raises(ValueError, match="ubatch limit"):
        eng.set_ubatch_limit(-1)


def _status(call) -> tuple[int, str]:
    st = call()
    return st, ffi.string(lib.tp_last_error()).decode()


def test_errors_leave_every_slot_as_it_was(synthetic_model):
    path = synthetic_model("llama")
    eng = engine(path, n_seq=3, n_ctx=32)
    eng.prefill(prompt(20, 300, 1), seq=0)
    eng.prefill(prompt(31, 300, 2), seq=1)
    before = [(eng.seq_info(s), eng.kv_digest(s)) for s in range(3)]
    h = eng._handle()
    seqs, toks = ffi.new("int32_t[]", [0, 2, 0]), ffi.new("int32_t[]", [1, 2, 3])
    logits = ffi.new("float[]", 3 * 300)
    st, msg = _status(lambda: lib.tp_engine_decode(h, 3, seqs, toks, logits, 3 * 300))
    assert st == lib.TP_ERR_INVALID_ARGUMENT and "sequence 0 twice" in msg
    bad = ffi.new("int32_t[]", [1, 3])
    st, msg = _status(lambda: lib.tp_engine_decode(h, 2, bad, toks, logits, 3 * 300))
    assert st == lib.TP_ERR_INVALID_ARGUMENT and "sequence id 3 is out of range [0, 3)" in msg
    st, msg = _status(lambda: lib.tp_engine_prefill_seq(h, -1, toks, 3, ffi.NULL, 0, ffi.NULL, 0, logits, 300))
    assert st == lib.TP_ERR_INVALID_ARGUMENT and "sequence id -1" in msg
    st, msg = _status(lambda: lib.tp_engine_seq_free(h, 7))
    assert st == lib.TP_ERR_INVALID_ARGUMENT
    with pytest.raises(ContextOverflowError, match="after 20 already in sequence 0"):
        eng.prefill(prompt(13, 300, 3), seq=0)
    eng.decode([1], [4])  # slot 1 is now full
    before[1] = (eng.seq_info(1), eng.kv_digest(1))
    with pytest.raises(ContextOverflowError, match="sequence 1 already holds 32"):
        eng.decode([0, 1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="twice"):
        eng.decode([2, 2], [1, 2])
    assert [(eng.seq_info(s), eng.kv_digest(s)) for s in range(3)] == before


def test_same_sequence_twice_at_once_is_an_error(synthetic_model):
    """The C ABI refuses a second call on a busy sequence (Python waits instead: one lock per sequence)."""
    path = synthetic_model("llama256", n_ctx=8192)
    eng = Engine(path, devices="cpu:0,cpu:1", threads=1, ubatch=4, n_ctx=8192, n_seq=2)
    h = eng._handle()
    long = np.asarray(prompt(4000, 200, 1), dtype=np.int32)
    result: list = []
    t = threading.Thread(target=lambda: result.append(lib.tp_engine_prefill_seq(
        h, 1, ffi.cast("const int32_t *", ffi.from_buffer(long)), long.size, ffi.NULL, 0, ffi.NULL, 0, ffi.NULL, 0)))
    t.start()
    deadline = time.monotonic() + 10
    while lib.tp_engine_seq_free(h, 1) == 0 and time.monotonic() < deadline:  # until the prompt is running
        time.sleep(0.01)
    assert "sequence 1 is running a call" in ffi.string(lib.tp_last_error()).decode()
    one = ffi.new("int32_t[]", [1])
    st, msg = _status(lambda: lib.tp_engine_decode(h, 1, one, one, ffi.NULL, 0))
    assert st == lib.TP_ERR_INVALID_ARGUMENT and "sequence 1 is already running" in msg
    eng.cancel()
    t.join()
    assert result == [lib.TP_ERR_CANCELLED] and eng.seq_info(1) == (0, 0)


def test_cancel_during_interleaved_work_leaves_slots(synthetic_model):
    """cancel() stops two running prompts and a decode loop at once: each call raises CancelledError, every
    slot keeps its tokens and KV cache, and the engine keeps working."""
    path = synthetic_model("llama256", n_ctx=8192)
    eng = Engine(path, devices="cpu:0,cpu:1", threads=1, ubatch=4, n_ctx=8192, n_seq=3)
    for s, n in ((0, 9), (1, 5), (2, 30)):
        eng.prefill(prompt(n, 200, s), seq=s)
    before = [(eng.seq_info(s), eng.kv_digest(s)) for s in range(3)]
    outcome: dict = {}

    def run(key, f):
        def go():
            try:
                for _ in range(1 if key != "decode" else 400):  # decode steps until the cancel hits one
                    f()
                    time.sleep(0.005)
                outcome[key] = "finished"
            except CancelledError:
                outcome[key] = "cancelled"
        return go

    stop = threading.Event()

    def canceller():
        # A cancel stops the calls already submitted: repeat it (as Ctrl-C does) until every call has ended,
        # so that a thread that started late is cancelled too. The prompts take over a second alone.
        time.sleep(0.1)
        while not stop.wait(0.05):
            eng.cancel()

    c = threading.Thread(target=canceller)
    c.start()
    try:
        in_threads(run("a", lambda: eng.prefill(prompt(6000, 200, 5), seq=0)),
                   run("b", lambda: eng.prefill(prompt(5000, 200, 6), seq=1)),
                   run("decode", lambda: eng.decode([2], [7])))
    finally:
        stop.set()
        c.join()
    assert outcome["a"] == outcome["b"] == outcome["decode"] == "cancelled"
    n_decoded = eng.seq_info(2)[0] - 30
    assert [(eng.seq_info(s), eng.kv_digest(s)) for s in range(2)] == before[:2]
    assert n_decoded >= 0
    # Still usable, with exact results.
    got = eng.prefill(prompt(6, 200, 9), all_logits=True, seq=1).logits
    ref = Engine(path, devices="cpu:0,cpu:1", threads=1, ubatch=4, n_ctx=8192)
    ref.prefill(prompt(5, 200, 1))
    np.testing.assert_array_equal(got, ref.prefill(prompt(6, 200, 9), all_logits=True).logits)


def test_cancel_one_sequence_leaves_the_others_running(synthetic_model):
    """cancel(seq=1) stops the prompt on slot 1 only: it raises CancelledError and keeps its slot as it was,
    while slot 0's prompt and a decode loop on slot 2 run on to the results they get alone."""
    path = synthetic_model("llama256", n_ctx=8192)
    kw = {"devices": "cpu:0,cpu:1", "threads": 1, "ubatch": 4, "n_ctx": 8192}
    eng = Engine(path, n_seq=3, **kw)
    eng.prefill(prompt(5, 200, 1), seq=1)
    eng.prefill(prompt(30, 200, 2), seq=2)
    before = (eng.seq_info(1), eng.kv_digest(1))
    outcome: dict = {}
    long_b = prompt(5000, 200, 6)
    a_tokens = prompt(700, 200, 5)

    def run_b():
        try:
            eng.prefill(long_b, seq=1)
            outcome["b"] = "finished"
        except CancelledError:
            outcome["b"] = "cancelled"

    b_started = threading.Event()
    stop = threading.Event()

    def canceller():
        b_started.wait()
        while not stop.wait(0.05):  # repeated until b has ended: a cancel before its call starts is not kept
            eng.cancel(seq=1)

    def start_b():
        b_started.set()
        run_b()

    c = threading.Thread(target=canceller)
    c.start()
    try:
        res = in_threads(lambda: eng.prefill(a_tokens, seq=0).logits, start_b,
                         lambda: [eng.decode([2], [7])[0] for _ in range(20)])
    finally:
        stop.set()
        c.join()
    assert outcome["b"] == "cancelled"
    assert (eng.seq_info(1), eng.kv_digest(1)) == before
    ref = Engine(path, **kw)
    np.testing.assert_array_equal(res[0], ref.prefill(a_tokens).logits)
    ref.reset()
    ref.prefill(prompt(30, 200, 2))
    for i, row in enumerate(res[2]):
        np.testing.assert_array_equal(row, ref.prefill([7]).logits, err_msg=f"decode step {i}")
    with pytest.raises(ValueError, match="sequence"):
        eng.cancel(seq=3)


def test_in_flight_counts_ubatches_per_stage(synthetic_model):
    """in_flight() reads each stage's ubatches during a long prompt on 2 stages: never more than the ring's two
    slots plus the one being computed at a receiving stage, some ubatches seen at both stages, all zero after."""
    path = synthetic_model("llama256", n_ctx=8192)
    eng = Engine(path, devices="cpu:0,cpu:1", threads=1, ubatch=4, n_ctx=8192)
    assert eng.in_flight() == [0, 0]
    seen = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(eng.in_flight())
            time.sleep(0.001)

    w = threading.Thread(target=watch)
    w.start()
    try:
        eng.prefill(prompt(3000, 200, 3))
    finally:
        done.set()
        w.join()
    assert eng.in_flight() == [0, 0]
    assert all(len(c) == 2 and 0 <= c[0] <= 1 and 0 <= c[1] <= 3 for c in seen), seen[:20]
    assert any(c[0] > 0 for c in seen) and any(c[1] > 0 for c in seen)


def test_stage_fault_fails_only_the_affected_call(synthetic_model):
    path = synthetic_model("qwen3")
    eng = engine(path, n_seq=2)
    eng.prefill(prompt(12, 150, 1), seq=0)
    kv0 = eng.kv_digest(0)
    eng._inject_fault(2)  # in stage 1
    with pytest.raises(RuntimeError, match=r"stage 1 .*layer 2: injected fault"):
        eng.prefill(prompt(30, 150, 2), seq=1)
    with pytest.raises(RuntimeError, match="injected fault"):
        eng.decode([0], [3])
    eng._inject_fault(-1)
    assert eng.seq_info(0) == (12, 12) and eng.seq_info(1) == (0, 0) and eng.kv_digest(0) == kv0
    got = eng.prefill(prompt(30, 150, 2), all_logits=True, seq=1).logits
    np.testing.assert_array_equal(got, alone(path, [prompt(30, 150, 2)])[0][0])

"""Several sequences on GPUs (issue #12): the CUDA side of tests/test_seq.py. GPU tests (marked ``cuda``) skip
without a GPU and run on emulated GPUs through tests/test_cuda_emulated.py.

A decode row runs the same kernels as a one-token prefill of its sequence (per-row kv_store and attention;
the batched matmuls compute each row on its own, the matrix-vector kernel for up to 8 rows), so on one GPU
model the rows are bit-identical to each sequence decoded alone — checked here rather than assumed."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_cuda_engine import gpu_count, needs_gpu

from turboprefill import Engine

from conftest import SYNTHETIC

pytestmark = [pytest.mark.cuda, needs_gpu]


def prompt(n: int, n_vocab: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, n_vocab, n)]


def devices() -> str:
    return "cuda:0,cuda:1" if gpu_count() > 1 else "cuda:0,cuda:0"


@pytest.mark.parametrize("name", ["llama", "gemma3", "qwen2vl"])
def test_cuda_interleaved_prefills_equal_each_alone(synthetic_model, name):
    path = synthetic_model(name)
    nv = SYNTHETIC[name][1]["n_vocab"]
    a, b = prompt(53, nv, 1), prompt(37, nv, 2)
    want = []
    for p in (a, b):
        eng = Engine(path, devices=devices(), ubatch=8)
        want.append((eng.prefill(p, all_logits=True).logits, eng.kv_digest()))
    eng = Engine(path, devices=devices(), ubatch=8, n_seq=2)
    got: list = [None, None]

    def run(seq, p):
        got[seq] = eng.prefill(p, all_logits=True, seq=seq).logits

    threads = [threading.Thread(target=run, args=(s, p)) for s, p in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in range(2):
        np.testing.assert_array_equal(got[s], want[s][0])
        assert eng.kv_digest(s) == want[s][1]


@pytest.mark.parametrize("name", ["llama", "gpt-oss", "qwen2vl"])
def test_cuda_decode_batch_equals_each_alone(synthetic_model, name):
    path = synthetic_model(name)
    nv = SYNTHETIC[name][1]["n_vocab"]
    prompts = [prompt(n, nv, n) for n in (4, 19, 33)]
    eng = Engine(path, devices=devices(), ubatch=8, n_seq=3)
    for s, p in enumerate(prompts):
        eng.prefill(p, seq=s)
    got = [eng.decode([0, 1, 2], [5 + k, 6 + k, 7 + k]) for k in range(2)]
    for s, p in enumerate(prompts):
        one = Engine(path, devices=devices(), ubatch=8)
        one.prefill(p)
        for k in range(2):
            np.testing.assert_array_equal(got[k][s], one.prefill([5 + s + k]).logits)
        assert eng.kv_digest(s) == one.kv_digest()


def test_cuda_greedy_decode_equals_generate(synthetic_model):
    path = synthetic_model("gemma3")
    p = prompt(21, 200, 3)
    want = Engine(path, devices=devices(), ubatch=8).generate(p, max_new_tokens=6, stop_at_eos=False)
    eng = Engine(path, devices=devices(), ubatch=8, n_seq=2)
    eng.prefill(prompt(9, 200, 4), seq=0)
    nxt = int(np.argmax(eng.prefill(p, seq=1).logits))
    got = [nxt]
    while len(got) < 6:
        nxt = int(np.argmax(eng.decode([0, 1], [1, nxt])[1]))
        got.append(nxt)
    assert got == want

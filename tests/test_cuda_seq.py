"""Several sequences on GPUs (issue #12): the CUDA side of tests/test_seq.py. GPU tests (marked ``cuda``) skip
without a GPU and run on emulated GPUs through tests/test_cuda_emulated.py.

A decode row runs the same kernels as a one-token prefill of its sequence (per-row kv_store and attention;
the batched matmuls compute each row on its own with the matrix-vector kernel up to 8 rows), so a decode
batch of up to 8 sequences is bit-identical to each sequence decoded alone. Above 8 rows the quantized
matmul switches to the 64×64-tile kernel, which sums the per-block int8 partials of a row in another order
than the matrix-vector kernel: rows then differ from the one-row decode by f32 rounding (measured on the
emulated GPUs, 11 rows: max|Δlogit| <= 7.2e-7 for llama and gpt-oss). The CPU has no such switch: its rows
are bit-identical at any batch size (tests/test_seq.py)."""


from __future__ import annotations

import threading

import numpy as np
import pytest
from test_cuda_engine import gpu_count, needs_gpu

from turboprefill import Engine

from conftest import SYNTHETIC

pytestmark = [pytest.mark.cuda, needs_gpu]

# Above 8 rows, relative to max|logit|: f32 accumulation order only, measured <= 2.2e-7 (7.2e-7 on logits up
# to 3.4: a few ulps); 1e-5 leaves ~45x, while a wrong row or position moves logits by > 1e-2.
WIDE_DECODE_REL_TOL = 1e-5


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


def test_cuda_decode_above_8_rows_differs_by_rounding_only(synthetic_model):
    path = synthetic_model("llama")
    nv = SYNTHETIC["llama"][1]["n_vocab"]
    prompts = [prompt(3 + 2 * i, nv, 40 + i) for i in range(11)]
    eng = Engine(path, devices=devices(), ubatch=16, n_seq=11)
    for s, p in enumerate(prompts):
        eng.prefill(p, seq=s)
    got = eng.decode(list(range(11)), [7] * 11)
    for s in (0, 5, 10):
        one = Engine(path, devices=devices(), ubatch=16)
        one.prefill(prompts[s])
        want = one.prefill([7]).logits
        assert np.abs(got[s] - want).max() <= WIDE_DECODE_REL_TOL * float(np.abs(want).max())
        assert int(np.argmax(got[s])) == int(np.argmax(want))

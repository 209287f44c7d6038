"""Faults from outside the engine end in a clear error and leave the engine usable (issue #14)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from turboprefill import Engine


def test_model_file_truncated_after_load_is_an_error_not_sigbus(synthetic_model, tmp_path):
    # Weights are views of the file's mapping: without the check, reading past the new end is SIGBUS, which
    # kills the whole Python process.
    path = tmp_path / "m.gguf"
    shutil.copy(synthetic_model("llama"), path)
    eng = Engine(path, devices="cpu", threads=1, ubatch=8)
    toks = list(range(20))
    ref = eng.prefill(toks).logits
    eng.reset()
    data = path.read_bytes()
    os.truncate(path, len(data) // 2)
    with pytest.raises(OSError, match=rf"shrank from {len(data)} to {len(data) // 2} bytes since it was loaded"):
        eng.prefill(toks)
    assert eng.n_past == 0  # the sequence is left as it was
    path.write_bytes(data)  # restored in place: the same inode, so the engine's mapping sees it again
    np.testing.assert_array_equal(eng.prefill(toks).logits, ref)


# ---- a model file truncated during a run (csrc/gguf/map_guard.h) ---------------------------------------------
# Each scenario runs in a fresh interpreter: a regression is SIGBUS, which must show as this test failing
# with the child's exit status, not as a dead pytest. tp_test_truncate_after_check cuts the file right after
# the check at the start of the call, i.e. during the run, deterministically.

TRUNCATED = "was truncated or replaced while in use"


def run_scenario(script: str, *args) -> str:
    import subprocess
    import sys

    import turboprefill

    env = dict(os.environ, PYTHONPATH=str(Path(turboprefill.__file__).resolve().parent.parent))
    r = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, f"scenario died with status {r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
    return r.stdout


PREFILL_TRUNCATED = """
import os, sys, numpy as np
from turboprefill import Engine
from turboprefill._native import lib, check
path, devices = sys.argv[1], sys.argv[2]
data = open(path, "rb").read()
eng = Engine(path, devices=devices, threads=1, ubatch=16)
toks = list(range(1, 100))
check(lib.tp_test_truncate_after_check(path.encode(), len(data) // 2))
try:
    eng.prefill(toks)
    sys.exit("prefill over a file truncated during the run returned results")
except OSError as e:
    print("first:", e)
assert eng.n_past == 0, eng.n_past
open(path, "r+b").write(data)  # restoring the file does not bring back what the run read as zeros
try:
    eng.prefill(toks)
    sys.exit("the engine ran again after its file was truncated under a run")
except OSError as e:
    print("again:", e)
eng.close()
"""


@pytest.mark.parametrize("devices", ["cpu", "cpu:0,cpu:1"])
def test_model_file_truncated_during_prefill_is_an_error_not_sigbus(synthetic_model, tmp_path, devices):
    path = tmp_path / "m.gguf"
    shutil.copy(synthetic_model("llama"), path)
    out = run_scenario(PREFILL_TRUNCATED, path, devices)
    size = path.stat().st_size
    first, again = out.splitlines()
    # The byte the first faulting read wanted lies past the cut.
    assert re.fullmatch(
        rf"first: {re.escape(str(path))} {TRUNCATED} \(a read at byte (\d+) of the {size} it had "
        r"when loaded found no data\); the results of this call are discarded; reload the model",
        first,
    ), first
    assert int(re.search(r"byte (\d+)", first).group(1)) >= size // 2 - 4096
    assert again == "again:" + first[len("first:") :]


PREFILL_RACE = """
import os, sys, threading, time
from turboprefill import Engine
path = sys.argv[1]
size = os.path.getsize(path)
eng = Engine(path, devices="cpu:0,cpu:1", threads=1, ubatch=32)
toks = list(range(1, 290))
eng.prefill(toks)  # warm: page the weights in, so the timing below is the run's own
eng.reset()
t0 = time.perf_counter()
eng.prefill(toks)
run = time.perf_counter() - t0
eng.reset()
# A real writer in another thread, cutting the file at a different point of each run, until a run notices.
for i in range(50):
    cut = threading.Timer(run * (0.1 + 0.8 * (i % 8) / 8), os.truncate, (path, size // 3))
    cut.start()
    try:
        eng.prefill(toks)
        eng.reset()
    except OSError as e:
        print(e)
        break
    finally:
        cut.join()
    os.truncate(path, size)
    with open(sys.argv[2], "rb") as src, open(path, "r+b") as dst:
        dst.write(src.read())
else:
    sys.exit("no run noticed the truncation")
"""


def test_model_file_truncated_by_another_thread_never_kills_the_process(synthetic_model, tmp_path):
    # The realistic race: whichever check sees the cut first (the stat before the run, or a faulting read
    # during it), the call is an OSError and the interpreter lives.
    path = tmp_path / "m.gguf"
    shutil.copy(synthetic_model("llama"), path)
    out = run_scenario(PREFILL_RACE, path, synthetic_model("llama"))
    assert TRUNCATED in out or "shrank from" in out, out


ENCODE_TRUNCATED = """
import sys, numpy as np
from turboprefill.vision import VisionEncoder
from turboprefill._native import lib, check
path = sys.argv[1]
size = len(open(path, "rb").read())
enc = VisionEncoder(path, threads=1)
img = np.random.default_rng(0).normal(size=(3, 56, 84)).astype(np.float32)
ref = enc.encode(img)
check(lib.tp_test_truncate_after_check(path.encode(), size // 2))
for attempt in ("first", "again"):
    try:
        enc.encode(img)
        sys.exit("an encode over a truncated file returned results")
    except OSError as e:
        print(attempt + ":", e)
enc.close()
"""


def test_mmproj_truncated_during_encode_is_an_error_not_sigbus(tmp_path):
    from turboprefill.writer_vision import write_mmproj

    path = tmp_path / "mmproj.gguf"
    write_mmproj(path, weight_type="f32", seed=3)
    out = run_scenario(ENCODE_TRUNCATED, path)
    first, again = out.splitlines()
    assert first.startswith(f"first: {path} {TRUNCATED} (a read at byte "), first
    assert first.endswith("the results of this call are discarded; reload the model"), first
    assert again == "again:" + first[len("first:") :]


# ---- failed allocations (tp_test_fail_alloc) ------------------------------------------------------------------


@pytest.fixture
def fail_alloc():
    """fail_alloc(kind, n): the n-th allocation of kind fails; disarmed again after the test."""
    from turboprefill._native import check, lib

    yield lambda kind, n: check(lib.tp_test_fail_alloc(kind, n))
    for kind in (0, 1):
        check(lib.tp_test_fail_alloc(kind, 0))


ACTIVATION, KV_CACHE = 0, 1  # tp_alloc_kind


@pytest.mark.parametrize("devices", ["cpu", "cpu:0,cpu:1"])
def test_every_activation_allocation_at_creation_fails_cleanly(synthetic_model, fail_alloc, devices):
    # Scratch, residual, logits and (two stages) ring slots: each one failing in turn is a MemoryError naming
    # the ubatch, and the next Engine (nothing armed) works; the count shows every point was reached.
    path = synthetic_model("llama")
    failed = 0
    for n in range(1, 200):
        fail_alloc(ACTIVATION, n)
        try:
            eng = Engine(path, devices=devices, threads=1, ubatch=8, layer_split=None)
        except MemoryError as e:
            assert "out of memory allocating activation buffers for ubatch 8 (n_embd 96, n_ff 160)" in str(e)
            failed += 1
            continue
        fail_alloc(ACTIVATION, 0)
        break
    assert failed >= (10 if devices == "cpu" else 20), failed
    assert eng.prefill(list(range(20))).logits.shape == (300,)
    eng.close()


def test_kv_cache_growth_failure_leaves_the_sequence_and_the_engine_usable(synthetic_model, fail_alloc):
    path = synthetic_model("llama")
    toks = list(range(1, 300)) * 2
    ref = Engine(path, threads=1, ubatch=64)
    ref.prefill(toks[:20])
    want = ref.prefill(toks[20:30]).logits
    ref.close()
    eng = Engine(path, threads=1, ubatch=64)
    eng.prefill(toks[:20])
    fail_alloc(KV_CACHE, 3)  # layer 1's K buffer: layer 0 has already grown
    with pytest.raises(MemoryError, match=r"stage 0 \(cpu:0\): out of memory growing the KV cache to 520 positions"):
        eng.prefill(toks[20:520])
    assert eng.n_past == 20
    # A smaller prefill then runs on the layers that grew and on those that did not: the same logits as an
    # engine that never failed.
    np.testing.assert_array_equal(eng.prefill(toks[20:30]).logits, want)
    eng.close()


def test_logits_allocation_failure_mid_prefill_is_out_of_memory(synthetic_model, fail_alloc):
    # All-token logits grow inside the pipeline, on the last stage's thread.
    eng = Engine(synthetic_model("llama"), devices="cpu:0,cpu:1", threads=1, ubatch=8)
    fail_alloc(ACTIVATION, 1)
    with pytest.raises(MemoryError, match=r"stage 1 \(cpu:1\)"):
        eng.prefill(list(range(20)), all_logits=True)
    assert eng.n_past == 0
    assert eng.prefill(list(range(20)), all_logits=True).logits.shape == (20, 300)
    eng.close()


def test_huge_context_allocates_nothing_up_front(synthetic_model):
    # The KV cache grows with the sequence, never to n_ctx: 2^36 positions of this model would be 2 PiB.
    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    rss0 = rss_mib()
    eng = Engine(synthetic_model("llama"), threads=1, ubatch=8, n_ctx=2**36)
    assert eng.config["n_ctx"] == 2**36
    assert eng.prefill(list(range(20))).logits.shape == (300,)
    assert rss_mib() - rss0 < 64  # the model is 0.3 MiB; a KV cache sized for n_ctx would be 2 PiB
    eng.close()

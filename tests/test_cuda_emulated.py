"""The GPU tests, run on emulated GPUs: no machine in CI has one, so the CUDA backend is also built against
tests/cuda_emu (CMake TP_CUDA_EMULATE=ON: kernels run as CPU fibers, the runtime's streams, events, peer
copies and allocations are reimplemented over host memory; see tests/cuda_emu/emu.h for what it models and
checks). Then every ``cuda``-marked test of test_cuda_ops.py, test_cuda_moe.py, test_cuda_matmul.py,
test_cuda_engine.py, test_cuda_mrope.py, test_cuda_vision.py and test_cuda_seq.py runs against that library
in a subprocess (TURBOPREFILL_LIB), with two emulated GPUs of compute capability 8.6, as does ``turboprefill
selftest --quick``.

What this proves beyond the CPU tests: the CUDA kernels' indexing, tiling, shared memory, masks and mma.sync
fragment layouts; launch configurations; the Ops glue; the pipeline's cross-GPU hand-off, whose streams
really run asynchronously here (a missing event wait shows up as a schedule that is not bit-identical). What
it cannot: real timings, memory-model races inside a kernel, and the hardware's own rounding in the
tensor-core accumulators.

The emulated library is built once into build-emu/ (about 1.5 minutes on 2 cores, incremental afterwards).
Skips cleanly without cmake, a C++ compiler or the CUDA headers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parent.parent
_GPU_TESTS = [
    "tests/test_cuda_ops.py",
    "tests/test_cuda_moe.py",
    "tests/test_cuda_matmul.py",
    "tests/test_cuda_engine.py",
    "tests/test_cuda_mrope.py",
    "tests/test_cuda_vision.py",
    "tests/test_cuda_seq.py",
]


def _cuda_include() -> Path | None:
    cands = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parent.parent))
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c) / "include"
    return None


def build_emulated(arch: int) -> Path:
    """libturboprefill.so with the CUDA backend compiled for emulated sm_<arch> (built once, then incremental)."""
    cmake, cxx, inc = shutil.which("cmake"), shutil.which("c++") or shutil.which("g++"), _cuda_include()
    if not (cmake and cxx and inc):
        pytest.skip("the CUDA emulation needs cmake, a C++ compiler and the CUDA headers (cuda_runtime.h)")
    build = _REPO / "build-emu" / f"sm{arch}"
    cfg = [cmake, "-S", str(_REPO), "-B", str(build), "-DTP_CUDA=OFF", "-DTP_CUDA_EMULATE=ON",
           f"-DTP_EMU_ARCH={arch}", "-DCMAKE_BUILD_TYPE=Release", f"-DTP_CUDA_INCLUDE={inc}"]
    env = {**os.environ, "TP_CUDA": "OFF"}
    for cmd in (cfg, [cmake, "--build", str(build), "-j", str(os.cpu_count() or 2)]):
        r = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    lib = build / "libturboprefill.so"
    assert lib.exists()
    return lib


@pytest.fixture(scope="module")
def emu_lib() -> Path:
    return build_emulated(800)


def run_emulated(lib: Path, args: list[str], timeout: int = 1200, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TURBOPREFILL_LIB": str(lib), "TP_EMU_GPUS": "2", **env}
    return subprocess.run([sys.executable, *args], cwd=_REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def run_gpu_tests(lib: Path, *extra: str, **env: str) -> dict[str, int]:
    """Runs the cuda-marked tests on the emulated GPUs; returns pytest's summary counts, failing on any error."""
    r = run_emulated(lib, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", *_GPU_TESTS, *extra],
                     **env)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|deselected)", r.stdout)}
    assert counts.get("passed", 0) > 0, tail
    return counts


def test_gpu_suite_on_emulated_gpus(emu_lib):
    counts = run_gpu_tests(emu_lib)
    # Every GPU test ran: none skipped for want of a GPU, a second GPU or a CUDA build.
    assert counts.get("skipped", 0) == 0, counts
    assert counts["passed"] >= 500, counts


def test_staged_copies_and_a_slow_gpu(emu_lib):
    """GPUs that cannot map each other's memory hand activations over through pinned host staging; and with
    cuda:1's kernels 2 ms slower, producers run ahead of their consumers on the GPU timeline, so a missing
    "slot free" wait corrupts a slot (checked: deleting that wait in scheduler.cpp fails 4 of these)."""
    counts = run_gpu_tests(emu_lib, "-k", "schedules or send or every_gpu", TP_EMU_PEER="0", TP_EMU_SLOW="1:2000")
    assert counts.get("skipped", 0) == 0 and counts["passed"] >= 12, counts


def test_info_and_selftest_on_emulated_gpus(emu_lib):
    r = run_emulated(emu_lib, ["-m", "turboprefill.cli", "info"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "emulated GPU" in r.stdout
    r = run_emulated(emu_lib, ["-m", "turboprefill.cli", "selftest", "--quick"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "selftest: PASS" in r.stdout and "| cuda |" in r.stdout


_OOM_SCRIPT = """
import sys
from turboprefill import Engine
from turboprefill.writer import write_model
write_model(sys.argv[1], "llama", n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, n_vocab=200)
try:
    Engine(sys.argv[1], devices="cuda:0,cuda:1")
except MemoryError as e:
    print("OOM:", e)
"""


def test_out_of_memory_names_the_gpu_and_what_is_free(emu_lib, tmp_path):
    r = run_emulated(emu_lib, ["-c", _OOM_SCRIPT, str(tmp_path / "m.gguf")], TP_EMU_GPU_MEM_MIB="1")
    assert r.returncode == 0, r.stdout + r.stderr
    pattern = r"OOM: stage 0 \(layers 0-\d\): cuda:0: out of memory allocating [\d.]+ MiB for .*\([\d.]+ MiB free\)"
    assert re.search(pattern, r.stdout), r.stdout


@pytest.mark.slow
def test_sm75_paths_on_emulated_gpus():
    """Turing: the quantized matmul's __dp4a branch (compiled for sm < 80) and the f32 attention kernel."""
    lib = build_emulated(750)
    counts = run_gpu_tests(lib, "-k", "matmul or attention or prefill_matches", TP_EMU_CC="7.5")
    assert counts.get("skipped", 0) == 0, counts

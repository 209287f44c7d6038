"""One decode step (one new token per sequence) on the CPU: turboprefill's Engine.decode against llama.cpp
(llama-cpp-python's Llama.eval of one token), same model, same threads, in one run.

Both engines are loaded once; the timed steps alternate between them in rounds, so a machine that slows down
during the run slows both. Each step continues a 100-token prompt; every `--steps` steps the context is
reset so both attend over the same lengths. Reported: the median step time per engine and their ratio.
turboprefill also runs batches of several sequences (one token each) in one `decode` call.

    python bench/decode.py smollm2 gemma3-270m --threads 1,2 --json bench/results/decode/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from turboprefill import Engine  # noqa: E402
from turboprefill.models import resolve_model  # noqa: E402

PROMPT = list(range(100, 200))


def time_tp(eng: Engine, n_seq: int, steps: int) -> list[float]:
    seqs = list(range(n_seq))
    for s in seqs:
        eng.free_seq(s)
        eng.prefill(PROMPT, seq=s)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.decode(seqs, [5] * n_seq)
        out.append(time.perf_counter() - t0)
    return out


def time_llama(llm, steps: int) -> list[float]:
    llm.reset()
    llm.eval(PROMPT)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        llm.eval([5])
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="GGUF paths or PyPI model names (smollm2, gemma3)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batches", default="1,4", help="turboprefill sequences per decode call")
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--json", help="append one JSON line per (model, threads)")
    a = p.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    print("| model | threads | turboprefill 1 seq (ms) | llama.cpp (ms) | ratio | "
          + " | ".join(f"turboprefill {b} seqs (ms/step)" for b in batches if b > 1) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * sum(b > 1 for b in batches))
    for model in a.models:
        path = str(resolve_model(model))
        for th in (int(t) for t in a.threads.split(",")):
            eng = Engine(path, devices="cpu", threads=th, n_seq=max(batches), n_ctx=1024)
            llm = None
            if not a.no_llama_cpp:
                import llama_cpp

                llm = llama_cpp.Llama(path, n_ctx=1024, n_threads=th, n_threads_batch=th, verbose=False)
            tp = {b: [] for b in batches}
            lc: list[float] = []
            for _ in range(a.rounds):
                for b in batches:
                    tp[b] += time_tp(eng, b, a.steps)[2:]
                if llm is not None:
                    lc += time_llama(llm, a.steps)[2:]
            med = {b: 1e3 * float(np.median(v)) for b, v in tp.items()}
            lcm = 1e3 * float(np.median(lc)) if lc else float("nan")
            print(f"| {Path(path).name} | {th} | {med[1]:.2f} | {lcm:.2f} | {med[1] / lcm:.2f} | "
                  + " | ".join(f"{med[b]:.2f}" for b in batches if b > 1) + " |", flush=True)
            if a.json:
                Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                with open(a.json, "a") as f:
                    f.write(json.dumps({"model": Path(path).name, "threads": th, "tp_ms": med,
                                        "llama_cpp_ms": lcm, "time": time.time()}) + "\n")
            eng.close()
            del llm


if __name__ == "__main__":
    main()

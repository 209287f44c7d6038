#!/usr/bin/env python3
"""Judge our logits against llama.cpp on the held-out prompts (tests/fixtures/heldout), which no test
reads, with the thresholds the tests use. Prints one line per prompt; exit status 1 if any fails.

Usage: python scripts/check_heldout.py [--threads 2] [--ubatch 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from turboprefill import Engine  # noqa: E402
from turboprefill.models import find_model  # noqa: E402

from realmodel_check import compare, load_prompts, passes  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ubatch", type=int, default=256)
    a = ap.parse_args()
    ok = True
    for model in ("smollm2", "gemma3-270m"):
        eng = Engine(find_model(model), devices="cpu", threads=a.threads, ubatch=a.ubatch, n_ctx=2048)
        for p in load_prompts(ROOT / "tests" / "fixtures" / "heldout", model):
            eng.reset()
            m = compare(eng.prefill(p["tokens"]).logits, p["logits"])
            good = passes(m)
            ok &= good
            print(f"{model:12s} {p['name']:24s} n={len(p['tokens']):4d} cosine={m['cosine']:.6f} "
                  f"ref_top1_rank={m['ref_top1_rank']} top10_overlap={m['top10_overlap']} "
                  f"(llama.cpp top-1 margin {p['top1_margin']:.3f}) {'PASS' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Sweep context length × ubatch × device list, sequential vs pipelined, on any GGUF.

Writes results.jsonl (one line per measurement, with machine and git SHA), results.md (a table shaped like
the PoC's: baseline tok/s, pipelined tok/s, gain, ideal, efficiency) and plots (tok/s vs context per
schedule; gain vs ubatch with the ideal dotted). Schedules run alternately on the same prompt and the best
of --repeat runs is kept, so each gain is a ratio measured in one run under the same machine load.

Example (the table in bench/README.md):
    python bench/sweep.py smollm2 --ctx 512,1024,2048 --ubatch 32,64,128,256 --devices cpu:0,cpu:1 --threads 1
"""

from __future__ import annotations

import argparse
import sys

from turboprefill.bench import machine_info, report, sweep
from turboprefill.models import resolve_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="gemma3-270m", help="GGUF path or PyPI model name")
    ap.add_argument("--ctx", default="512,1024,2048,4096", help="comma-separated context lengths")
    ap.add_argument("--ubatch", default="32,64,128,256,512", help="comma-separated ubatch sizes")
    ap.add_argument("--devices", default="cpu:0,cpu:1", help="device lists separated by ';'")
    ap.add_argument("--threads", type=int, default=1, help="threads per stage")
    ap.add_argument("--schedules", default="sequential,pipelined")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--no-plots", action="store_true", help="skip the plots (they need matplotlib)")
    a = ap.parse_args()
    model = str(resolve_model(a.model))
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    rows = sweep(model, ctxs=ints(a.ctx), ubatches=ints(a.ubatch), devices_list=a.devices.split(";"),
                 schedules=a.schedules.split(","), threads=a.threads, repeat=a.repeat)
    meta = {**machine_info(), "model": model, "command": " ".join(sys.argv)}
    return report(rows, a.out, meta, make_plots=not a.no_plots)


if __name__ == "__main__":
    sys.exit(main())

"""Prefill benchmark sweeps: context length × ubatch × schedule × device list, measured in one run.

Each (devices, ubatch) point builds one engine per schedule and runs them alternately on the same
random prompt, keeping the best of `repeat` runs, so the pipelined/sequential ratio is taken under the
same machine conditions. Results: JSON lines (one per measurement), a markdown table shaped like the
PoC's (baseline tok/s, pipelined tok/s, gain, ideal, efficiency) and plots.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ._optional import optional, pyplot
from .engine import Engine, build_info
from .errors import MissingDependencyError


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "git_sha": sha or "unknown",
            "build": build_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _progress(total: int, enabled: bool):
    # Without tqdm (the `bench` extra) the sweep prints one line per point instead of a bar.
    tqdm = optional("tqdm") if enabled else None
    return tqdm.tqdm(total=total, unit="run", dynamic_ncols=True) if tqdm is not None else None


def sweep(
    model: str,
    ctxs: Iterable[int] = (1024,),
    ubatches: Iterable[int] = (128,),
    devices_list: Iterable[str] = ("cpu:0,cpu:1",),
    schedules: Iterable[str] = ("sequential", "pipelined"),
    threads: int | None = 1,
    repeat: int = 2,
    seed: int = 0,
    progress: bool = True,
    log=print,
) -> list[dict]:
    """Measure every combination; returns one row per (devices, ubatch, ctx, schedule) with the best run."""
    ctxs, ubatches, devices_list, schedules = list(ctxs), list(ubatches), list(devices_list), list(schedules)
    total = len(devices_list) * len(ubatches) * len(ctxs) * len(schedules) * repeat
    bar = _progress(total, progress)
    rows: list[dict] = []
    for devices in devices_list:
        for ub in ubatches:
            engines = {s: Engine(model, devices=devices, threads=threads, ubatch=ub, schedule=s,
                                 n_ctx=max(ctxs)) for s in schedules}
            cfg = next(iter(engines.values())).config
            rng = np.random.default_rng(seed)
            for eng in engines.values():  # warm-up: thread pools, page cache, buffers
                eng.prefill(rng.integers(0, cfg["n_vocab"], min(ub, 64)))
                eng.reset()
            for ctx in ctxs:
                prompt = np.random.default_rng(seed + ctx).integers(0, cfg["n_vocab"], ctx).astype(np.int32)
                best: dict[str, dict] = {}
                for _ in range(repeat):
                    for s, eng in engines.items():
                        eng.reset()
                        st = eng.prefill(prompt).stats
                        if s not in best or st["seconds"] < best[s]["seconds"]:
                            best[s] = st
                        if bar is not None:
                            bar.update(1)
                for s, st in best.items():
                    row = {"model": Path(model).name, "arch": cfg["architecture"], "devices": devices,
                           "stages": cfg["n_stages"], "threads": threads, "ubatch": ub, "ctx": ctx,
                           "schedule": s, **st}
                    rows.append(row)
                if "sequential" in best and "pipelined" in best:
                    gain = best["sequential"]["seconds"] / best["pipelined"]["seconds"]
                    msg = (f"{devices} ub={ub} ctx={ctx}: sequential {best['sequential']['tokens_per_second']:.1f} "
                           f"tok/s, pipelined {best['pipelined']['tokens_per_second']:.1f} tok/s, gain {gain:.2f}x "
                           f"(ideal {best['pipelined']['ideal_speedup']:.2f}x)")
                    if bar is not None:
                        bar.write(msg)
                    else:
                        log(msg)
            for eng in engines.values():
                eng.close()
    if bar is not None:
        bar.close()
    return rows


def gains(rows: list[dict]) -> list[dict]:
    """Pair sequential and pipelined rows of the same point: baseline, pipelined, gain, ideal, efficiency."""
    key = lambda r: (r["devices"], r["ubatch"], r["ctx"])  # noqa: E731
    seq = {key(r): r for r in rows if r["schedule"] == "sequential"}
    out = []
    for r in rows:
        if r["schedule"] != "pipelined" or key(r) not in seq:
            continue
        b = seq[key(r)]
        gain = b["seconds"] / r["seconds"]
        out.append({"devices": r["devices"], "stages": r["stages"], "ubatch": r["ubatch"], "ctx": r["ctx"],
                    "ubatches": r["ubatches"], "baseline_tok_s": b["tokens_per_second"],
                    "pipelined_tok_s": r["tokens_per_second"], "gain": gain, "ideal": r["ideal_speedup"],
                    "efficiency": gain / r["ideal_speedup"], "bubble_fraction": r["bubble_fraction"]})
    return out


def markdown_table(rows: list[dict]) -> str:
    g = gains(rows)
    if not g:
        lines = ["| devices | ubatch | ctx | schedule | tok/s |", "|---|---:|---:|---|---:|"]
        for r in rows:
            lines.append(f"| {r['devices']} | {r['ubatch']} | {r['ctx']} | {r['schedule']} | "
                         f"{r['tokens_per_second']:.1f} |")
        return "\n".join(lines)
    lines = ["| devices | ubatch | ctx | M | baseline tok/s | pipelined tok/s | gain | ideal | efficiency |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in g:
        lines.append(f"| {r['devices']} | {r['ubatch']} | {r['ctx']} | {r['ubatches']} | {r['baseline_tok_s']:.1f} | "
                     f"{r['pipelined_tok_s']:.1f} | {r['gain']:.2f}x | {r['ideal']:.2f}x | "
                     f"{100 * r['efficiency']:.0f}% |")
    return "\n".join(lines)


def _finish(plt, fig, ax, xlabel: str, ylabel: str, path: Path) -> Path:
    """Common axes (log2 x, legend, grid), save as PNG, close."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(rows: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """tok/s vs context per schedule (one line per devices/ubatch), and gain vs ubatch per context.
    Raises MissingDependencyError without matplotlib (the `bench` extra)."""
    plt = pyplot("the benchmark's plots")

    out_dir = Path(out_dir)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple, list] = {}
    for r in rows:
        series.setdefault((r["schedule"], r["devices"], r["ubatch"]), []).append((r["ctx"], r["tokens_per_second"]))
    for (s, d, u), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-" if s == "pipelined" else "--",
                label=f"{s} {d} ub={u}")
    paths.append(_finish(plt, fig, ax, "context (tokens)", "prefill tokens/s", out_dir / "tok_s_vs_ctx.png"))

    g = gains(rows)
    if g:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        by: dict[tuple, list] = {}
        for r in g:
            by.setdefault((r["devices"], r["ctx"]), []).append((r["ubatch"], r["gain"], r["ideal"]))
        for (d, c), pts in sorted(by.items()):
            pts.sort()
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{d} ctx={c}")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], linestyle=":", color=line.get_color())
        paths.append(_finish(plt, fig, ax, "ubatch (tokens)", "pipelined / sequential (dotted: ideal)",
                             out_dir / "gain_vs_ubatch.png"))
    return paths


def write_results(rows: list[dict], out_dir: str | os.PathLike, meta: dict, make_plots: bool = True) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "results.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps({**r, "meta": meta}) + "\n")
    table = markdown_table(rows)
    (out_dir / "results.md").write_text(
        f"Machine: {meta.get('cpu')} ({meta.get('cores')} cores), git {meta.get('git_sha')}, {meta.get('date')}\n\n"
        f"{table}\n")
    plots = plot(rows, out_dir) if make_plots else []
    return {"table": table, "plots": [str(p) for p in plots], "dir": str(out_dir)}


def report(rows: list[dict], out_dir: str | os.PathLike, meta: dict, make_plots: bool = True, log=print) -> int:
    """Write the results, print the table, then draw the plots; the exit status for a command line.

    The table comes first so that a sweep that ran for minutes is never lost to a missing plotting package:
    without matplotlib the user gets the table, the files and one line naming the extra (status 1)."""
    res = write_results(rows, out_dir, meta, make_plots=False)
    log(res["table"])
    log(f"results in {res['dir']}")
    if not make_plots:
        return 0
    try:
        paths = plot(rows, out_dir)
    except MissingDependencyError:
        print("turboprefill: plots need `pip install 'turboprefill[bench]'` (or pass --no-plots)", file=sys.stderr)
        return 1
    log("plots:", *map(str, paths))
    return 0


def image_ttft(model: str, mmproj: str, image, question: str = "Describe this image in detail.",
               devices: str = "cpu:0,cpu:1", threads: int | None = 1, ubatch: int = 128, repeat: int = 2,
               n_ctx: int | None = None, vision_threads: int | None = None) -> dict:
    """Image + question → first answer token with each schedule (the VLM seed's measurement), alternating the
    two engines `repeat` times so the ratio is taken under the same load; the best run of each is kept.
    Returns {"sequential": run, "pipelined": run, "same_first_token": bool}; a run has ttft, prefill, encode,
    prepare (seconds), tokens, image_tokens, image (sizes and grid) and argmax."""
    msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    kw = dict(devices=devices, threads=threads, ubatch=ubatch, n_ctx=n_ctx, mmproj=mmproj,
              vision_threads=vision_threads)
    engines = {s: Engine(model, schedule=s, **kw) for s in ("sequential", "pipelined")}
    try:
        for e in engines.values():  # warm-up: page the weights in, size the scratch buffers
            e.prefill([{"role": "user", "content": "hi"}])
        runs: dict[str, list[dict]] = {s: [] for s in engines}
        for _ in range(repeat):
            for s, e in engines.items():
                e.reset()
                t0 = time.perf_counter()
                r = e.prefill(msgs)
                ttft = time.perf_counter() - t0
                st = r.stats
                runs[s].append({"ttft": ttft, "prefill": st["seconds"], "encode": st["image_encode_seconds"],
                                "prepare": st["image_prepare_seconds"], "tokens": st["tokens"],
                                "image_tokens": st["image_tokens"], "image": st["images"][0],
                                "argmax": int(np.argmax(r.logits))})
    finally:
        for e in engines.values():
            e.close()
    best = {s: min(v, key=lambda x: x["ttft"]) for s, v in runs.items()}
    return {**best, "same_first_token": best["sequential"]["argmax"] == best["pipelined"]["argmax"], "all": runs}


def image_ttft_table(res: dict) -> list[str]:
    """The markdown table of image_ttft's result, with the speedups below it."""
    seq, pip = res["sequential"], res["pipelined"]
    im = seq["image"]
    lines = [
        f"image {im['source'][0]}×{im['source'][1]} → {im['resized'][0]}×{im['resized'][1]} px, grid "
        f"{im['grid'][0]}×{im['grid'][1]} = {seq['image_tokens']} image tokens; prompt {seq['tokens']} tokens",
        "",
        "| schedule | image prep (s) | vision encode (s) | text prefill (s) | prefill tok/s | time to first token (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in ("sequential", "pipelined"):
        r = res[s]
        lines.append(f"| {s} | {r['prepare']:.3f} | {r['encode']:.3f} | {r['prefill']:.3f} | "
                     f"{r['tokens'] / r['prefill']:.0f} | {r['ttft']:.3f} |")
    lines += ["", f"prefill speedup {seq['prefill'] / pip['prefill']:.2f}×, time-to-first-token speedup "
              f"{seq['ttft'] / pip['ttft']:.2f}×; same first token in both schedules: {res['same_first_token']}"]
    return lines

"""Load test of OpenAI-compatible servers: Poisson arrivals, a cap on concurrent clients, prompt lengths drawn
from a range; reports TTFT and inter-token latency percentiles and throughput, one row per server.

Each server is started here, one after the other, on the same model and machine (turboprefill serve, then
llama-cpp-python's `python -m llama_cpp.server`), or an already running one is given with --url. Both get the
same request sequence (same seed): the same prompts, arrival times and max_tokens, greedy, streamed through
/v1/completions. Time to first token is measured from the request's send to its first streamed token, so time
spent queued in the server counts; inter-token latency is the gap between consecutive streamed tokens.

    python bench/serve_load.py smollm2 --clients 8 --rate 1 --duration 60 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community").split()


def requests(n: int, rate: float, lengths: tuple[int, int], seed: int) -> list[tuple[float, str]]:
    """(arrival second, prompt) for n requests: exponential gaps at `rate` per second, prompt lengths in words
    uniform in `lengths` (about one token per word for these common words)."""
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1.0 / rate, n))
    lens = rng.integers(lengths[0], lengths[1] + 1, n)
    return [(float(a), "Summarize: " + " ".join(rng.choice(WORDS, k))) for a, k in zip(t, lens)]


async def one(client, url: str, model: str, prompt: str, max_tokens: int, sem: asyncio.Semaphore) -> dict:
    async with sem:
        t0 = time.perf_counter()
        stamps: list[float] = []
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        try:
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        stamps.append(time.perf_counter())
        except Exception as e:  # noqa: BLE001 — a failed request is counted, not fatal to the run
            return {"error": f"{type(e).__name__}: {e}"}
        return {"start": t0, "stamps": stamps}


async def drive(url: str, model: str, plan: list[tuple[float, str]], clients: int, max_tokens: int) -> dict:
    import httpx

    sem = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        t_begin = time.perf_counter()
        tasks = []
        for at, prompt in plan:
            await asyncio.sleep(max(0.0, t_begin + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(client, url, model, prompt, max_tokens, sem)))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t_begin
    ok = [r for r in results if "error" not in r and r["stamps"]]
    ttft = [r["stamps"][0] - r["start"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["stamps"], r["stamps"][1:])]
    tokens = sum(len(r["stamps"]) for r in ok)
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return {"requests": len(plan), "ok": len(ok), "errors": [r["error"] for r in results if "error" in r][:3],
            "wall_s": wall, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50),
            "itl_p99": pct(itl, 99), "tokens": tokens, "tok_per_s": tokens / wall, "req_per_s": len(ok) / wall}


def launch(kind: str, model: str, port: int, threads: int, n_ctx: int, parallel: int,
           devices: str | None = None, stream_ubatch: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'python'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if kind == "turboprefill":
        cmd = [sys.executable, "-m", "turboprefill.cli", "serve", model, "--threads", str(threads), "--port",
               str(port), "--n-ctx", str(n_ctx), "--parallel", str(parallel), "--log-level", "warning"]
        if devices:
            cmd += ["--devices", devices]
        if stream_ubatch is not None:
            cmd += ["--stream-ubatch", str(stream_ubatch)]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--port", str(port), "--n_ctx", str(n_ctx), "--verbose", "False",
               # its default cuts a streaming request short whenever another arrives: every request must finish
               "--interrupt_requests", "False"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 180) -> str:
    """The served model id once /v1/models answers."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            return httpx.get(url + "/v1/models", timeout=2).json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, ValueError):
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def table(rows: list[tuple[str, dict]]) -> str:
    out = ["| server | requests ok | tokens/request | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | ITL p99 (ms) "
           "| output tok/s | req/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        out.append(f"| {name} | {r['ok']}/{r['requests']} | {r['tokens'] / max(r['ok'], 1):.1f} "
                   f"| {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | "
                   f"{1e3 * r['itl_p50']:.1f} | {1e3 * r['itl_p99']:.1f} | {r['tok_per_s']:.1f} "
                   f"| {r['req_per_s']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="GGUF path or a PyPI model name (smollm2)")
    p.add_argument("--servers", default="turboprefill,llama-cpp", help="which to start, in order")
    p.add_argument("--url", help="measure this running server instead of starting any")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients at most")
    p.add_argument("--rate", type=float, default=1.0, help="requests per second (Poisson)")
    p.add_argument("--duration", type=float, default=60, help="seconds of arrivals")
    p.add_argument("--prompt-words", default="32,256", help="prompt length range in words: MIN,MAX")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--parallel", type=int, default=1, help="turboprefill serve --parallel")
    p.add_argument("--devices", help="turboprefill serve --devices, e.g. cpu:0,cpu:1 (2 CPU stages; --threads is "
                   "then per stage)")
    p.add_argument("--stream-ubatch", help="turboprefill serve --stream-ubatch; a comma list (e.g. auto,0,64) runs "
                   "turboprefill once per value, one after the other")
    p.add_argument("--port", type=int, default=18123)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="append one JSON line per server here")
    a = p.parse_args(argv)
    from turboprefill.models import resolve_model

    lo, hi = (int(x) for x in a.prompt_words.split(","))
    plan = requests(max(1, int(a.rate * a.duration)), a.rate, (lo, hi), a.seed)
    model = str(resolve_model(a.model))
    rows = []
    caps = a.stream_ubatch.split(",") if a.stream_ubatch else [None]
    targets = [("given", None, None)] if a.url else [
        (k if cap is None or k != "turboprefill" else f"turboprefill --stream-ubatch {cap}", k, cap)
        for k in a.servers.split(",") for cap in (caps if k == "turboprefill" else [None])]
    for name, kind, cap in targets:
        url = a.url or f"http://127.0.0.1:{a.port}"
        proc = None if kind is None else launch(kind, model, a.port, a.threads, a.n_ctx, a.parallel,
                                                a.devices if kind == "turboprefill" else None, cap)
        try:
            model_id = wait_ready(proc, url) if proc else ""
            asyncio.run(drive(url, model_id, plan[:2], 1, 4))  # warm-up: first-call costs off the clock
            res = asyncio.run(drive(url, model_id, plan, a.clients, a.max_tokens))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
        rows.append((name, res))
        if res["errors"]:
            print(f"{name}: failed requests, e.g. {res['errors']}", file=sys.stderr)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps({"server": name, "model": model, **vars(a), **res}) + "\n")
    print(f"{model}: {len(plan)} requests at {a.rate}/s (Poisson) over {a.duration:.0f} s, <= {a.clients} "
          f"concurrent, prompts {lo}-{hi} words, {a.max_tokens} new tokens, greedy, {a.threads} threads")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

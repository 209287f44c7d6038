"""The `turboprefill` command: info, prefill, bench, simulate, selftest, serve."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def cmd_info(a) -> int:
    from .engine import build_info, cuda_devices
    from .errors import TurboPrefillError
    from .ggufinfo import describe_gguf
    from .models import resolve_model

    print("build:", build_info())
    try:
        gpus = cuda_devices()
        print(f"GPUs: {len(gpus['gpus'])}")
        for g in gpus["gpus"]:
            print(f"  cuda:{g['index']} {g['name']} (sm {g['cc']}, {g['free_bytes'] / 2**30:.1f} of "
                  f"{g['total_bytes'] / 2**30:.1f} GiB free, {g['sms']} SMs)")
        if gpus["gpus"]:
            print("  peer access:", gpus["peer"])
    except TurboPrefillError as e:
        print("GPUs: none usable:", e)
    if a.model is None:
        return 0
    path = resolve_model(a.model)
    d = describe_gguf(path)
    md = d["metadata"]
    arch = md.get("general.architecture", "?")
    print(f"model: {path}\n  GGUF v{d['version']}, {d['file_size'] / 2**20:.1f} MiB, {len(d['tensors'])} tensors, "
          f"architecture {arch}")
    for k, v in md.items():
        if k.startswith("tokenizer.ggml.") and isinstance(v, list):
            continue
        if k.startswith(arch + ".") or k.startswith("general."):
            print(f"  {k} = {v}")
    for line in _model_summary(arch, md, d["tensors"]):
        print("  " + line)
    types: dict[str, int] = {}
    for t in d["tensors"]:
        types[t["type"]] = types.get(t["type"], 0) + 1
    print("  tensor types:", ", ".join(f"{k}×{v}" for k, v in sorted(types.items())))
    if a.devices:
        _print_split_plan(path, a)
    return 0


def _print_split_plan(path, a) -> None:
    """The layer split an Engine would use on these devices (layer_split="auto"), with its costs."""
    from .engine import Engine

    threads = [int(x) for x in a.threads.split(",")] if a.threads and "," in a.threads else (
        int(a.threads) if a.threads else None)
    with Engine(path, devices=a.devices, threads=threads, n_ctx=a.n_ctx) as eng:
        plan = eng.config["split_plan"]
        print(f"layer split on {a.devices}: {eng.config['layer_split']}")
        if plan is None:
            return
        print(f"  planned for {plan['tokens']} tokens, ubatch {plan['ubatch']}, threads {plan['stage_threads']}; "
              f"costs: {plan['basis']}")
        for s, (c, t, te) in enumerate(zip(plan["costs"], plan["predicted_stage_times"],
                                          plan["predicted_even_times"])):
            print(f"  stage {s}: {plan['split'][s]} layers, predicted {t:.4g} {plan['unit']} "
                  f"(even split {plan['even_split'][s]} layers: {te:.4g}); per layer: tok {c['tok']:.3g}, "
                  f"pair {c['pair']:.3g}, step {c['step']:.3g}, head {c['head']:.3g}")


def _model_summary(arch: str, md: dict, tensors: list) -> list[str]:
    """What the engine will do with the architecture's optional features, in words."""
    out = []
    n_exp = md.get(f"{arch}.expert_count")
    if n_exp:
        out.append(f"mixture of experts: {n_exp} experts, {md.get(f'{arch}.expert_used_count', '?')} used per "
                   f"token, expert FFN {md.get(f'{arch}.expert_feed_forward_length', '?')}")
    window = md.get(f"{arch}.attention.sliding_window")
    if window:
        where = {"gpt-oss": "even layers", "gemma3": "5 of every 6 layers"}.get(arch, "some layers")
        out.append(f"sliding window: {window} tokens on {where}")
    if any(t["name"].endswith("attn_sinks.weight") for t in tensors):
        out.append("attention sinks: yes (one learned logit per head)")
    sections = md.get(f"{arch}.rope.dimension_sections")
    if sections is not None:
        out.append(f"M-RoPE: rotary pairs per position id (t, h, w, e) = {list(sections)}; images take 2-D positions")
    scaling = md.get(f"{arch}.rope.scaling.type")
    if scaling and scaling != "none":
        out.append(f"rope scaling: {scaling} ×{md.get(f'{arch}.rope.scaling.factor', '?')}")
    return out


def _engine(a, schedule=None):
    from .engine import Engine

    extra = {"mmproj": a.mmproj} if getattr(a, "mmproj", None) else {}
    return Engine(a.model, devices=a.devices, threads=a.threads, ubatch=a.ubatch,
                  schedule=schedule or a.schedule, n_ctx=a.n_ctx, **extra)


def cmd_prefill(a) -> int:
    if a.prompt is None and a.tokens is None and not a.image:
        print("turboprefill prefill: give --prompt, --tokens or --image", file=sys.stderr)
        return 2
    if a.image and a.tokens is not None:
        print("turboprefill prefill: --image goes with --prompt (the question), not --tokens", file=sys.stderr)
        return 2
    if a.image and not a.mmproj:
        print("turboprefill prefill: --image needs --mmproj (the vision tower's GGUF)", file=sys.stderr)
        return 2
    eng = _engine(a)
    if a.image:
        return _prefill_image(eng, a)
    if a.prompt is not None:
        toks = eng.tokenize(a.prompt)
    else:
        toks = np.random.default_rng(a.seed).integers(0, eng.config["n_vocab"], a.tokens).tolist()
    res = eng.prefill(toks)
    s = res.stats
    top = np.argsort(-res.logits)[:5]
    print(f"{s['tokens']} tokens in {s['seconds']:.3f} s: {s['tokens_per_second']:.1f} tok/s "
          f"({s['stages']} stage(s), {s['ubatches']} ubatches, bubble {100 * s['bubble_fraction']:.0f}%)")
    if a.prompt is not None:
        print("next token candidates:", [(int(i), eng.detokenize([int(i)])) for i in top])
        if a.generate:
            # Greedy continuation from the prefilled prompt: one-token prefills extend the sequence.
            new = [int(top[0])]
            for _ in range(a.generate - 1):
                r = eng.prefill([new[-1]])
                new.append(int(np.argmax(r.logits)))
            print("continuation:", repr(eng.detokenize(new)))
    else:
        print("top-5 token ids:", [int(i) for i in top])
    if a.trace:
        res.trace.to_chrome_trace(a.trace)
        print("trace written to", a.trace)
    return 0


def _prefill_image(eng, a) -> int:
    """The VLM seed's measurement for the user's own image(s): image preparation, vision tower and text
    prefill up to the first answer token, then the greedy answer and its speed."""
    content = [{"type": "image", "image": p} for p in a.image]
    content.append({"type": "text", "text": a.prompt if a.prompt is not None else "Describe this image."})
    messages = [{"role": "user", "content": content}]
    t0 = time.perf_counter()
    res = eng.prefill(messages)
    first = int(np.argmax(res.logits))
    ttft = time.perf_counter() - t0
    s = res.stats
    for path, im, enc in zip(a.image, s["images"], s["image_encode_seconds_each"]):
        print(f"image {path}: {im['source'][0]}×{im['source'][1]} -> {im['resized'][0]}×{im['resized'][1]} px, "
              f"{im['grid'][0]}×{im['grid'][1]} = {im['tokens']} image tokens, vision encode {enc:.3f} s")
    print(f"prefill: {s['tokens']} tokens ({s['image_tokens']} image) in {s['seconds']:.3f} s: "
          f"{s['tokens_per_second']:.1f} tok/s ({s['stages']} stage(s), {s['ubatches']} ubatches, "
          f"{eng.schedule}, bubble {100 * s['bubble_fraction']:.0f}%)")
    print(f"time to first token: {ttft:.3f} s (image preparation {s['image_prepare_seconds']:.3f} s, vision "
          f"{s['image_encode_seconds']:.3f} s, text prefill {s['seconds']:.3f} s)")
    n_new = a.generate if a.generate else 32
    eos = eng.tokenizer.eos_id
    new = [first]
    t1 = time.perf_counter()
    while len(new) < n_new and new[-1] != eos:
        new.append(int(np.argmax(eng.prefill([new[-1]]).logits)))
    gen_s = time.perf_counter() - t1
    print("answer:", repr(eng.detokenize(new)))
    if len(new) > 1:
        print(f"generation: {len(new) - 1} tokens after the first in {gen_s:.3f} s: {(len(new) - 1) / gen_s:.1f} tok/s")
    if a.trace:
        res.trace.to_chrome_trace(a.trace)
        print("trace written to", a.trace)
    return 0


def cmd_bench(a) -> int:
    from .bench import machine_info, report, sweep
    from .models import resolve_model

    model = str(resolve_model(a.model))
    if a.image or a.mmproj:
        return _bench_image(model, a)
    meta = machine_info()
    rows = sweep(model, ctxs=_ints(a.ctx), ubatches=_ints(a.ubatch), devices_list=a.devices.split(";"),
                 schedules=a.schedules.split(","), threads=a.threads, repeat=a.repeat, progress=not a.quiet)
    return report(rows, a.out, {**meta, "model": model}, make_plots=not a.no_plots)


def _bench_image(model: str, a) -> int:
    """bench --image: the VLM seed's table for the user's model and image (sequential vs pipelined)."""
    from .bench import image_ttft, image_ttft_table

    if not (a.image and a.mmproj):
        print("turboprefill bench: --image and --mmproj go together", file=sys.stderr)
        return 2
    ubatches = _ints(a.ubatch)
    for dev in a.devices.split(";"):
        for ub in ubatches:
            res = image_ttft(model, a.mmproj, a.image, a.question, devices=dev, threads=a.threads, ubatch=ub,
                             repeat=a.repeat)
            print(f"\n{model} + {a.mmproj}, devices {dev}, ubatch {ub}, best of {a.repeat}")
            print("\n".join(image_ttft_table(res)))
    return 0


def cmd_serve(a) -> int:
    """The OpenAI-compatible server: one engine with --parallel sequences, until Ctrl-C."""
    import os

    from ._optional import require
    from .engine import Engine
    from .server import create_app

    uvicorn = require("uvicorn", "turboprefill serve")
    from .server.scheduler import parse_stream_ubatch

    if a.parallel < 1 or a.max_queue < 0:
        print("turboprefill serve: --parallel must be >= 1 and --max-queue >= 0", file=sys.stderr)
        return 2
    try:
        stream_ubatch = parse_stream_ubatch(a.stream_ubatch)
    except ValueError as e:
        print(f"turboprefill serve: --stream-ubatch: {e}", file=sys.stderr)
        return 2
    extra = {"mmproj": a.mmproj} if a.mmproj else {}
    eng = Engine(a.model, devices=a.devices, threads=a.threads, ubatch=a.ubatch, n_ctx=a.n_ctx, n_seq=a.parallel,
                 **extra)
    model_id = a.alias or os.path.basename(eng.path).removesuffix(".gguf")
    app = create_app(eng, model_id, parallel=a.parallel, max_queue=a.max_queue, stream_ubatch=stream_ubatch)
    print(f"serving {eng.path} as {model_id!r} on http://{a.host}:{a.port}/v1 ({a.parallel} slot(s), n_ctx "
          f"{eng.config['n_ctx']}, devices {a.devices})", file=sys.stderr)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
    return 0


def cmd_simulate(a) -> int:
    from .simreport import run

    a.ctx = _ints(a.ctx) if a.ctx else []
    a.ubatch = [u if u == "auto" else int(u) for u in a.ubatch.split(",")]
    if not a.rfc and (a.model is None or not a.ctx):
        print("turboprefill simulate: give a MODEL and --ctx, or --rfc", file=sys.stderr)
        return 2
    return run(a)


def cmd_selftest(a) -> int:
    """On a user's GPUs: prefill on every GPU vs the CPU engine, schedules bit-identical on the GPUs, then a
    short sequential-vs-pipelined benchmark, as one table to paste into a bug report."""
    import tempfile

    from ._optional import require
    from .engine import Engine, build_info, cuda_devices
    from .errors import TurboPrefillError
    from .writer import write_model

    require("gguf", "selftest (it writes a small synthetic model)")  # before minutes of GPU work, not after
    info = build_info()
    print("build:", info)
    if not info["cuda"]:
        print("selftest: this build has no CUDA backend (reinstall with nvcc on PATH); nothing to test on GPUs")
        return 1
    try:
        gpus = cuda_devices()["gpus"]
    except TurboPrefillError as e:
        print(f"selftest: no GPU usable: {e}")
        return 1
    if not gpus:
        print("selftest: no GPU found (the CUDA driver reports 0 devices)")
        return 1
    for g in gpus:
        print(f"  cuda:{g['index']} {g['name']} sm {g['cc']}, {g['free_bytes'] / 2**30:.1f} GiB free")
    if info.get("cuda_emulated"):
        print("note: this is the emulated test build (tests/cuda_emu): the GPUs run on the CPU, timings mean nothing")
    # --quick: a model and prompt small enough for slow or emulated devices; still 4 ubatches over 4 layers.
    n_embd, n_layer, n_ff, n_tok, ubatch = (256, 4, 512, 128, 32) if a.quick else (1024, 8, 2816, 1024, 128)
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        model = f"{tmp}/selftest.gguf"
        write_model(model, "llama", n_embd=n_embd, n_layer=n_layer, n_head=n_embd // 64,
                    n_head_kv=max(1, n_embd // 256), n_ff=n_ff, n_vocab=4096, quant="q4_k_m", seed=1)
        toks = np.random.default_rng(0).integers(0, 4096, n_tok).astype(np.int32)
        ref = Engine(model, devices="cpu", ubatch=256).prefill(toks).logits
        gpu_lists = [f"cuda:{g['index']}" for g in gpus] + (["cuda"] if len(gpus) > 1 else [])
        for dev in gpu_lists:
            out = {}
            for sched in ("sequential", "pipelined"):
                eng = Engine(model, devices=dev, ubatch=ubatch, schedule=sched)
                eng.prefill(toks[:ubatch])
                eng.reset()
                t = time.perf_counter()
                res = eng.prefill(toks)
                out[sched] = (res.logits, eng.kv_digest(), time.perf_counter() - t)
            cos = float(np.dot(out["pipelined"][0], ref) / np.linalg.norm(out["pipelined"][0]) / np.linalg.norm(ref))
            same = bool(np.array_equal(out["sequential"][0], out["pipelined"][0])
                        and out["sequential"][1] == out["pipelined"][1])
            good = cos > 0.999 and same and int(np.argmax(out["pipelined"][0])) == int(np.argmax(ref))
            ok &= good
            rows.append((dev, cos, same, n_tok / out["sequential"][2], n_tok / out["pipelined"][2], good))
    print("| devices | cosine vs cpu | schedules bit-identical | sequential tok/s | pipelined tok/s | gain | ok |")
    print("|---|---:|---|---:|---:|---:|---|")
    for dev, cos, same, s, p, good in rows:
        print(f"| {dev} | {cos:.6f} | {same} | {s:.0f} | {p:.0f} | {p / s:.2f}x | {'PASS' if good else 'FAIL'} |")
    print("selftest:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="turboprefill", description="Pipelined long-prompt prefill for GGUF LLMs")
    sub = p.add_subparsers(dest="cmd", required=True)

    pi = sub.add_parser("info", help="build, GPUs and a model's metadata")
    pi.add_argument("model", nargs="?", help="GGUF path or a PyPI model name (gemma3-270m, smollm2)")
    pi.add_argument("--devices", default=None, help="also show the auto layer split on these devices")
    pi.add_argument("--threads", default=None, help="threads per stage: N or N0,N1,...")
    pi.add_argument("--n-ctx", type=int, default=None, help="context the split is planned for")
    pi.set_defaults(fn=cmd_info)

    def engine_args(q, devices="cpu", ubatch=512):
        q.add_argument("model", help="GGUF path or a PyPI model name (gemma3-270m, smollm2)")
        q.add_argument("--devices", default=devices, help="cpu | cpu:0,cpu:1 | cuda | cuda:0,cuda:1")
        q.add_argument("--threads", type=int, default=None, help="threads per stage")
        q.add_argument("--ubatch", default=str(ubatch), help="tokens per ubatch")
        q.add_argument("--n-ctx", type=int, default=None)

    pp = sub.add_parser("prefill", help="prefill a prompt and report speed (and the next tokens)")
    engine_args(pp)
    g = pp.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="text to tokenize and prefill (with --image: the question)")
    g.add_argument("--tokens", type=int, help="prefill N random tokens")
    pp.add_argument("--image", action="append", help="an image to ask about (PNG/JPEG; repeat for more); "
                   "needs --mmproj; the prompt is the model's chat template with the image(s) and --prompt")
    pp.add_argument("--mmproj", help="the vision tower's GGUF (llama.cpp's mmproj) for --image")
    pp.add_argument("--schedule", default="pipelined", choices=["pipelined", "sequential"])
    pp.add_argument("--generate", type=int, default=0, help="greedy-decode N tokens after a --prompt")
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--trace", help="write a Chrome/Perfetto trace JSON here")
    pp.set_defaults(fn=cmd_prefill)

    pb = sub.add_parser("bench", help="sequential vs pipelined sweep: ctx × ubatch × devices")
    engine_args(pb, devices="cpu:0,cpu:1", ubatch=128)
    pb.add_argument("--ctx", default="1024", help="comma-separated context lengths")
    pb.add_argument("--schedules", default="sequential,pipelined")
    pb.add_argument("--repeat", type=int, default=2, help="runs per point (best is kept)")
    pb.add_argument("--out", default="bench/out", help="folder for results.jsonl, results.md and plots")
    pb.add_argument("--no-plots", action="store_true")
    pb.add_argument("--image", help="instead of the sweep: image + question to first token on this image "
                    "(needs --mmproj), sequential vs pipelined for each device list and ubatch")
    pb.add_argument("--mmproj", help="the vision tower's GGUF, with --image")
    pb.add_argument("--question", default="Describe this image in detail.", help="with --image")
    pb.add_argument("--quiet", action="store_true")
    pb.set_defaults(fn=cmd_bench, threads=1)

    pm = sub.add_parser("simulate", help="predict a prefill with the pipeline model (calibrated here, or the "
                        "--rfc GPU setups from device profiles)")
    pm.add_argument("model", nargs="?", help="GGUF path or a PyPI model name (calibrated on this machine's CPU)")
    pm.add_argument("--rfc", action="store_true", help="the issue's 4×3090 / 8×5060 Ti setups from device profiles")
    pm.add_argument("--devices", default="cpu:0,cpu:1")
    pm.add_argument("--threads", default=None, help="threads per stage: N or N0,N1,... (default 1)")
    pm.add_argument("--ctx", default=None, help="comma-separated prompt lengths")
    pm.add_argument("--ubatch", default="128", help='comma-separated ubatch sizes or "auto"')
    pm.add_argument("--ubatch-max", type=int, default=512, help='largest ubatch for "auto"')
    pm.add_argument("--split", default="even", help='"even", "auto" or layer counts like 10,8')
    pm.add_argument("--schedule", default="pipelined", choices=["pipelined", "sequential", "lockstep"])
    pm.add_argument("--measure", action="store_true", help="also run each point and print the error")
    pm.add_argument("--repeat", type=int, default=3, help="measured runs per point (best is kept)")
    pm.add_argument("--plot", default=None, help="Gantt plot path; {ctx} and {ubatch} are replaced")
    pm.set_defaults(fn=cmd_simulate)

    pv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    engine_args(pv)
    pv.add_argument("--mmproj", help="the vision tower's GGUF: image_url parts in chat messages")
    pv.add_argument("--host", default="127.0.0.1")
    pv.add_argument("--port", type=int, default=8080)
    pv.add_argument("--parallel", type=int, default=1, help="requests generating at once (engine sequences)")
    pv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    pv.add_argument("--stream-ubatch", default="auto",
                    help="prompt ubatch cap while answers stream, bounding their stall behind a prompt: a token "
                    "count, 0 (none) or auto (about 0.1 s of prompt work at the measured prefill speed)")
    pv.add_argument("--alias", help="the model id clients name (default: the GGUF's file name)")
    pv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    pv.set_defaults(fn=cmd_serve)

    ps = sub.add_parser("selftest", help="check the GPUs: kernels vs CPU, then a short pipeline benchmark")
    ps.add_argument("--quick", action="store_true",
                    help="a small model and 128 tokens: seconds instead of a minute, no meaningful timings")
    ps.set_defaults(fn=cmd_selftest)

    a = p.parse_args(argv)
    if a.cmd in ("prefill", "serve"):
        a.ubatch = int(a.ubatch)
    from .errors import TurboPrefillError

    try:
        return a.fn(a)
    except (TurboPrefillError, ValueError, OSError, MemoryError) as e:
        print(f"turboprefill: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        # MissingDependencyError (an extra) is handled above; this is a broken install: a required package
        # or the native library itself is missing. One line that says what to install, not a traceback.
        from ._optional import install_hint

        if isinstance(e, ModuleNotFoundError) and e.name:
            msg = f"missing Python module {e.name!r}: `{install_hint(e.name)}` (or reinstall turboprefill)"
        else:
            msg = str(e)
        print(f"turboprefill: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("turboprefill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

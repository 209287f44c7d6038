"""The Engine API: configuration in, PrefillResult (logits, stats, trace) out.

Python owns configuration, tokenization and result shaping; all compute happens in the C++ engine behind
the C ABI. A prefill runs in a helper thread so that Ctrl-C in the caller cancels it promptly.

An Engine holds n_seq sequences (KV slots). prefill(..., seq=), decode(seqs, tokens), free_seq and seq_info
may be called from several threads at once on different sequences: their ubatches share the pipeline and
each sequence's results are exactly what it would get alone. Calls on one sequence wait for each other;
reset, save_state and load_state wait for every running call. cancel() (and Ctrl-C during a call) stops every
running call of the engine, on all sequences.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ._native import check, ffi, last_error, lib
from ._optional import pyplot

SCHEDULES = {"pipelined": 0, "sequential": 1}


def build_info() -> dict:
    """How the native library was built: {"cuda": bool, "cuda_archs": [...], "cuda_version": str|None, "simd": str}."""
    return json.loads(ffi.string(lib.tp_build_info_json()).decode())


def cuda_devices() -> dict:
    """Visible GPUs and the peer-access matrix. Raises DeviceError without a driver, UnsupportedError
    in a build without CUDA."""
    out = ffi.new("char **")
    check(lib.tp_cuda_devices_json(out))
    try:
        return json.loads(ffi.string(out[0]).decode("utf-8", "replace"))
    finally:
        lib.tp_free(out[0])


@dataclass
class TraceEvent:
    stage: int
    ubatch: int
    n_tokens: int
    start: float  # seconds since the prefill started
    end: float


@dataclass
class Trace:
    """Per-(stage, ubatch) timing of one prefill."""

    events: list[TraceEvent] = field(default_factory=list)
    # The vision tower's runs before the prefill (image index, image tokens, start, end; seconds relative to
    # the prefill's start, so negative): the image part of the time to first token.
    vision: list[tuple[int, int, float, float]] = field(default_factory=list)

    @property
    def n_stages(self) -> int:
        return 1 + max((e.stage for e in self.events), default=-1)

    @property
    def n_ubatches(self) -> int:
        return 1 + max((e.ubatch for e in self.events), default=-1)

    def to_chrome_trace(self, path: str | os.PathLike) -> None:
        """Write a Chrome/Perfetto trace (one track per stage)."""
        evs = [
            {
                "name": f"ubatch {e.ubatch}",
                "cat": "prefill",
                "ph": "X",
                "pid": 0,
                "tid": e.stage,
                "ts": e.start * 1e6,
                "dur": (e.end - e.start) * 1e6,
                "args": {"tokens": e.n_tokens},
            }
            for e in self.events
        ]
        evs += [
            {"name": f"image {i}", "cat": "vision", "ph": "X", "pid": 0, "tid": -1, "ts": t0 * 1e6,
             "dur": (t1 - t0) * 1e6, "args": {"image_tokens": n}}
            for i, n, t0, t1 in self.vision
        ]
        meta = [
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": s, "args": {"name": f"stage {s}"}}
            for s in range(self.n_stages)
        ] + ([{"name": "thread_name", "ph": "M", "pid": 0, "tid": -1, "args": {"name": "vision"}}]
             if self.vision else [])
        with open(path, "w") as f:
            json.dump({"traceEvents": meta + evs, "displayTimeUnit": "ms"}, f)

    def plot(self, path: str | os.PathLike, title: str | None = None) -> None:
        """Save a Gantt chart (stages × time, one box per ubatch) as an image. Needs matplotlib (the `bench`
        extra); without it raises MissingDependencyError."""
        plt = pyplot("Trace.plot()")

        fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * max(1, self.n_stages)))
        cmap = plt.get_cmap("tab20")
        for e in self.events:
            ax.barh(e.stage, (e.end - e.start) * 1e3, left=e.start * 1e3, color=cmap(e.ubatch % 20),
                    edgecolor="black", linewidth=0.3)
        for i, _, t0, t1 in self.vision:  # the vision tower, on a row above the stages
            ax.barh(-1, (t1 - t0) * 1e3, left=t0 * 1e3, color="lightgrey", edgecolor="black", linewidth=0.3)
        rows = ([-1] if self.vision else []) + list(range(self.n_stages))
        ax.set_yticks(rows)
        ax.set_yticklabels((["vision"] if self.vision else []) + [f"stage {s}" for s in range(self.n_stages)])
        ax.invert_yaxis()
        ax.set_xlabel("time (ms)")
        ax.set_title(title or f"{self.n_ubatches} ubatches × {self.n_stages} stages")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


@dataclass
class PrefillResult:
    logits: np.ndarray  # float32 [n_vocab] (last token) or [n_tokens, n_vocab] (all_logits=True)
    stats: dict
    trace: Trace


def _stats(trace: Trace, seconds: float, n_tokens: int) -> dict:
    P, M = trace.n_stages, trace.n_ubatches
    busy = [0.0] * P
    for e in trace.events:
        busy[e.stage] += e.end - e.start
    ideal = (M * P) / (M + P - 1) if M and P else 1.0
    # Speedup over running the same steps one at a time (the sequential schedule's lower bound).
    speedup = sum(busy) / seconds if seconds > 0 else 0.0
    return {
        "tokens": n_tokens,
        "seconds": seconds,
        "tokens_per_second": n_tokens / seconds if seconds > 0 else float("inf"),
        "stages": P,
        "ubatches": M,
        "stage_busy_seconds": busy,
        "bubble_fraction": 1.0 - sum(busy) / (P * seconds) if seconds > 0 and P else 0.0,
        "ideal_speedup": ideal,
        "speedup_vs_serial": speedup,
        "efficiency": speedup / ideal if ideal > 0 else 0.0,
    }


def _even(n_layer: int, n_stages: int) -> list[int]:
    from .split import even_split

    return even_split(n_layer, n_stages)


def _as_tokens(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be a 1-D sequence of ints, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError("token ids must fit in int32")
    return np.ascontiguousarray(arr, dtype=np.int32)


class Engine:
    """A loaded model placed on one or more devices (one pipeline stage per device entry).

    Args:
        model: path of a GGUF file, or the name of a model installed from PyPI ("gemma3-270m", "smollm2").
        devices: "cpu", "cpu:0,cpu:1" (one stage per entry), "cuda", "cuda:0,cuda:1", or a list of entries.
        threads: worker threads per stage (None: the machine's cores split between stages), or a list with
            one count per stage (cpu stages of different speed, e.g. [2, 1]).
        ubatch: tokens per ubatch, or "auto": cut each prompt into ubatches of about equal predicted cost
            (attention over the prefix makes late tokens dearer), none larger than ubatch_max (default 512)
            nor smaller than ubatch_min (default ubatch_max // 8) where the prompt allows.
        ubatch_min, ubatch_max: bounds for ubatch="auto".
        ubatch_cost: (per-token, per-attention-pair[, per-ubatch]) cost of one layer for ubatch="auto"; None:
            measured coefficients when layer_split="auto" measured them, else FLOP counts.
        schedule: "pipelined" or "sequential".
        n_ctx: context size (None: the model's training context).
        layer_split: layers per stage; "auto" (default): layers chosen so that the stages' predicted times
            are equal (split.py: FLOP counts for identical stages, measured and cached costs otherwise;
            the plan is in config["split_plan"]); None: even split.
        ring_slots: activation slots between consecutive stages (None: default).
        n_seq: sequences (KV slots) the engine holds; each grows its KV cache as it is used, up to n_ctx
            tokens. prefill(), reset(), save_state() and the other single-sequence calls use sequence 0.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        devices: str | Iterable[str] = "cpu",
        threads: int | None = None,
        ubatch: int | str = 512,
        schedule: str = "pipelined",
        n_ctx: int | None = None,
        layer_split: Sequence[int] | str | None = "auto",
        ring_slots: int | None = None,
        ubatch_min: int | None = None,
        ubatch_max: int | None = None,
        ubatch_cost: tuple[float, float] | None = None,
        mmproj: str | os.PathLike | None = None,
        vision_device: str | None = None,
        vision_threads: int | None = None,
        n_seq: int = 1,
    ):
        from .models import resolve_model

        self._h = None
        self.path = str(resolve_model(model))
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        dev = devices if isinstance(devices, str) else ",".join(devices)
        p = ffi.new("tp_engine_params *")
        lib.tp_engine_params_default(p)
        keep = [ffi.new("char[]", os.fsencode(self.path)), ffi.new("char[]", dev.encode())]
        p.model_path = keep[0]
        p.devices = keep[1]
        if isinstance(threads, (list, tuple)):
            if len(threads) > lib.TP_MAX_STAGES:
                raise ValueError(f"threads has {len(threads)} entries; at most {lib.TP_MAX_STAGES}")
            p.n_stage_threads = len(threads)
            for i, t in enumerate(threads):
                p.stage_threads[i] = int(t)
        else:
            p.threads = int(threads or 0)
        auto_ub = ubatch == "auto"
        if isinstance(ubatch, str) and not auto_ub:
            raise ValueError(f'ubatch must be a positive int or "auto", got {ubatch!r}')
        if not auto_ub and (ubatch_min is not None or ubatch_max is not None):
            raise ValueError('ubatch_min/ubatch_max apply to ubatch="auto"; pass ubatch="auto" or drop them')
        p.ubatch = int(ubatch_max or 512) if auto_ub else int(ubatch)
        p.ubatch_auto = 1 if auto_ub else 0
        p.ubatch_min = int(ubatch_min or 0)
        if ubatch_cost is not None:
            if len(ubatch_cost) not in (2, 3):
                raise ValueError("ubatch_cost is (per_token, per_pair) or (per_token, per_pair, per_step), per layer")
            p.ubatch_cost_tok, p.ubatch_cost_pair = float(ubatch_cost[0]), float(ubatch_cost[1])
            p.ubatch_cost_step = float(ubatch_cost[2]) if len(ubatch_cost) == 3 else 0.0
        p.schedule = SCHEDULES[schedule]
        p.n_ctx = int(n_ctx or 0)
        self.split_plan = None
        if isinstance(layer_split, str):
            if layer_split != "auto":
                raise ValueError(f'layer_split must be a list of layer counts, "auto" or None, got {layer_split!r}')
            layer_split = self._auto_split(dev, threads, n_ctx, p.ubatch)
            plan = self.split_plan
            if auto_ub and ubatch_cost is None and plan and plan["unit"] == "seconds":
                # Measured per-layer costs beat FLOP counts for the cut too (same cost model, DESIGN §8).
                tok = float(np.mean([c["tok"] for c in plan["costs"]]))
                pair = float(np.mean([c["pair"] for c in plan["costs"]]))
                step = sum(c["step"] for c in plan["costs"]) / sum(plan["split"])  # per layer
                if tok > 0 and pair > 0:
                    p.ubatch_cost_tok, p.ubatch_cost_pair, p.ubatch_cost_step = tok, pair, step
        if layer_split is not None:
            split = [int(x) for x in layer_split]
            if len(split) > lib.TP_MAX_STAGES:
                raise ValueError(f"layer_split has {len(split)} entries; at most {lib.TP_MAX_STAGES}")
            p.n_layer_split = len(split)
            for i, v in enumerate(split):
                p.layer_split[i] = v
        p.ring_slots = int(ring_slots or 0)
        if int(n_seq) < 1:
            raise ValueError(f"n_seq must be >= 1, got {n_seq}")
        p.n_seq = int(n_seq)
        out = ffi.new("tp_engine **")
        check(lib.tp_engine_create(p, out))
        self._h = out[0]
        self.devices = dev
        self.layer_split = list(layer_split) if layer_split is not None else None
        self.ubatch = "auto" if auto_ub else int(ubatch)
        self.ubatch_bounds = (int(p.ubatch_min) or max(1, int(p.ubatch) // 8), int(p.ubatch)) if auto_ub else None
        self.schedule = schedule
        self._tokenizer = None
        self.n_seq = int(n_seq)
        self._n_vocab = int(self.config["n_vocab"])  # read once: decode() runs per generated token
        # One lock per sequence: calls on different sequences run concurrently. Whole-engine operations take
        # all of them, always in increasing order (as decode does for its sequences), so none can deadlock.
        self._seq_locks = [threading.Lock() for _ in range(self.n_seq)]
        self.vision = None
        if mmproj is not None:
            self._open_vision(mmproj, vision_device, vision_threads)

    def _open_vision(self, mmproj, device: str | None, threads: int | None) -> None:
        """The vision tower of mmproj on `device` (default: the first stage's device), checked against the
        text model: its projection must have the text model's width."""
        from .vision import VisionEncoder

        if device is None:
            first = self.devices.split(",")[0].strip()
            device = "cuda:0" if first == "cuda" else first
        try:
            self.vision = VisionEncoder(mmproj, device=device, threads=int(threads or 0))
        except Exception:
            self.close()
            raise
        proj, n_embd = self.vision.info["proj_dim"], self.config["n_embd"]
        if proj != n_embd:
            self.close()
            raise ValueError(f"{mmproj}: the vision tower projects to {proj} features but the text model "
                             f"{self.path} has n_embd {n_embd}: this mmproj belongs to another model")

    def _auto_split(self, devices: str, threads, n_ctx, ubatch: int) -> list[int] | None:
        """Plan layer_split="auto" (split.py); None for one stage, which has nothing to split."""
        from .costmodel import DeviceCost, windows_of
        from .errors import TurboPrefillError
        from .split import auto_split, device_kinds

        try:
            kinds = device_kinds(devices)
        except TurboPrefillError:
            return None  # GPUs named but unusable: the engine's own check says why, with what to do
        if len(kinds) < 2:
            return None
        # A one-stage cpu engine over the same file tells dimensions and layer kinds (mmap only: cheap).
        with Engine(self.path, devices="cpu", threads=1, layer_split=None, n_ctx=n_ctx) as probe:
            cfg = probe.config
            windows = windows_of(probe.layer_swa, cfg["n_swa"])
            tok, pair = ffi.new("double *"), ffi.new("double *")
            check(lib.tp_engine_cost_defaults(probe._handle(), tok, pair))
        if len(kinds) > cfg["n_layer"]:
            return None  # more stages than layers: the engine refuses it with its own message
        flop = DeviceCost(tok=tok[0], pair=pair[0], head=2.0 * cfg["n_vocab"] * cfg["n_embd"])
        self.split_plan = auto_split(self.path, devices, threads, cfg, windows, flop, ubatch, kinds)
        return self.split_plan["split"]

    # ---- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "vision", None) is not None:
            self.vision.close()
            self.vision = None
        if self._h is not None:
            lib.tp_engine_free(self._h)
            self._h = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _handle(self):
        if self._h is None:
            raise ValueError("Engine is closed")
        return self._h

    # ---- info ----------------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        info = ffi.new("tp_model_info *")
        check(lib.tp_engine_info(self._handle(), info))
        return {
            "architecture": ffi.string(info.architecture).decode(),
            "n_vocab": info.n_vocab,
            "n_embd": info.n_embd,
            "n_layer": info.n_layer,
            "n_head": info.n_head,
            "n_head_kv": info.n_head_kv,
            "head_dim": info.head_dim,
            "n_ff": info.n_ff,
            "n_ctx_train": info.n_ctx_train,
            "n_ctx": info.n_ctx,
            "n_stages": info.n_stages,
            "n_params": info.n_params,
            "file_bytes": info.file_bytes,
            "n_expert": info.n_expert,
            "n_expert_used": info.n_expert_used,
            "n_ff_exp": info.n_ff_exp,
            "n_swa": info.n_swa,
            "n_swa_layers": info.n_swa_layers,
            "attn_sinks": bool(info.attn_sinks),
            "rope_scaling": ffi.string(info.rope_scaling).decode(),
            "rope_sections": list(info.rope_sections),
            "next_pos": info.next_pos,
            "n_seq": info.n_seq,
            "devices": self.devices,
            "ubatch": self.ubatch,
            "ubatch_min_max": self.ubatch_bounds,
            "layer_split": self.layer_split or _even(info.n_layer, info.n_stages),
            "split_plan": self.split_plan,
            "schedule": self.schedule,
        }

    @property
    def layer_swa(self) -> list[int]:
        """Per layer: 1 when it uses the sliding window (its attention cost is capped by n_swa), else 0."""
        n = self.config["n_layer"]
        buf = ffi.new("int8_t[]", n)
        check(lib.tp_engine_layer_swa(self._handle(), buf, n))
        return [int(x) for x in buf]

    @property
    def n_past(self) -> int:
        """Tokens already in sequence 0 (the KV cache)."""
        return self.seq_info(0)[0]

    def seq_info(self, seq: int) -> tuple[int, int]:
        """(n_past, next_pos) of sequence `seq`: its tokens, and the rope position of its next plain token."""
        n_past, next_pos = ffi.new("int64_t *"), ffi.new("int64_t *")
        check(lib.tp_engine_seq_info(self._handle(), self._seq(seq), n_past, next_pos))
        return int(n_past[0]), int(next_pos[0])

    def _seq(self, seq: int) -> int:
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)):
            raise TypeError(f"sequence ids are ints, got {seq!r}")
        if not 0 <= int(seq) < self.n_seq:
            raise ValueError(f"sequence id {seq} is out of range [0, {self.n_seq}) (the Engine has n_seq={self.n_seq})")
        return int(seq)

    # ---- tokenizer -----------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .ggufinfo import describe_gguf
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_metadata(describe_gguf(self.path)["metadata"])
        return self._tokenizer

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # ---- compute -------------------------------------------------------------------------------------
    def prefill(self, tokens: Sequence[int] | np.ndarray | str | Sequence[dict], all_logits: bool = False,
                images: Sequence | None = None, seq: int = 0) -> PrefillResult:
        """Run a prompt after the tokens already in the sequence; returns the last token's logits (or all).

        tokens: token ids; or, for the image path, a string (tokenized with special tokens) or chat messages
        (rendered with the GGUF's chat template; image parts {"type": "image", "image": path | PIL | array}).
        images: images for the prompt's image placeholders, in order (one <|image_pad|> run each); they need
        an Engine created with mmproj=. With images the stats gain image_tokens, image_prepare_seconds,
        image_encode_seconds and images, and the trace the vision tower's runs (multimodal.py).
        seq: the sequence to extend (0 <= seq < n_seq). The stats and trace are this call's own ubatches;
        when other sequences ran at the same time their steps overlap these in time."""
        seq = self._seq(seq)
        if images is None and not isinstance(tokens, str) and not (
                isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], dict)):
            toks = _as_tokens(tokens)
            if seq != 0 and toks.size and toks.min() < 0:  # prefill_seq would read it as an embedding row
                i = int(np.argmin(toks))
                raise ValueError(f"token id {int(toks[i])} at position {i} is out of range [0, "
                                 f"{self.config['n_vocab']})")
            return self._prefill_native(toks, None, None, all_logits, mm=seq != 0, seq=seq)
        from . import multimodal

        return multimodal.prefill(self, tokens, images, all_logits, seq=seq)

    @property
    def next_pos(self) -> int:
        """Rope position of the next token: n_past, except after an image in an M-RoPE model (Qwen2-VL's rule:
        the text after an image continues one past the largest position id the image used)."""
        info = ffi.new("tp_model_info *")
        check(lib.tp_engine_info(self._handle(), info))
        return int(info.next_pos)

    @property
    def chat_template(self) -> str | None:
        """The GGUF's tokenizer.chat_template, or None."""
        if not hasattr(self, "_chat_template"):
            from .ggufinfo import describe_gguf

            t = describe_gguf(self.path)["metadata"].get("tokenizer.chat_template")
            self._chat_template = t if isinstance(t, str) else None
        return self._chat_template

    def _prefill_mm(self, tokens: np.ndarray, embd: np.ndarray | None = None, pos: np.ndarray | None = None,
                    all_logits: bool = False, *, seq: int = 0) -> PrefillResult:
        """Multimodal prefill (tp_engine_prefill_mm), for the image API built on it.

        tokens: int32 [n]; entry i is a token id when >= 0, else row -1 - tokens[i] of embd.
        embd: float32 [rows, n_embd] embedding rows (used as they are), or None.
        pos: int32 [4, n] rope position ids (t, h, w, e) per entry, for M-RoPE models only; None: entry i
            takes position config["next_pos"] + i. Afterwards next_pos is the largest t/h/w id + 1 (or more).
        seq: the sequence to extend.
        """
        seq = self._seq(seq)
        toks = _as_tokens(tokens)
        n = int(toks.size)
        if embd is not None:
            embd = np.ascontiguousarray(embd, dtype=np.float32)
            if embd.ndim != 2 or embd.shape[1] != self.config["n_embd"]:
                raise ValueError(f"embd must have shape (rows, n_embd={self.config['n_embd']}), got {embd.shape}")
        if pos is not None:
            pos = np.asarray(pos)
            if pos.shape != (4, n):
                raise ValueError(f"pos must have shape (4, n={n}) (t, h, w, e ids per entry), got {pos.shape}")
            if pos.size and (not np.issubdtype(pos.dtype, np.integer) or pos.min() < np.iinfo(np.int32).min
                             or pos.max() > np.iinfo(np.int32).max):
                raise ValueError("pos must hold integers that fit in int32")
            pos = np.ascontiguousarray(pos, dtype=np.int32)
        return self._prefill_native(toks, embd, pos, all_logits, mm=True, seq=seq)

    def _prefill_native(self, toks: np.ndarray, embd: np.ndarray | None, pos: np.ndarray | None,
                        all_logits: bool, mm: bool, seq: int = 0) -> PrefillResult:
        """The one prefill path of prefill() (tp_engine_prefill) and _prefill_mm (tp_engine_prefill_seq)."""
        n = int(toks.size)
        n_vocab = self.config["n_vocab"]
        logits = np.empty((n, n_vocab) if all_logits else (n_vocab,), dtype=np.float32)
        h = self._handle()
        tok_p = ffi.cast("const int32_t *", ffi.from_buffer(toks))
        out_p = ffi.cast("float *", ffi.from_buffer(logits))
        if not mm:
            def call():
                return lib.tp_engine_prefill(h, tok_p, n, 1 if all_logits else 0, out_p, logits.size)
        else:
            embd_p = ffi.NULL if embd is None else ffi.cast("const float *", ffi.from_buffer(embd))
            pos_p = ffi.NULL if pos is None else ffi.cast("const int32_t *", ffi.from_buffer(pos))
            rows = 0 if embd is None else int(embd.shape[0])

            def call():
                return lib.tp_engine_prefill_seq(h, seq, tok_p, n, embd_p, rows, pos_p, 1 if all_logits else 0,
                                                 out_p, logits.size)
        with self._seq_locks[seq]:
            status, message = self._run_cancellable(call)
            check(status, message)
            trace, seconds = self._trace(seq)
            steps, experts = ffi.new("int64_t *"), ffi.new("int64_t *")
            check(lib.tp_engine_seq_moe_stats(h, seq, steps, experts))
        stats = _stats(trace, seconds, n)
        # Mixture of experts: distinct experts one ubatch's tokens were routed to, averaged over (layer,
        # ubatch) steps: how many expert matrices each ubatch streams (None: dense, or not counted on cuda).
        stats["experts_per_ubatch"] = experts[0] / steps[0] if steps[0] > 0 else None
        return PrefillResult(logits=logits, stats=stats, trace=trace)

    def _run_cancellable(self, call) -> tuple[int, str]:
        """Run a blocking native call in a thread; Ctrl-C cancels it and re-raises KeyboardInterrupt.
        Returns (status, tp_last_error() read on that thread)."""
        result: list[tuple[int, str]] = []
        done = threading.Event()

        def run():
            try:
                status = call()
                result.append((status, last_error() if status else ""))
            finally:
                done.set()

        # Wait on an Event rather than Thread.join: a join interrupted by KeyboardInterrupt can report the
        # thread as finished while the native call is still running.
        threading.Thread(target=run, daemon=True).start()
        try:
            while not done.wait(0.05):
                pass
        except KeyboardInterrupt:
            # Cancel again every 50 ms until the call returns: a cancel that lands before the native
            # prefill has started would otherwise be forgotten. A second Ctrl-C just keeps waiting.
            while not done.is_set():
                lib.tp_engine_cancel(self._h)
                try:
                    done.wait(0.05)
                except KeyboardInterrupt:
                    pass
            raise
        return result[0]

    def decode(self, seqs: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """Append tokens[i] to sequence seqs[i] for every i, in one batch through the stages (each row attends
        to its own sequence only); returns float32 [n, n_vocab], row i = seqs[i]'s next-token logits. The
        sequences must be distinct. A decode goes ahead of queued prompt ubatches of other sequences."""
        seq_list = [self._seq(s) for s in seqs]
        toks = _as_tokens(tokens)
        n = len(seq_list)
        if n == 0 or toks.size != n:
            raise ValueError(f"decode needs one token per sequence (got {n} sequences, {toks.size} tokens)")
        if len(set(seq_list)) != n:
            raise ValueError(f"decode lists a sequence twice: {seq_list}")
        seq_arr = np.asarray(seq_list, dtype=np.int32)
        logits = np.empty((n, self._n_vocab), dtype=np.float32)
        h = self._handle()
        seq_p = ffi.cast("const int32_t *", ffi.from_buffer(seq_arr))
        tok_p = ffi.cast("const int32_t *", ffi.from_buffer(toks))
        out_p = ffi.cast("float *", ffi.from_buffer(logits))

        def call():
            return lib.tp_engine_decode(h, n, seq_p, tok_p, out_p, logits.size)

        locks = [self._seq_locks[s] for s in sorted(seq_list)]
        for lk in locks:
            lk.acquire()
        try:
            status, message = self._run_cancellable(call)
        finally:
            for lk in reversed(locks):
                lk.release()
        check(status, message)
        return logits

    def free_seq(self, seq: int) -> None:
        """Forget sequence `seq` (its KV memory stays for its next prompt); waits for a call running on it."""
        seq = self._seq(seq)
        with self._seq_locks[seq]:
            check(lib.tp_engine_seq_free(self._handle(), seq))

    def _trace(self, seq: int = 0) -> tuple[Trace, float]:
        """The trace and wall seconds of the last call on `seq`."""
        n, seconds = ffi.new("int64_t *"), ffi.new("double *")
        check(lib.tp_engine_seq_trace(self._h, seq, ffi.NULL, 0, n, seconds))
        buf = ffi.new("tp_trace_event[]", max(1, n[0]))
        check(lib.tp_engine_seq_trace(self._h, seq, buf, n[0], n, seconds))
        events = [TraceEvent(e.stage, e.ubatch, e.n_tokens, e.t_start, e.t_end) for e in buf[0 : n[0]]]
        return Trace(events), float(seconds[0])

    class _AllSequences:
        """Holds every sequence lock (in increasing order): no call runs meanwhile."""

        def __init__(self, eng: Engine):
            self.locks = eng._seq_locks

        def __enter__(self):
            for lk in self.locks:
                lk.acquire()

        def __exit__(self, *exc):
            for lk in reversed(self.locks):
                lk.release()

    def kv_digest(self, seq: int = 0) -> int:
        """Hash of every stage's KV cache over the tokens in sequence `seq` (equal caches, equal digests)."""
        out = ffi.new("uint64_t *")
        check(lib.tp_engine_seq_kv_digest(self._handle(), self._seq(seq), out))
        return int(out[0])

    def save_state(self, path: str | os.PathLike) -> None:
        """Write sequence 0's KV cache (every stage) and the model's identity to `path` (a prefix cache)."""
        with self._AllSequences(self):
            check(lib.tp_engine_save_state(self._handle(), os.fsencode(path)))

    def load_state(self, path: str | os.PathLike) -> None:
        """Replace sequence 0 with one saved by save_state(); the next prefill continues after its tokens.
        Raises when the state comes from another model or layer split, or the file is corrupt or truncated
        (the sequence is then left as it was)."""
        with self._AllSequences(self):
            check(lib.tp_engine_load_state(self._handle(), os.fsencode(path)))

    def _inject_fault(self, layer: int) -> None:
        """Testing aid: later prefills fail when they reach `layer` (-1 turns it off)."""
        check(lib.tp_engine_inject_fault(self._handle(), int(layer)))

    def reset(self) -> None:
        """Forget sequence 0; the next prefill starts at position 0."""
        with self._AllSequences(self):
            check(lib.tp_engine_reset(self._handle()))

    def in_flight(self) -> list[int]:
        """Ubatches at each pipeline stage right now (waiting in its input ring or being computed): one count
        per stage. A snapshot that any thread may take while calls run."""
        n = ffi.new("int32_t*")
        counts = ffi.new("int32_t[]", 64)
        check(lib.tp_engine_in_flight(self._handle(), counts, 64, n))
        return [int(counts[i]) for i in range(min(int(n[0]), 64))]

    def cancel(self, seq: int | None = None) -> None:
        """Ask every running prefill and decode (in other threads) to stop; each raises CancelledError and
        leaves its sequences as they were. With seq=, only the prefills running on that sequence stop (other
        sequences' calls and decode steps go on). A cancel that lands before the call starts is not kept."""
        if self._h is None:
            return
        if seq is None:
            lib.tp_engine_cancel(self._h)
        else:
            check(lib.tp_engine_cancel_seq(self._h, int(seq)))

    def set_ubatch_limit(self, limit: int | None) -> None:
        """Cap the prefill ubatches that enter the pipeline from now on at `limit` tokens, including the rest of
        prefills already running (None or 0: the ubatches planned at creation). Any thread. The server lowers
        it while answers stream, so that a decode step waits behind a short ubatch only. Logits do not change
        on the CPU backend; on CUDA they may by f32 rounding, as between ubatch sizes."""
        check(lib.tp_engine_set_ubatch_limit(self._handle(), int(limit or 0)))

    def chat(self, messages: Sequence[dict], params=None, **sampling) -> str:
        """The assistant's reply to chat messages (the GGUF's chat template; images as in prefill()), sampled
        with SamplingParams given as params= or as keywords (temperature=0 is greedy; see sampling.py). The
        sequence is reset first: messages are the whole conversation."""
        return "".join(self.chat_stream(messages, params, **sampling))

    def chat_stream(self, messages: Sequence[dict], params=None, **sampling) -> Iterator[str]:
        """chat() as a generator of text pieces, each shown as soon as it can be (never part of a stop
        string or of a UTF-8 character)."""
        from .chat import sampling_params, steps

        for step in steps(self, messages, sampling_params(params, sampling)):
            if step.text:
                yield step.text

    def generate(self, tokens: Sequence[int] | np.ndarray | str | Sequence[dict], max_new_tokens: int = 32,
                 stop_at_eos: bool = True, images: Sequence | None = None) -> list[int]:
        """Greedy decoding built on prefill: returns the new token ids (the prompt, with its images if any,
        is prefilled first; see prefill() for the prompt forms)."""
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        eos = None
        if stop_at_eos:
            try:
                eos = self.tokenizer.eos_id
            except Exception:
                eos = None
        out: list[int] = []
        if max_new_tokens == 0:
            return out
        res = self.prefill(tokens, images=images)
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(res.logits))
            out.append(nxt)
            if eos is not None and nxt == eos:
                break
            if len(out) == max_new_tokens:
                break
            res = self.prefill([nxt])
        return out

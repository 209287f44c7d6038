"""scheduler.py — requests through one Engine: a queue, n slots (engine sequences), prefills and batched decode.

Owns the request life cycle: submit() queues a request (QueueFull past max_queue); the scheduler thread admits
queued requests into free slots and starts each one's prefill in a thread of its own (the engine call blocks;
the engine interleaves concurrent prefills' ubatches in its pipeline); a finished prefill samples the first
token and joins the running set; then every step of the same thread batches one token per running request into
one Engine.decode call, samples each request and hands the Step to its consumer. A request ends on a stop, on
max_tokens or a full context, on an engine error, or on cancel() (a client that went away): its slot is freed
before the next step. A prefill in flight is stopped with Engine.cancel(seq=its slot) within about one ubatch;
other slots' prefills and the decode steps go on.

While any request streams (the decode set is not empty), prompt ubatches are capped (Engine.set_ubatch_limit,
which also cuts the rest of prompts already running): a decode step goes ahead of queued prompt ubatches at
stage 0 but waits for the one being computed, so the cap bounds the stall a prompt puts into other requests'
answers. stream_ubatch="auto" sizes the cap to STALL_TARGET seconds of prompt work at the compute speed of this
server's recent prompts (from their traces: tokens over the busiest stage's ubatch time, so waiting behind
other work does not count); an int is a fixed cap, 0 none. With no answer streaming, prompts run in the full
ubatches.

Events go to the consumer through its `emit` callable (the server passes one that hops onto the asyncio loop):
a sampling.Step per token, or a RequestFailed at most once, after which nothing follows.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ContextOverflowError
from ..sampling import Generation, SamplingParams, Step


class QueueFull(RuntimeError):
    """Too many requests are waiting (the server's 429)."""


@dataclass
class RequestFailed:
    """The request could not go on: status is the HTTP status the server answers with."""

    status: int
    message: str
    kind: str


_ids = itertools.count()


@dataclass(eq=False)  # identity: the queue removes this request, not an equal-looking one
class Request:
    """One generation request. prompt: token ids; or `images` with prompt ids holding <|image_pad|> runs."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Any], None]
    images: Sequence[Any] = ()
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.perf_counter)
    slot: int | None = None
    gen: Generation | None = None
    last_token: int = -1
    last_time: float = 0.0
    n_prompt: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)


STALL_TARGET = 0.1  # seconds: the prompt work a streaming answer may wait behind, with stream_ubatch="auto"
MIN_STREAM_UBATCH = 16  # the auto cap never goes below this (tiny ubatches waste the matmul kernels)


def parse_stream_ubatch(value: int | str) -> int | str:
    """"auto" or an int >= 0 (the server's --stream-ubatch); ValueError otherwise."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise ValueError(f'stream_ubatch must be "auto" or a token count >= 0 (0: no cap while answers stream), '
                         f"got {value!r}")
    return n


class Scheduler:
    def __init__(self, engine: Any, n_slots: int, max_queue: int, metrics: Any = None,
                 stream_ubatch: int | str = "auto"):
        self.eng = engine
        if not 1 <= n_slots <= engine.n_seq:
            raise ValueError(f"{n_slots} slots need an Engine with as many sequences (it has n_seq={engine.n_seq})")
        self.stream_ubatch = parse_stream_ubatch(stream_ubatch)
        ub = engine.ubatch_bounds[1] if engine.ubatch == "auto" else engine.ubatch
        self._ubatch = int(ub)  # the engine's largest prompt ubatch
        self._limit = 0  # the cap now set on the engine
        self._prefill_rate = 0.0  # tokens/s of recent prompts (a moving average), for the auto cap
        self.n_slots = n_slots
        self.n_ctx = int(engine.config["n_ctx"])
        self.max_queue = max_queue
        self.metrics = metrics
        self._free = list(range(n_slots - 1, -1, -1))
        self._queue: deque[Request] = deque()
        self._running: dict[int, Request] = {}  # slot -> request in the decode set
        self._prefilling: dict[int, Request] = {}
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tp-scheduler", daemon=True)
        self._thread.start()

    # ---- the consumer's side ------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        with self._cv:
            if self._stop:
                raise RuntimeError("the scheduler is shut down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting (--max-queue {self.max_queue}); "
                                "retry later")
            self._queue.append(req)
            self._gauges()
            self._cv.notify_all()

    def cancel(self, req: Request) -> None:
        req.cancelled.set()
        with self._cv:
            if req in self._queue:
                self._queue.remove(req)
                self._count("cancelled")
                self._gauges()
            elif self._prefilling.get(req.slot) is req:
                self._cancel_prefill(req)
            self._cv.notify_all()

    def _cancel_prefill(self, req: Request) -> None:
        """Stop req's prefill (under the lock). The engine forgets a cancel that lands before its call starts,
        so it is repeated every 50 ms while the prefill runs. Holding the lock makes each repeat safe: the
        slot cannot be released and given to the next request's prefill in between."""
        if self._prefilling.get(req.slot) is not req:
            return
        self.eng.cancel(seq=req.slot)

        def again() -> None:
            with self._cv:
                self._cancel_prefill(req)

        t = threading.Timer(0.05, again)
        t.daemon = True
        t.start()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    @property
    def depth(self) -> tuple[int, int]:
        """(queued, holding a slot)"""
        with self._cv:
            return len(self._queue), len(self._running) + len(self._prefilling)

    # ---- engine calls ----------------------------------------------------------------------------------
    def _prepare_images(self, req: Request) -> Any:
        """The image prompt (vision tower run, positions laid out after the slot's empty sequence), or None."""
        from ..multimodal import build_image_prompt

        if not req.images:
            req.n_prompt = len(req.prompt)
            return None
        ip = build_image_prompt(self.eng, np.asarray(req.prompt, np.int64), req.images, seq=req.slot)
        req.n_prompt = int(ip.layout.tokens.size)
        return ip

    def _prefill(self, req: Request, ip: Any) -> Any:
        if ip is not None:
            return self.eng._prefill_mm(ip.layout.tokens, ip.rows, ip.layout.positions, seq=req.slot)
        return self.eng.prefill(req.prompt, seq=req.slot)

    def _measure(self, res: Any, n: int) -> None:
        """Folds a prompt's compute speed (tokens over its busiest stage's ubatch seconds) into the average
        that sizes the auto cap."""
        busy: dict[int, float] = {}
        for e in res.trace.events:
            busy[e.stage] = busy.get(e.stage, 0.0) + (e.end - e.start)
        if n < MIN_STREAM_UBATCH or not busy or max(busy.values()) <= 0:
            return  # short prompts measure the per-call overhead, not the speed
        rate = n / max(busy.values())
        with self._cv:
            self._prefill_rate = rate if self._prefill_rate <= 0 else 0.7 * self._prefill_rate + 0.3 * rate

    def _release(self, req: Request) -> None:
        """Give the request's slot back (under the lock)."""
        slot = req.slot
        self._running.pop(slot, None)
        self._prefilling.pop(slot, None)
        self.eng.free_seq(slot)
        self._free.append(slot)
        self._cap_ubatches()
        self._gauges()
        self._cv.notify_all()

    def stream_cap(self) -> int:
        """The cap on prompt ubatches while answers stream (0: none)."""
        if self.stream_ubatch != "auto":
            return int(self.stream_ubatch)
        if self._prefill_rate <= 0:
            return 0  # nothing measured yet
        cap = max(MIN_STREAM_UBATCH, int(self._prefill_rate * STALL_TARGET))
        return 0 if cap >= self._ubatch else cap

    def _cap_ubatches(self) -> None:
        """Prompt ubatches capped at stream_cap() while the decode set is not empty (under the lock)."""
        want = self.stream_cap() if self._running else 0
        if want != self._limit:
            self.eng.set_ubatch_limit(want)
            self._limit = want
            if self.metrics is not None:
                self.metrics.ubatch_cap.set(want)

    # ---- the scheduler thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._stop:
                        return
                    for r in [r for r in self._running.values() if r.cancelled.is_set()]:
                        self._count("cancelled")
                        self._release(r)
                    while self._queue and self._free:
                        req = self._queue.popleft()
                        req.slot = self._free.pop()
                        self._prefilling[req.slot] = req
                        threading.Thread(target=self._run_prefill, args=(req,), name=f"tp-prefill-{req.id}",
                                         daemon=True).start()
                        self._gauges()
                    batch = list(self._running.values())
                    if batch:
                        break
                    self._cv.wait()
            self._step(batch)

    def _run_prefill(self, req: Request) -> None:
        t0 = time.perf_counter()
        try:
            ip = self._prepare_images(req)
        except ContextOverflowError as e:  # the images made the prompt longer than the context
            self._fail([req], RequestFailed(413, str(e), "context_length_exceeded"))
            return
        except (ValueError, OSError) as e:  # an image that cannot be read, placeholders that do not match
            self._fail([req], RequestFailed(400, str(e), "invalid_request_error"))
            return
        except Exception as e:  # noqa: BLE001 — the vision tower failed: this request ends, never the server
            self._fail([req], RequestFailed(500, f"the vision tower failed: {type(e).__name__}: {e}", "server_error"))
            return
        try:
            res = self._prefill(req, ip)
        except ContextOverflowError as e:
            self._fail([req], RequestFailed(413, str(e), "context_length_exceeded"))
            return
        except Exception as e:  # noqa: BLE001 — an engine failure ends this request, never the server
            self._fail([req], RequestFailed(500, f"the engine failed: {type(e).__name__}: {e}", "server_error"))
            return
        now = time.perf_counter()
        logits = res.logits
        self._measure(res, req.n_prompt)
        if self.metrics is not None:
            self.metrics.prefill_tps.set(req.n_prompt / max(now - t0, 1e-9))
            self.metrics.prompt_tokens.inc(req.n_prompt)
            self.metrics.ttft.observe(now - req.arrived)
        try:
            req.gen = Generation(self.eng.tokenizer, req.params, [t for t in req.prompt if t >= 0], self.n_ctx,
                                 req.n_prompt)
        except Exception as e:  # noqa: BLE001 — e.g. a model without a vocabulary: this request ends, not the server
            self._fail([req], RequestFailed(500, f"cannot sample: {type(e).__name__}: {e}", "server_error"))
            return
        req.last_time = now
        with self._cv:
            self._prefilling.pop(req.slot, None)
            self._deliver(req, logits)
            if req.gen.finish_reason is None and not req.cancelled.is_set():
                self._running[req.slot] = req
                self._cap_ubatches()
            else:
                self._count("cancelled" if req.cancelled.is_set() else "ok")
                self._release(req)
            self._cv.notify_all()

    def _deliver(self, req: Request, logits: np.ndarray) -> Step:
        step = req.gen.push(logits)
        req.last_token = step.token
        if self.metrics is not None:
            self.metrics.generated_tokens.inc()
        if not req.cancelled.is_set():
            req.emit(step)
        return step

    def _step(self, batch: list[Request]) -> None:
        t0 = time.perf_counter()
        try:
            logits = self.eng.decode([r.slot for r in batch], [r.last_token for r in batch])
        except Exception as e:  # noqa: BLE001 — the step failed for every request in it
            self._fail(batch, RequestFailed(500, f"the engine failed: {type(e).__name__}: {e}", "server_error"))
            return
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.decode_tps.set(len(batch) / max(now - t0, 1e-9))
        with self._cv:
            for i, req in enumerate(batch):
                if req.cancelled.is_set():
                    continue  # released by the loop before the next step
                step = self._deliver(req, logits[i])
                if self.metrics is not None:
                    self.metrics.itl.observe(now - req.last_time)
                req.last_time = now
                if step.finish_reason is not None:
                    self._count("ok")
                    self._release(req)

    def _fail(self, reqs: list[Request], err: RequestFailed) -> None:
        with self._cv:
            for req in reqs:
                if req.cancelled.is_set():  # the failure is the cancellation itself, or nobody is listening
                    self._count("cancelled")
                else:
                    req.emit(err)
                    self._count("error")
                self._release(req)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(outcome).inc()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queued.set(len(self._queue))
            self.metrics.running.set(len(self._running) + len(self._prefilling))

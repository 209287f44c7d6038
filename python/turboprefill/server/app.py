"""app.py — the OpenAI-compatible HTTP API: a thin Starlette app over the Scheduler.

Owns the wire format: requests (JSON bodies, their fields mapped onto SamplingParams), responses (chat.completion,
text_completion, their SSE chunk forms ending in `data: [DONE]`), and errors in OpenAI's shape
{"error": {"message", "type", "param", "code"}} with 400 (malformed JSON, bad fields), 404 (unknown model or
path), 413 (prompt longer than the context), 429 (queue full), 500 (engine failure). Every exception a
request raises is answered; none reaches uvicorn, so the server never dies on a request.

Sampling fields: OpenAI's (temperature, top_p, max_tokens / max_completion_tokens, stop, seed, presence_penalty,
frequency_penalty, logprobs, top_logprobs; n must be 1; tools are refused) and llama.cpp's server extensions
(top_k, min_p, repeat_penalty, repeat_last_n, ignore_eos). Unknown fields are ignored, as OpenAI clients send many.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from .._optional import require
from ..sampling import SamplingError, SamplingParams, Step
from .metrics import Metrics
from .scheduler import QueueFull, Request, Scheduler

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat has none)
_CHAT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty", "repeat_last_n",
                "presence_penalty", "frequency_penalty", "stop", "ignore_eos")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def _error_body(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code or kind}}


def _sampling(body: dict, chat: bool) -> SamplingParams:
    kw: dict[str, Any] = {k: body[k] for k in _CHAT_FIELDS if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens")
    kw["max_tokens"] = max_tokens if max_tokens is not None or chat else COMPLETIONS_DEFAULT_MAX_TOKENS
    if body.get("stop_token_ids") is not None:
        if not isinstance(body["stop_token_ids"], list):
            raise SamplingError("stop_token_ids", "must be a list of token ids")
        kw["stop_token_ids"] = tuple(body["stop_token_ids"])
    lp = body.get("logprobs")
    if chat:
        if lp is not None:
            kw["logprobs"] = lp
        if body.get("top_logprobs") is not None:
            kw["top_logprobs"] = body["top_logprobs"]
    elif lp is not None:  # completions: logprobs is the number of alternatives, 0..5
        if isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 5:
            raise SamplingError("logprobs", f"must be an integer in [0, 5], got {lp!r}")
        kw["logprobs"], kw["top_logprobs"] = True, lp
    n = body.get("n", 1)
    if n != 1:
        raise SamplingError("n", f"only n=1 is served (one choice per request), got {n!r}")
    for key in ("tools", "functions"):  # refused rather than ignored: the answer would not be what was asked
        if body.get(key):
            raise SamplingError(key, "tool and function calling is not supported by this server")
    try:
        return SamplingParams(**kw)
    except SamplingError:
        raise
    except (TypeError, ValueError) as e:
        raise SamplingError("sampling", str(e)) from e


class Server:
    """The engine, its scheduler and what the routes need to answer."""

    def __init__(self, engine: Any, model_id: str, parallel: int = 1, max_queue: int = 64,
                 stream_ubatch: int | str = "auto"):
        self.eng = engine
        self.model_id = model_id
        self.metrics = Metrics(engine)
        self.scheduler = Scheduler(engine, parallel, max_queue, self.metrics, stream_ubatch)
        self.tok = engine.tokenizer
        self.n_ctx = self.scheduler.n_ctx
        self.created = int(time.time())

    # ---- request -> Request ------------------------------------------------------------------------
    async def _json(self, request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")
        if not isinstance(body.get("stream", False), bool):
            raise ApiError(400, "stream must be true or false", param="stream")
        return body

    def _check_prompt(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ApiError(400, "the prompt is empty (no tokens)", param="prompt")
        n_vocab = self.tok.n_vocab
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < n_vocab for t in ids):
            raise ApiError(400, f"prompt token ids must be integers in [0, {n_vocab})", param="prompt")
        if len(ids) >= self.n_ctx:
            raise ApiError(413, f"the prompt has {len(ids)} tokens but the context holds {self.n_ctx} (with room "
                           "for one generated token); shorten it or start the server with a larger --n-ctx",
                           param="messages", code="context_length_exceeded")
        return ids

    def chat_prompt(self, body: dict) -> tuple[list[int], list[Any]]:
        from ..chat import chat_tokens
        from ..multimodal import chat_images

        messages = body.get("messages")
        try:
            images = chat_images(messages) if isinstance(messages, list) else []
            if images and self.eng.vision is None:
                raise ApiError(400, "this request has images but the server has no vision tower: start it with "
                               "--mmproj", param="messages")
            ids = chat_tokens(self.eng, messages)
        except ApiError:
            raise
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from e
        return self._check_prompt(ids), images

    def completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            try:
                return self._check_prompt(self.tok.encode(prompt, add_bos=True, special=True))
            except ValueError as e:
                raise ApiError(400, str(e), param="prompt") from e
        if isinstance(prompt, list):
            return self._check_prompt(prompt)
        raise ApiError(400, "prompt must be a string, a list of token ids, or a one-element list of either",
                       param="prompt")

    # ---- running a request ---------------------------------------------------------------------------
    def submit(self, ids: list[int], params: SamplingParams, images=()) -> tuple[Request, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def emit(ev):
            try:
                loop.call_soon_threadsafe(q.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        req = Request(ids, params, emit, images=images)
        try:
            self.scheduler.submit(req)
        except QueueFull as e:
            raise ApiError(429, str(e), kind="server_busy", code="queue_full") from e
        return req, q

    @staticmethod
    async def next_event(q: asyncio.Queue, request) -> Any:
        """The request's next Step / RequestFailed, or None when the client has gone away meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(q.get(), 0.2)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None

    def logprobs_chat(self, step: Step) -> dict | None:
        if step.logprob is None:
            return None

        def entry(tok: int, lp: float) -> dict:
            b = self.tok.piece(tok, special=True)
            return {"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b)}

        lp = step.logprob
        return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}]}

    def usage(self, req: Request) -> dict:
        n = len(req.gen.tokens) if req.gen else 0
        return {"prompt_tokens": req.n_prompt, "completion_tokens": n, "total_tokens": req.n_prompt + n}


def create_app(engine: Any, model_id: str, parallel: int = 1, max_queue: int = 64,
               stream_ubatch: int | str = "auto"):
    """The Starlette app serving `engine` as `model_id` with `parallel` slots; app.state.server is the Server.
    stream_ubatch: the cap on prompt ubatches while answers stream ("auto", a token count, or 0: none;
    server/scheduler.py)."""
    require("starlette", "turboprefill serve")
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from .openai_format import chat_handler, completions_handler

    srv = Server(engine, model_id, parallel, max_queue, stream_ubatch)

    def error(status, message, kind, param=None, code=None):
        return JSONResponse(_error_body(status, message, kind, param, code), status_code=status)

    def guarded(handler):
        async def run(request):
            try:
                return await handler(request)
            except ApiError as e:
                return error(e.status, e.message, e.kind, e.param, e.code)
            except SamplingError as e:
                return error(400, str(e), "invalid_request_error", e.field)
            except Exception as e:  # noqa: BLE001 — answer, never let a request take the server down
                return error(500, f"internal error: {type(e).__name__}: {e}", "server_error")
        return run

    async def health(request):
        queued, running = srv.scheduler.depth
        return JSONResponse({"status": "ok", "model": model_id, "slots": parallel, "queued": queued,
                             "running": running})

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": srv.created,
                                                         "owned_by": "turboprefill"}]})

    async def metrics(request):
        body, ctype = srv.metrics.render()
        return Response(body, media_type=ctype)

    async def chat(request):
        return await chat_handler(srv, request, JSONResponse, StreamingResponse, error)

    async def completions(request):
        return await completions_handler(srv, request, JSONResponse, StreamingResponse, error)

    async def http_error(request, exc):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)

    routes = [
        Route("/health", guarded(health), methods=["GET"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/metrics", guarded(metrics), methods=["GET"]),
        Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        srv.scheduler.close()

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.server = srv
    return app


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"

"""openai_format.py — /v1/chat/completions and /v1/completions: one request in, OpenAI's objects out.

Both endpoints share one flow: parse and validate (400/404/413 before anything is queued), submit (429 when the
queue is full), then wait for the first event: a failure before the first token (an image that cannot be read,
an engine error) still gets its HTTP status. After that a streaming request sends one SSE chunk per token that
has text (and a last chunk with finish_reason, then `data: [DONE]`); a non-streaming one collects the text. A
client that goes away is noticed within 0.2 s (or by Starlette's disconnect listener while streaming) and its
request is cancelled, which frees its slot before the next decode step.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..sampling import Step
from .app import Server, _sampling, request_id
from .scheduler import RequestFailed


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _start(srv: Server, request, chat: bool):
    body = await srv._json(request)
    params = _sampling(body, chat)
    if chat:
        ids, images = srv.chat_prompt(body)
    else:
        ids, images = srv.completion_prompt(body), []
    req, q = srv.submit(ids, params, images)
    first = await srv.next_event(q, request)
    return body, req, q, first


async def _collect(srv: Server, request, req, q, first) -> tuple[list[Step], RequestFailed | None]:
    steps: list[Step] = []
    ev = first
    while True:
        if ev is None:
            srv.scheduler.cancel(req)
            return steps, None
        if isinstance(ev, RequestFailed):
            return steps, ev
        steps.append(ev)
        if ev.finish_reason is not None:
            return steps, None
        ev = await srv.next_event(q, request)


def _fail_response(ev: RequestFailed, error):
    return error(ev.status, ev.message, ev.kind)


async def _stream(srv: Server, request, req, q, first, chunk, final_extra):
    """The SSE body: chunk(step) per token (those without text and logprobs are skipped), the finish chunk,
    the usage chunk when asked, [DONE]. An error after the first token is sent as an SSE error object."""
    done = False
    try:
        ev = first
        while ev is not None:
            if isinstance(ev, RequestFailed):
                yield _sse({"error": {"message": ev.message, "type": ev.kind, "param": None, "code": ev.kind}})
                break
            if ev.text or ev.logprob is not None or ev.finish_reason is not None:
                yield _sse(chunk(ev))
            if ev.finish_reason is not None:
                for extra in final_extra():
                    yield _sse(extra)
                yield b"data: [DONE]\n\n"
                done = True
                break
            ev = await q.get()
    finally:
        if not done:
            srv.scheduler.cancel(req)


async def chat_handler(srv: Server, request, JSONResponse, StreamingResponse, error):
    body, req, q, first = await _start(srv, request, chat=True)
    if isinstance(first, RequestFailed):
        return _fail_response(first, error)
    rid, created = request_id("chatcmpl"), int(time.time())
    base = {"id": rid, "created": created, "model": srv.model_id, "system_fingerprint": None}
    if body.get("stream"):
        sent_role = [False]

        def chunk(step: Step) -> dict:
            delta = {"content": step.text} if step.text else {}
            if not sent_role[0]:
                delta = {"role": "assistant", **delta}
                sent_role[0] = True
            return {**base, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "logprobs": srv.logprobs_chat(step), "finish_reason": step.finish_reason}]}

        def final_extra():
            opts = body.get("stream_options") or {}
            if isinstance(opts, dict) and opts.get("include_usage"):
                return [{**base, "object": "chat.completion.chunk", "choices": [], "usage": srv.usage(req)}]
            return []

        return StreamingResponse(_stream(srv, request, req, q, first, chunk, final_extra),
                                 media_type="text/event-stream")
    steps, failed = await _collect(srv, request, req, q, first)
    if failed is not None:
        return _fail_response(failed, error)
    if not steps or steps[-1].finish_reason is None:
        return JSONResponse({}, status_code=499)  # the client went away; nobody reads this
    lps = [srv.logprobs_chat(s)["content"][0] for s in steps if s.logprob is not None]
    return JSONResponse({**base, "object": "chat.completion", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": "".join(s.text for s in steps)},
        "logprobs": {"content": lps} if req.params.logprobs else None,
        "finish_reason": steps[-1].finish_reason}], "usage": srv.usage(req)})


def _completion_logprobs(srv: Server, steps: list[Step], offset: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for s in steps:
        if s.logprob is None:
            continue
        tokens.append(srv.tok.piece(s.token, special=True).decode("utf-8", "replace"))
        lps.append(s.logprob.logprob)
        tops.append({srv.tok.piece(t, special=True).decode("utf-8", "replace"): v for t, v in s.logprob.top})
        offsets.append(offset)
        offset += len(s.text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def completions_handler(srv: Server, request, JSONResponse, StreamingResponse, error):
    body, req, q, first = await _start(srv, request, chat=False)
    if isinstance(first, RequestFailed):
        return _fail_response(first, error)
    rid, created = request_id("cmpl"), int(time.time())
    base = {"id": rid, "created": created, "model": srv.model_id, "system_fingerprint": None}
    if body.get("stream"):
        offset = [0]

        def chunk(step: Step) -> dict:
            lp = _completion_logprobs(srv, [step], offset[0]) if step.logprob is not None else None
            offset[0] += len(step.text)
            return {**base, "object": "text_completion", "choices": [
                {"index": 0, "text": step.text, "logprobs": lp, "finish_reason": step.finish_reason}]}

        def final_extra():
            opts = body.get("stream_options") or {}
            if isinstance(opts, dict) and opts.get("include_usage"):
                return [{**base, "object": "text_completion", "choices": [], "usage": srv.usage(req)}]
            return []

        return StreamingResponse(_stream(srv, request, req, q, first, chunk, final_extra),
                                 media_type="text/event-stream")
    steps, failed = await _collect(srv, request, req, q, first)
    if failed is not None:
        return _fail_response(failed, error)
    if not steps or steps[-1].finish_reason is None:
        return JSONResponse({}, status_code=499)
    return JSONResponse({**base, "object": "text_completion", "choices": [{
        "index": 0, "text": "".join(s.text for s in steps),
        "logprobs": _completion_logprobs(srv, steps, 0) if req.params.logprobs else None,
        "finish_reason": steps[-1].finish_reason}], "usage": srv.usage(req)})

"""The OpenAI-compatible server (turboprefill.server) on loopback with SmolLM2 from PyPI: the `openai` client and
httpx against a uvicorn server in this process. Greedy answers equal Engine.chat on a second engine; concurrent
clients get what each gets alone; a client that disconnects frees its slot; every bad input gets its status and
OpenAI-shaped body, and the server answers /health afterwards."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("prometheus_client")

from turboprefill.sampling import log_softmax  # noqa: E402

pytestmark = pytest.mark.realmodel
MODEL_ID = "smollm2-test"


@contextlib.contextmanager
def serve(engine, parallel=1, max_queue=32):
    """A uvicorn server for `engine` on a free loopback port; yields its base URL."""
    from turboprefill.server import create_app

    app = create_app(engine, MODEL_ID, parallel=parallel, max_queue=max_queue)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


SLOTS = 4  # the main test server's --parallel: fewer than the 16 concurrent clients, so some queue


def _engine(path, n_ctx, parallel=1):
    from turboprefill import Engine

    return Engine(path, threads=2, n_ctx=n_ctx, n_seq=parallel)


@pytest.fixture(scope="module")
def ref_engine(smollm2_path):
    eng = _engine(smollm2_path, 512)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(smollm2_path):
    eng = _engine(smollm2_path, 512, SLOTS)
    with serve(eng, parallel=SLOTS) as url:
        yield url
    eng.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(n):
    return [{"role": "user", "content": f"Count from {n} to {n + 3}."}]


def test_models_health_metrics(server):
    r = httpx.get(server + "/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL_ID
    h = httpx.get(server + "/health").json()
    assert h["status"] == "ok" and h["slots"] == SLOTS
    m = httpx.get(server + "/metrics").text
    for name in ("tp_time_to_first_token_seconds", "tp_inter_token_latency_seconds", "tp_prefill_tokens_per_second",
                 "tp_decode_tokens_per_second", "tp_requests_queued", "tp_requests_running"):
        assert name in m
    assert 'tp_stage_ubatches_in_flight{stage="0"} 0.0' in m  # idle
    assert "tp_prompt_ubatch_cap 0.0" in m  # no answer streams


def test_chat_greedy_equals_engine_chat_streaming_or_not(client, ref_engine):
    msgs = ask(1)
    want = ref_engine.chat(msgs, temperature=0, max_tokens=24)
    r = client.chat.completions.create(model=MODEL_ID, messages=msgs, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 24
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=msgs, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want and len(chunks) > 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_completions_streaming_and_logprobs(client, ref_engine):
    prompt = "The capital of France is"
    ids = ref_engine.tokenize(prompt)
    ref_engine.reset()
    want = ref_engine.detokenize(ref_engine.generate(ids, max_new_tokens=8, stop_at_eos=False))
    r = client.completions.create(model=MODEL_ID, prompt=prompt, temperature=0, max_tokens=8, logprobs=3)
    c = r.choices[0]
    assert c.text == want and c.finish_reason == "length" and r.usage.prompt_tokens == len(ids)
    ref_engine.reset()
    lp = log_softmax(ref_engine.prefill(ids).logits)  # the first generated token's distribution
    assert len(c.logprobs.tokens) == 8 and "".join(c.logprobs.tokens) == want
    top = c.logprobs.top_logprobs[0]
    assert list(top.values()) == pytest.approx(sorted(lp)[::-1][:3], abs=1e-9)
    assert c.logprobs.token_logprobs[0] == pytest.approx(lp.max(), abs=1e-9)  # greedy: the best one
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=MODEL_ID, prompt=prompt, temperature=0, max_tokens=8, stream=True))
    assert streamed == want


def test_sampled_requests_repeat_with_a_seed(client):
    kw = dict(model=MODEL_ID, messages=ask(5), temperature=1.0, top_p=0.9, seed=123, max_tokens=16)
    a = client.chat.completions.create(**kw).choices[0].message.content
    assert a == client.chat.completions.create(**kw).choices[0].message.content


def test_stop_strings_are_not_streamed(client, ref_engine):
    msgs = ask(1)
    full = ref_engine.chat(msgs, temperature=0, max_tokens=24)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=msgs, temperature=0, max_tokens=24,
                                                 stop=[stop], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full[: full.index(stop)] and chunks[-1].choices[0].finish_reason == "stop"


def test_requests_in_all_slots_at_once_get_what_each_gets_alone(client):
    def one(n):
        r = client.completions.create(model=MODEL_ID, prompt=f"List {n} fruits:", temperature=0, max_tokens=6)
        return r.choices[0].text

    alone = [one(n) for n in range(SLOTS)]
    with ThreadPoolExecutor(SLOTS) as pool:
        assert list(pool.map(one, range(SLOTS))) == alone


@pytest.mark.slow
def test_concurrent_clients_get_what_each_gets_alone(client):
    def one(n):
        r = client.chat.completions.create(model=MODEL_ID, messages=ask(n), temperature=0, max_tokens=8)
        return r.choices[0].message.content

    alone = [one(n) for n in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, range(16)))
    assert together == alone and len(set(alone)) > 1


def _running(url):
    return httpx.get(url + "/health").json()["running"]


def test_disconnect_mid_stream_frees_the_slot(server, client):
    body = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", server + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen == 3:
                    break
        # the connection is closed here, mid-stream
    deadline = time.time() + 10
    while _running(server) and time.time() < deadline:
        time.sleep(0.05)
    assert _running(server) == 0, "the abandoned request still holds its slot"
    r = client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert 'tp_requests_total{outcome="cancelled"}' in httpx.get(server + "/metrics").text


@pytest.fixture(scope="module")
def small_server(smollm2_path):
    """One slot, one queue place, a 256-token context: for 413 and 429; its engine can be made to fail."""
    eng = _engine(smollm2_path, 256)
    with serve(eng, parallel=1, max_queue=1) as url:
        yield url, eng
    eng.close()


def _err(r, status, kind=None, param=None):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) >= {"message", "type", "code"} and e["message"]
    if kind:
        assert e["type"] == kind
    if param:
        assert e["param"] == param
    return e


def test_bad_inputs_get_openai_errors(small_server):
    url, _ = small_server
    chat = url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    _err(httpx.post(chat, content=b"{not json"), 400, "invalid_request_error")
    _err(httpx.post(chat, json=[1, 2]), 400, "invalid_request_error")
    _err(httpx.post(chat, json={"messages": msgs, "temperature": 3}), 400, param="temperature")
    _err(httpx.post(chat, json={"messages": msgs, "top_p": "x"}), 400, param="top_p")
    _err(httpx.post(chat, json={"messages": msgs, "max_tokens": 0}), 400, param="max_tokens")
    _err(httpx.post(chat, json={"messages": msgs, "n": 2}), 400, param="n")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    _err(httpx.post(chat, json={"messages": msgs, "tools": [tool]}), 400, param="tools")
    _err(httpx.post(chat, json={"messages": msgs, "stream": "yes"}), 400, param="stream")
    _err(httpx.post(chat, json={"messages": "hi"}), 400, param="messages")
    _err(httpx.post(chat, json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x.png"}}]}]}), 400, param="messages")  # no --mmproj
    _err(httpx.post(url + "/v1/completions", json={"prompt": [1, 2, 10 ** 9]}), 400, param="prompt")
    _err(httpx.post(url + "/v1/completions", json={"prompt": ""}), 400, param="prompt")
    e = _err(httpx.post(chat, json={"model": "gpt-4", "messages": msgs}), 404, param="model")
    assert e["code"] == "model_not_found"
    _err(httpx.get(url + "/v1/nothing"), 404, "not_found")
    e = _err(httpx.post(chat, json={"messages": [{"role": "user", "content": "word " * 300}]}), 413)
    assert e["code"] == "context_length_exceeded"
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_full_queue_is_429(small_server):
    url, _ = small_server
    # it holds the slot until the test lets go: up to the 256-token context, tens of seconds
    long = {"model": MODEL_ID, "prompt": "Once", "max_tokens": 250, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120) as h, h.stream("POST", url + "/v1/completions", json=long) as r:
        lines = r.iter_lines()  # kept referenced: a collected line iterator closes the connection
        while not next(lines).startswith("data: "):  # the first token: it holds the only slot
            pass
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(httpx.post, url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                                 timeout=120)
            deadline = time.time() + 10
            while httpx.get(url + "/health").json()["queued"] < 1 and time.time() < deadline:
                time.sleep(0.02)
            assert httpx.get(url + "/health").json()["queued"] == 1
            e = _err(httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}), 429, "server_busy")
            assert "--max-queue 1" in e["message"]
            r.close()  # the streaming client goes away: the queued request gets the slot
            assert queued.result().status_code == 200


def test_engine_failure_is_500_and_the_server_lives(small_server):
    url, eng = small_server
    eng._inject_fault(0)
    try:
        e = _err(httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60), 500,
                 "server_error")
        assert "injected fault" in e["message"]
    finally:
        eng._inject_fault(-1)
    assert httpx.get(url + "/health").json() == {**httpx.get(url + "/health").json(), "status": "ok", "running": 0}
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and json.loads(r.text)["choices"][0]["finish_reason"] == "length"


def test_disconnect_during_prefill_cancels_it(smollm2_path):
    """With one slot the prefill itself is cancelled: the prompt is never counted as prefilled."""
    eng = _engine(smollm2_path, 2048)
    try:
        with serve(eng) as url:
            prompt = list(range(1000, 2900))  # 1900 tokens: seconds of prefill on a CPU
            with pytest.raises(httpx.TimeoutException):
                httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=0.3)
            deadline = time.time() + 30
            while _running(url) and time.time() < deadline:
                time.sleep(0.02)
            metrics = httpx.get(url + "/metrics").text
            assert 'tp_requests_total{outcome="cancelled"} 1.0' in metrics
            assert "tp_prompt_tokens_total 0.0" in metrics
            r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
            assert r.status_code == 200
    finally:
        eng.close()


def test_image_url_as_data_url(tmp_path):
    """--mmproj: a chat with an image_url part (base64 data: URL) answers what Engine.chat answers for the same
    image given as a file (synthetic Qwen2-VL pair, as tests/test_vlm.py)."""
    import base64
    import io

    from PIL import Image
    from test_vlm import FX, META  # the committed synthetic pair's recipe

    from turboprefill import Engine
    from turboprefill.writer_vl import write_pair

    tp, mp = tmp_path / "qwen2vl.gguf", tmp_path / "mmproj.gguf"
    write_pair(tp, mp, text=META["text_kwargs"], vision=META["vision_kwargs"])
    png = io.BytesIO()
    Image.fromarray(FX.make_image(**META["image"])).save(png, format="PNG")
    (tmp_path / "img.png").write_bytes(png.getvalue())
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    with Engine(tp, mmproj=mp, threads=2, n_ctx=1024) as ref:
        want = ref.chat(FX.messages(str(tmp_path / "img.png")), temperature=0, max_tokens=6)
    with Engine(tp, mmproj=mp, threads=2, n_ctx=1024, n_seq=2) as eng, serve(eng, parallel=2) as srv:
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": FX.messages(None)[0]["content"][1]["text"]}]}]
        r = httpx.post(srv + "/v1/chat/completions", json={"messages": msgs, "temperature": 0, "max_tokens": 6},
                       timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want
        assert r.json()["usage"]["prompt_tokens"] > 54  # the image's 54 rows count as prompt positions
        bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
        _err(httpx.post(srv + "/v1/chat/completions", json={"messages": bad}, timeout=60), 400)
        assert httpx.get(srv + "/health").json()["status"] == "ok"


def test_cli_serve_rejects_bad_counts(smollm2_path, capsys):
    from turboprefill.cli import main

    assert main(["serve", str(smollm2_path), "--parallel", "0"]) == 2
    assert "--parallel must be >= 1" in capsys.readouterr().err

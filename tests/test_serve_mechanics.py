"""`adaspec serve` mechanics on a tiny random model over the real tokenizer: the engine thread's continuous
batch (join mid-stream, cancel, bounded queue, engine faults), incremental text with stop strings, and the
HTTP layer's answers to every kind of bad request -- in process, in seconds."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from adaspec.core.drafters.prompt_lookup import PromptLookupDrafter
from adaspec.core.engine.engine import RequestSpec, SpecEngine
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.serve.app import create_app
from adaspec.core.serve.loop import Overloaded, ServingLoop
from adaspec.core.serve.settings import ServeSettings
from adaspec.core.serve.text import TextStream
from adaspec.core.step import FixedPolicy
from tiny_models import make_tiny_chat_target

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chat_target():
    return make_tiny_chat_target()


def _wait(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- text ------------------------------------------------------------------------------------------------------
def test_text_stream_equals_the_decoded_text_and_cuts_at_the_first_stop_string(chat_target):
    tok = chat_target.tokenizer
    ids = tok("Hello world. STOP here. Then more text\n\nand more", add_special_tokens=False)["input_ids"]
    full = tok.decode(ids, skip_special_tokens=True)
    s = TextStream(tok)
    assert "".join(s.push(t) for t in ids) + s.finish() == full
    for stop in (["STOP"], ["\n\n"], ["zzz", ". Then"], ["Hello"]):
        s = TextStream(tok, stop)
        streamed = "".join(s.push(t) for t in ids) + s.finish()
        cut = min(full.find(x) for x in stop if x in full)
        assert s.stopped and streamed == full[:cut] == s.text, stop
        assert s.tokens_used < len(ids) or cut > 0
    s = TextStream(tok, ["never there"])
    assert "".join(s.push(t) for t in ids) + s.finish() == full and not s.stopped


def test_text_stream_holds_back_a_partial_stop_and_a_partial_character(chat_target):
    tok = chat_target.tokenizer
    ids = tok("ab xy", add_special_tokens=False)["input_ids"]
    s = TextStream(tok, ["xyz"])
    out = [s.push(t) for t in ids]
    assert "".join(out) + s.finish() == tok.decode(ids)  # "xy" was held (it could have become "xyz"), then let go
    emoji = tok("✓ done", add_special_tokens=False)["input_ids"]  # a multi-byte character over several tokens
    s = TextStream(tok)
    pieces = [s.push(t) for t in emoji]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == "✓ done"


# -- the engine thread -------------------------------------------------------------------------------------------
class Collect:
    def __init__(self):
        self.tokens, self.final, self.done = [], None, threading.Event()

    def __call__(self, p):
        self.tokens += p.tokens
        if p.finish_reason is not None:
            self.final = p
            self.done.set()


def _engine(target, batch=2):
    return SpecEngine(target, [PromptLookupDrafter(1, 3)], batch_size=batch)


def test_requests_join_a_running_batch_and_match_a_batch_run(chat_target):
    prompts = [chat_target.encode(p) for p in ("one two three", "a b c a b c", "count: 1 2 3 1 2 3", "hi")]
    params = SamplingParams(max_new_tokens=24)
    want = [r.output_tokens for r in _engine(chat_target).generate(prompts, params, FixedPolicy("prompt-lookup", 3))]
    loop = ServingLoop(_engine(chat_target), FixedPolicy("prompt-lookup", 3), max_waiting=8).start()
    try:
        got = [Collect() for _ in prompts]
        loop.submit(RequestSpec(prompts[0], "a"), params, got[0])
        _wait(lambda: len(got[0].tokens) >= 3)  # the first one is running: the others join it
        for i in (1, 2, 3):
            loop.submit(RequestSpec(prompts[i], f"r{i}"), params, got[i])
        for c in got:
            assert c.done.wait(30)
        assert [c.tokens for c in got] == want
        assert [c.final.result.output_tokens for c in got] == want and all(c.final.finish_reason for c in got)
    finally:
        loop.stop()


def test_cancel_retires_a_running_request_and_others_go_on(chat_target):
    ids = chat_target.encode("tell me a long story")
    loop = ServingLoop(_engine(chat_target), FixedPolicy(None, 0)).start()
    try:
        long_, short = Collect(), Collect()
        loop.submit(RequestSpec(ids, "long"), SamplingParams(max_new_tokens=400), long_)
        loop.submit(RequestSpec(ids, "short"), SamplingParams(max_new_tokens=20), short)
        _wait(lambda: len(long_.tokens) >= 5)
        loop.cancel("long")
        assert long_.done.wait(10) and long_.final.finish_reason == "cancelled" and len(long_.tokens) < 400
        assert short.done.wait(10) and len(short.tokens) == 20
        _wait(lambda: loop.running == 0 and loop.waiting == 0)
    finally:
        loop.stop()


def test_a_full_queue_refuses_at_once(chat_target):
    loop = ServingLoop(_engine(chat_target, batch=1), FixedPolicy(None, 0), max_waiting=2)  # not started: nothing runs
    ids = chat_target.encode("x")
    loop.submit(RequestSpec(ids, "a"), SamplingParams(max_new_tokens=4), Collect())
    loop.submit(RequestSpec(ids, "b"), SamplingParams(max_new_tokens=4), Collect())
    t0 = time.monotonic()
    with pytest.raises(Overloaded):
        loop.submit(RequestSpec(ids, "c"), SamplingParams(max_new_tokens=4), Collect())
    assert time.monotonic() - t0 < 0.1
    loop.start()
    try:
        _wait(lambda: loop.waiting == 0 and loop.running == 0)
        loop.submit(RequestSpec(ids, "d"), SamplingParams(max_new_tokens=4), Collect())  # room again
    finally:
        loop.stop()


def test_an_engine_fault_fails_the_requests_in_flight_not_the_server(chat_target, monkeypatch):
    engine = _engine(chat_target)
    loop = ServingLoop(engine, FixedPolicy(None, 0)).start()
    try:
        ids = chat_target.encode("x")
        real = engine._forward
        monkeypatch.setattr(engine, "_forward", lambda *a: (_ for _ in ()).throw(RuntimeError("device fault")))
        bad = Collect()
        loop.submit(RequestSpec(ids, "bad"), SamplingParams(max_new_tokens=8), bad)
        assert bad.done.wait(10) and bad.final.finish_reason == "error" and "device fault" in bad.final.error
        monkeypatch.setattr(engine, "_forward", real)
        ok = Collect()
        loop.submit(RequestSpec(ids, "ok"), SamplingParams(max_new_tokens=8), ok)
        assert ok.done.wait(10) and len(ok.tokens) == 8 and loop.alive and loop.errors == 1
    finally:
        loop.stop()


# -- HTTP ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(chat_target):
    engine = _engine(chat_target)
    loop = ServingLoop(engine, FixedPolicy("prompt-lookup", 3), max_waiting=4).start()
    settings = ServeSettings(max_body_bytes=4096, default_max_tokens=16)
    with TestClient(create_app(loop, chat_target, settings, CollectorRegistry(), "prompt-lookup")) as client:
        yield client, loop
    loop.stop()


def chat_body(**kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 12,
            "temperature": 0, **kw}


def _sse(text):
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_and_completion_streaming_equals_non_streaming(api):
    client, _ = api
    for path, body, pick in (
        ("/v1/chat/completions", chat_body(), lambda c: c["delta"].get("content", "")),
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}, lambda c: c["text"]),
    ):
        full = client.post(path, json=body)
        assert full.status_code == 200, full.text
        choice = full.json()["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        assert full.json()["usage"]["completion_tokens"] == 12 and full.json()["adaspec"]["target_forwards"] >= 1
        streamed = client.post(path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
        assert streamed.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(streamed.text)
        assert "".join(pick(c["choices"][0]) for c in chunks if c["choices"]) == text
        assert chunks[-1]["usage"]["completion_tokens"] == 12  # the usage chunk comes last
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == choice["finish_reason"]


def test_stop_strings_end_the_text_identically_streamed_or_not(api):
    client, _ = api
    free = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 24, "temperature": 0}).json()
    text = free["choices"][0]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "the tiny model's text has no usable middle"
    body = {"prompt": "Once", "max_tokens": 24, "temperature": 0, "stop": [stop]}
    cut = client.post("/v1/completions", json=body).json()
    assert cut["choices"][0]["text"] == text[: text.find(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    chunks = _sse(client.post("/v1/completions", json={**body, "stream": True}).text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["choices"][0]["text"]


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"max_tokens": 4}).encode(), 400, "messages"),
    (json.dumps(chat_body(temperature=-1)).encode(), 400, "temperature"),
    (json.dumps(chat_body(top_p=0)).encode(), 400, "top_p"),
    (json.dumps(chat_body(max_tokens=0)).encode(), 400, "max_tokens"),
    (json.dumps(chat_body(n=2)).encode(), 400, "n"),
    (json.dumps(chat_body(logprobs=True)).encode(), 400, "logprobs"),
    (json.dumps(chat_body(presence_penalty=0.5)).encode(), 400, "penalties"),
    (json.dumps(chat_body(stop=[""])).encode(), 400, "stop"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), 400, "text"),
    (json.dumps({"messages": [{"role": "user", "content": "   "}]}).encode(), 400, "empty"),
    (json.dumps(chat_body(messages=[{"role": "user", "content": "word " * 800}])).encode(), 413, "body"),
])
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(api, body, status, needle):
    client, _ = api
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]
    assert client.get("/health").status_code == 200
    assert client.post("/v1/chat/completions", json=chat_body(max_tokens=2)).status_code == 200


def test_a_prompt_over_the_context_is_a_400_with_its_code(api, chat_target):
    big = " ".join(["hello"] * (chat_target.context_len + 10))
    with TestClient(create_app(api[1], chat_target, ServeSettings(), CollectorRegistry(), "x")) as client:
        for path, body in (("/v1/completions", {"prompt": big}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]})):
            r = client.post(path, json={**body, "max_tokens": 4})
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert client.get("/health").status_code == 200


def test_a_full_queue_is_a_503_with_retry_after(chat_target):
    loop = ServingLoop(_engine(chat_target, batch=1), FixedPolicy(None, 0), max_waiting=1)  # never started
    with TestClient(create_app(loop, chat_target, ServeSettings(), CollectorRegistry(), "none")) as client:
        loop.submit(RequestSpec(chat_target.encode("x"), "held"), SamplingParams(max_new_tokens=2), Collect())
        r = client.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "server_overloaded"
        assert client.get("/health").status_code == 503  # and says the engine is not running


def test_models_health_and_metrics(api):
    client, _ = api
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-chat"
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/chat/completions", json=chat_body())
    text = client.get("/metrics").text
    assert 'adaspec_http_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert "adaspec_http_request_seconds_bucket" in text and "adaspec_http_time_to_first_token_seconds" in text

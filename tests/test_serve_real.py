"""`adaspec serve` end to end: the real model behind the OpenAI API with ATLAS and the sidecar process it
starts, driven by the `openai` client over loopback. Greedy answers equal `adaspec generate`'s; streamed text
equals non-streamed text; concurrent requests share the batch; a client that leaves is retired; bad requests
are 4xx and the server stays up; a load check streams for a while with no failure and flat memory; and
stopping the server stops its sidecar."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from adaspec.core.bench.serve_load import print_report, rss_mb, run_load
from sidecar_helpers import child_pids

pytestmark = pytest.mark.model

PROMPT = "Write a short poem about the sea."
LOAD_SECONDS = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "adaspec.core.cli", "serve", "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"server exited: {log.read_text()[-2000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"server not healthy: {log.read_text()[-2000:]}"
        time.sleep(0.5)
    yield url, proc, log
    sidecars = [c for c in child_pids(proc.pid) if b"adaspec.sidecar" in open(f"/proc/{c}/cmdline", "rb").read()]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()[-2000:]
    for c in sidecars:  # the sidecar it started is stopped with it
        deadline = time.monotonic() + 20
        while not _gone(c):
            assert time.monotonic() < deadline, "the server's sidecar outlived it"
            time.sleep(0.1)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"  # exited, not yet reaped
    except OSError:
        return True


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0)


def test_greedy_chat_is_what_adaspec_generate_says(client):
    gen = subprocess.run([sys.executable, "-m", "adaspec.core.cli", "generate", PROMPT, "--max-new-tokens", "32",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    want = json.loads(gen.stdout)
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=32, temperature=0)
    assert r.choices[0].message.content == want["text"]
    assert r.usage.completion_tokens == want["new_tokens"] and r.usage.prompt_tokens == want["prompt_tokens"]
    assert r.model_extra["adaspec"]["policy"] == "atlas" and r.model_extra["adaspec"]["target_forwards"] >= 1


def test_streamed_text_equals_the_non_streamed_text(client):
    msgs = [{"role": "user", "content": "List three colours."}]
    full = client.chat.completions.create(model="m", messages=msgs, max_tokens=24, temperature=0)
    parts = [c.choices[0].delta.content or "" for c in
             client.chat.completions.create(model="m", messages=msgs, max_tokens=24, temperature=0, stream=True)
             if c.choices]
    assert "".join(parts) == full.choices[0].message.content and len(parts) > 2
    comp = client.completions.create(model="m", prompt="def fibonacci(n):", max_tokens=24, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt="def fibonacci(n):", max_tokens=24, temperature=0, stream=True))
    assert streamed == comp.choices[0].text and comp.usage.completion_tokens == 24


def test_eight_concurrent_requests_complete_in_shared_batches(client, server):
    results: dict[int, str] = {}

    def one(i: int) -> None:
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"Name a city, #{i}."}],
                                           max_tokens=16, temperature=0)
        results[i] = r.choices[0].finish_reason

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(results) == list(range(8))
    metrics = httpx.get(f"{server[0]}/metrics").text
    single = _sample(metrics, 'adaspec_engine_batch_size_bucket{le="1.5"}')
    total = _sample(metrics, "adaspec_engine_batch_size_count")
    assert total > single, "no step ever ran more than one request"
    assert _sample(metrics, 'adaspec_http_request_seconds_count{endpoint="/v1/chat/completions"}') >= 8
    assert "adaspec_engine_accepted_tokens_total" in metrics and "adaspec_sidecar_link_up" in metrics


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise AssertionError(f"{name} not in /metrics")


def test_a_client_that_goes_away_is_retired_from_the_batch(server):
    url = server[0]
    body = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 400,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.monotonic() + 20
    while httpx.get(f"{url}/health").json()["running"] != 0:
        assert time.monotonic() < deadline, "the abandoned request is still decoding"
        time.sleep(0.2)


def test_bad_requests_are_4xx_and_the_server_stays_up(server, client):
    url = server[0]
    assert httpx.post(f"{url}/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"}
                      ).status_code == 400
    big = {"messages": [{"role": "user", "content": "x " * 600_000}]}
    assert httpx.post(f"{url}/v1/chat/completions", json=big).status_code == 413
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "word " * 9000, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0).choices[0].message.content is not None


def test_load_check_no_failures_and_flat_memory(server):
    url, proc, _ = server
    asyncio.run(run_load(url, concurrency=4, seconds=5, max_tokens=24))  # warm: allocator and caches settle
    before = rss_mb(proc.pid)
    report = asyncio.run(run_load(url, concurrency=4, seconds=LOAD_SECONDS, max_tokens=32, pid=proc.pid))
    print_report(report)
    assert report.failed == 0, report.errors
    assert report.requests >= 8 and report.tokens_per_s > 0
    assert report.rss_end_mb - before < 0.1 * before, f"server memory grew {before:.0f} -> {report.rss_end_mb:.0f} MB"

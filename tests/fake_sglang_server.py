"""A stand-in for `python -m sglang.launch_server` in the GPU-validation tests (CPU).

It takes SGLang's flags and serves what sglang_ext/validate.py reads, in SGLang 0.5.17's shapes: /health,
/generate (`text`, `output_ids`, `meta_info` with completion/prompt tokens and, for speculative servers,
`spec_verify_ct`/`spec_accept_length`; `prompt_token_ids` on request; `output_top_logprobs` as
`[logprob, id, null]` lists), /metrics (adaspec_ series for ATLAS next to SGLang-style ones), and a log on
stdout with the lines the harness greps (server_args, graph captures, ATLAS worker and state lines).

A "token" is a word: prompt ids are crc32 hashes of its words, greedy output ids a fixed function of the
prompt ids, so every server gives the same greedy output unless told otherwise:

* FAKE_DIVERGE=ALGO[,ALGO]  these algorithms' greedy output leaves the reference at token FAKE_DIVERGE_AT
  (default 5) for prompts containing " 3 " (the diverging token is the reference's +1);
* FAKE_FLAKY=1  no-spec's own output of that prompt leaves the reference from its second greedy serving on;
* FAKE_TIE_MARGIN  the top-2 logprob margin a logprob request reports (default 3.0, no tie);
* FAKE_CRASH=ALGO  exit 3 (after a traceback) before becoming healthy; ALGO@generate: on the first stream
  request instead;
* FAKE_NO_SWITCH_METRIC=1  ATLAS exports no adaspec_sglang_state_switches_total (the harness counts log lines);
* FAKE_CHILD=1  start a child process in the server's process group (as SGLang's schedulers are);
* FAKE_ENV_DIR=DIR  write the server's environment and child pid to DIR/<algo>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--host", default="127.0.0.1")
ap.add_argument("--speculative-algorithm", default=None)
ap.add_argument("--disable-overlap-schedule", action="store_true")
args, _ = ap.parse_known_args()
algo = args.speculative_algorithm or "NONE"
crash = set(os.environ.get("FAKE_CRASH", "").split(","))
diverge = set(os.environ.get("FAKE_DIVERGE", "").split(","))
DIVERGE_AT = int(os.environ.get("FAKE_DIVERGE_AT", "5"))
FORWARDS = {"NONE": 1.0, "EAGLE3": 0.5, "NGRAM": 0.8, "ATLAS": 0.4}
VOCAB = 50000


_out = threading.Lock()


def say(line: str) -> None:
    """One whole line per write (handler threads log concurrently, as SGLang's processes do)."""
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


child = None
if os.environ.get("FAKE_CHILD"):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
if os.environ.get("FAKE_ENV_DIR"):
    with open(os.path.join(os.environ["FAKE_ENV_DIR"], f"{algo}.json"), "w") as f:
        json.dump({"env": dict(os.environ), "argv": sys.argv, "child": child.pid if child else None}, f)

overlap_off = args.disable_overlap_schedule or algo == "ATLAS"
say(f"server_args=ServerArgs(model_path='fake', speculative_algorithm={algo!r}, "
    f"disable_overlap_schedule={overlap_off})")
say("Capture target verify CUDA graph begin. backend=full")
if algo in crash:
    say("Traceback (most recent call last):\n  File \"fake\", line 1\nRuntimeError: fake capture failure")
    sys.exit(3)
say("Capture target verify CUDA graph end. elapsed=0.01 s, mem usage=0.01 GB")
if algo == "ATLAS":
    say("adaspec ATLAS worker (sglang 0.5.17): drafters static,suffix,adaptive, candidate steps "
        f"{os.environ.get('ADASPEC_SGLANG_CANDIDATE_STEPS')}")
    for steps in os.environ.get("ADASPEC_SGLANG_CANDIDATE_STEPS", "").split(",")[:-1]:
        say(f"Built adaptive runtime state steps={steps}: elapsed=0.01s, mem=0.00GB")

lock = threading.Lock()
served: dict[tuple[int, ...], int] = {}  # prompt ids -> greedy servings so far
switches = 0


def prompt_ids(text: str) -> list[int]:
    return [zlib.crc32(w.encode()) % VOCAB for w in text.split()]


def reference(pids: list[int], n: int) -> list[int]:
    seed = sum(pids) % 997
    return [(seed * 31 + j * 17) % VOCAB for j in range(n)]


def greedy(pids: list[int], text: str, n: int) -> list[int]:
    with lock:
        served[tuple(pids)] = times = served.get(tuple(pids), 0) + 1
    out = reference(pids, n)
    moved = algo in diverge or (algo == "NONE" and os.environ.get("FAKE_FLAKY") and times >= 2)
    if moved and " 3 " in text:
        out[DIVERGE_AT:] = [(t + 1) % VOCAB for t in out[DIVERGE_AT:]]
    return out


def top2(input_ids: list[int]) -> list[list]:
    """No-spec's top-2 at the next position of a served prompt's reference continuation."""
    key = max((k for k in served if tuple(input_ids[:len(k)]) == k), key=len)
    nxt = reference(list(key), len(input_ids) - len(key) + 1)[-1]
    margin = float(os.environ.get("FAKE_TIE_MARGIN", "3.0"))
    return [[-0.5, nxt, None], [-0.5 - margin, (nxt + 1) % VOCAB, None]]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):  # quiet
        pass

    def _send(self, code: int, body, ctype: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self._send(200, {})
        elif self.path == "/metrics":
            self._send(200, metrics(), "text/plain")
        else:
            self._send(404, {})

    def do_POST(self):
        global switches
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        sp = req["sampling_params"]
        n = sp["max_new_tokens"]
        if f"{algo}@generate" in crash and served:  # the first (single greedy) request passes
            os._exit(3)
        if "input_ids" in req:  # the harness's logprob probe
            pids, text = list(req["input_ids"]), None
        else:
            pids, text = prompt_ids(req["text"]), req["text"]
        if sp["temperature"] > 0:
            ids = [random.randrange(VOCAB) for _ in range(n)]
        elif text is None:
            ids = [top2(pids)[0][1]]
        else:
            ids = greedy(pids, text, n)
        meta = {"id": "r", "finish_reason": {"type": "length", "length": n}, "prompt_tokens": len(pids),
                "completion_tokens": len(ids), "cached_tokens": 0}
        if algo != "NONE":
            verify = max(1, int(len(ids) * FORWARDS[algo]))
            meta.update(spec_verify_ct=verify, spec_accept_length=len(ids) / verify)
            if algo == "ATLAS":
                with lock:
                    switches += 2
                say("Switch adaptive runtime state: steps 8 -> 3, draft_tokens 9 -> 4")
                say("Switch adaptive runtime state: steps 3 -> 8, draft_tokens 4 -> 9")
        if req.get("return_logprob"):
            meta["output_top_logprobs"] = [top2(pids)] if text is None else [None] * len(ids)
        body = {"text": " ".join(f"w{t}" for t in ids), "output_ids": ids, "meta_info": meta}
        if req.get("return_prompt_token_ids"):
            body["prompt_token_ids"] = pids
        self._send(200, body)


def metrics() -> str:
    lines = ["# HELP sglang:num_running_reqs running", "sglang:num_running_reqs 0"]
    if algo == "ATLAS":
        lines += ['adaspec_sglang_batch_steps_bucket{le="3.0"} 5', "adaspec_sglang_glue_errors_total 0",
                  'adaspec_engine_forwards_total{drafter="static"} 12']
        if not os.environ.get("FAKE_NO_SWITCH_METRIC"):
            lines.append(f"adaspec_sglang_state_switches_total {switches}")
    return "\n".join(lines) + "\n"


ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()

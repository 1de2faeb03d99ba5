"""A stand-in for `python -m sglang.launch_server` in the GPU-validation tests (CPU): same flags, /health and
/generate with SGLang's response shape. Greedy output is a fixed function of the prompt; speculative modes
report fewer target forwards. FAKE_DIVERGE=ALGO makes that algorithm change one output (a lossless failure),
FAKE_CRASH=ALGO makes it exit before becoming healthy."""

from __future__ import annotations

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--host", default="127.0.0.1")
ap.add_argument("--speculative-algorithm", default=None)
args, _ = ap.parse_known_args()
algo = args.speculative_algorithm or "NONE"
if os.environ.get("FAKE_CRASH") == algo:
    sys.exit(3)
FORWARDS = {"NONE": 1.0, "EAGLE3": 0.5, "NGRAM": 0.8, "ATLAS": 0.4}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):  # quiet
        pass

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200 if self.path == "/health" else 404, {})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert req["sampling_params"]["temperature"] == 0.0
        n = req["sampling_params"]["max_new_tokens"]
        text = " ".join(req["text"].split()[::-1])[: 4 * n]
        if os.environ.get("FAKE_DIVERGE") == algo and " 3 " in req["text"]:  # one prompt of the stream
            text += "!"
        tokens = max(1, len(text.split()))
        verify = 0 if algo == "NONE" else max(1, int(tokens * FORWARDS[algo]))
        self._send(200, {"text": text, "meta_info": {"completion_tokens": tokens, "spec_verify_ct": verify}})


ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()

"""`adaspec serve`'s HTTP face: the OpenAI API over the reference engine's continuous batch.

Routes: POST /v1/chat/completions and /v1/completions (streaming as server-sent events ending in
`data: [DONE]`), GET /v1/models, /health, /metrics. A request is validated (schema, budget, context) before it
reaches the engine, joins the running batch through the `ServingLoop`, and its tokens come back as they are
verified; a client that disconnects has its request retired from the batch. Every failure is an OpenAI error
object with a 4xx/5xx status, and nothing a client sends can stop the server or another request: malformed
JSON (400), schema violations (400), bodies over the limit (413), prompts over the context (400), a full queue
(503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError

from adaspec.core.engine.engine import RequestSpec
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.errors import ContextLengthError, RequestError
from adaspec.core.metrics import ServeMetrics, per_registry
from adaspec.core.serve import protocol as P
from adaspec.core.serve.loop import Overloaded, Progress, ServingLoop
from adaspec.core.serve.settings import ServeSettings
from adaspec.core.serve.text import TextStream
from adaspec.core.target import Target

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.headers = status, P.error_body(message, type_, param, code), headers


def _validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
    return (f"{loc}: {first.get('msg')}" if loc else str(first.get("msg", "invalid request"))), loc


class _ClientGone(Exception):
    """The client disconnected before its request finished."""


class _Stream:
    """One request's channel from the engine thread to its handler (an asyncio queue on the server's loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()

    def emit(self, p: Progress) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, p)


def create_app(engine_loop: ServingLoop, target: Target, settings: ServeSettings, registry: CollectorRegistry,
               policy_name: str) -> FastAPI:
    """The ASGI app; `engine_loop` must be started (and stopped) by the caller."""
    app = FastAPI(title="adaspec", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = per_registry(ServeMetrics, registry)
    model_name = settings.served_model_name or target.name
    tokenizer = target.tokenizer

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Callable) -> Response:
        """Bodies over the limit are refused before they are read into memory."""
        t0 = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            response: Response = _error(413, f"request body over {settings.max_body_bytes} bytes", "invalid_request_error")
        else:
            response = await call_next(request)
        path = request.url.path
        endpoint = path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health") else "other"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        if endpoint.startswith("/v1/") and not isinstance(response, StreamingResponse):
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc)
        return JSONResponse(P.error_body(msg, param=param), status_code=400)

    @app.get("/health")
    async def health() -> Response:
        if not engine_loop.alive:
            return _error(503, "engine thread is not running", "server_error")
        return JSONResponse({"status": "ok", "running": engine_loop.running, "waiting": engine_loop.waiting})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        metrics.running.set(engine_loop.running)
        metrics.waiting.set(engine_loop.waiting)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "adaspec"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = await _parse(request, P.ChatCompletionRequest)
        return await _generate(request, req, _encode(lambda: target.encode_chat(req.conversation()), "messages"),
                               chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await _parse(request, P.CompletionRequest)
        return await _generate(request, req, _encode(lambda: target.encode(req.prompt, chat=False), "prompt"),
                               chat=False)

    def _encode(fn: Callable[[], list[int]], param: str) -> list[int]:
        """Tokenize a request's input; anything wrong with it (too long, empty, a template that refuses the
        conversation) is the client's 400, never a server error."""
        try:
            return fn()
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), param=param, code="context_length_exceeded") from None
        except Exception as exc:  # RequestError, ValueError, jinja's TemplateError, ...
            raise ApiError(400, f"{exc}"[:500] or type(exc).__name__, param=param) from None

    async def _parse(request: Request, model: type) -> Any:
        body = await request.body()
        if len(body) > settings.max_body_bytes:  # chunked bodies carry no content-length
            raise ApiError(413, f"request body over {settings.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"body is not valid JSON: {exc}"[:300]) from None
        if not isinstance(data, dict):
            raise ApiError(400, "body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            msg, param = _validation_message(exc)
            raise ApiError(400, msg, param=param) from None

    async def _generate(request: Request, req: Any, ids: list[int], chat: bool) -> Response:
        budget = req.budget() if chat else req.max_tokens
        budget = budget or settings.default_max_tokens
        room = target.context_len - len(ids)
        if room < 1:
            raise ApiError(400, f"prompt is {len(ids)} tokens; the model's context is {target.context_len}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        tenant = request.headers.get(settings.tenant_header) or req.user or "default"
        seed = req.seed if req.seed is not None else random.randrange(2**31)
        params = SamplingParams(max_new_tokens=min(budget, room), temperature=req.temperature, top_p=req.top_p,
                                seed=seed % (2**62))
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        stream = _Stream(asyncio.get_running_loop())
        try:
            engine_loop.submit(RequestSpec(ids, rid, tenant[:256]), params, stream.emit)
        except Overloaded as exc:
            raise ApiError(503, str(exc), "server_overloaded", headers={"Retry-After": "1"}) from None
        except RequestError as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded") from None
        text = TextStream(tokenizer, req.stops())
        t0 = time.perf_counter()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = _sse(request, rid, chat, stream, text, len(ids), include_usage, t0)
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        final = None
        first = True
        try:
            async for p, delta in _progress(stream, text, rid, request):
                if first and p.tokens:
                    metrics.ttft.observe(time.perf_counter() - t0)
                    first = False
                if p.finish_reason is not None:
                    final = p
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it; the request already left the batch
        except asyncio.CancelledError:
            engine_loop.cancel(rid)
            raise
        return _final_json(rid, chat, text, final, len(ids))

    async def _progress(stream: _Stream, text: TextStream, rid: str,
                        request: Request) -> AsyncIterator[tuple[Progress, str]]:
        """Each step's progress and the new final text. A stop string cancels the request in the engine, and
        so does a client that went away (checked while waiting, so a long generation is not run for nobody)."""
        while True:
            try:
                p: Progress = await asyncio.wait_for(stream.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine_loop.cancel(rid)
                    raise _ClientGone() from None
                continue
            if p.error is not None:
                raise ApiError(500, f"generation failed: {p.error}", "server_error")
            delta = ""
            for t in p.tokens:
                delta += text.push(t)
                if text.stopped:
                    engine_loop.cancel(rid)
                    break
            if p.finish_reason is not None and not text.stopped:
                delta += text.finish()
            yield p, delta
            if p.finish_reason is not None:
                return

    def _final_json(rid: str, chat: bool, text: TextStream, final: Progress | None, prompt_tokens: int) -> Response:
        result = final.result if final is not None else None
        finish = "stop" if text.stopped else P.FINISH.get(final.finish_reason if final else "length", "stop")
        n = text.tokens_used if text.stopped else (len(result.output_tokens) if result else text.tokens_used)
        metrics.tokens.inc(n)
        stats = P.spec_stats(result, policy_name)
        build = P.chat_response if chat else P.completion_response
        return JSONResponse(build(rid, model_name, text.text, finish, prompt_tokens, n, stats))

    async def _sse(request: Request, rid: str, chat: bool, stream: _Stream, text: TextStream, prompt_tokens: int,
                   include_usage: bool, t0: float) -> AsyncIterator[bytes]:
        created = int(time.time())
        first = True
        done = False
        try:
            if chat:
                yield _event(P.chat_chunk(rid, model_name, created, {"role": "assistant", "content": ""}, None))
            async for p, delta in _progress(stream, text, rid, request):
                if first and p.tokens:
                    metrics.ttft.observe(time.perf_counter() - t0)
                    first = False
                if delta:
                    yield _event(P.chat_chunk(rid, model_name, created, {"content": delta}, None) if chat
                                 else P.completion_chunk(rid, model_name, created, delta, None))
                if p.finish_reason is not None:
                    result = p.result
                    finish = "stop" if text.stopped else P.FINISH.get(p.finish_reason, "stop")
                    n = text.tokens_used if text.stopped else (len(result.output_tokens) if result else 0)
                    metrics.tokens.inc(n)
                    last = (P.chat_chunk(rid, model_name, created, {}, finish) if chat
                            else P.completion_chunk(rid, model_name, created, "", finish))
                    last["adaspec"] = P.spec_stats(result, policy_name)
                    yield _event(last)
                    if include_usage:
                        yield _event({"id": rid, "object": last["object"], "created": created, "model": model_name,
                                      "choices": [], "usage": P.usage(prompt_tokens, n)})
            yield b"data: [DONE]\n\n"
            done = True
        except _ClientGone:
            done = True  # already cancelled
        except ApiError as exc:  # after the headers went out: the error is the last event
            yield _event(exc.body)
            yield b"data: [DONE]\n\n"
            done = True
        finally:
            if not done:  # the client went away mid-stream: retire the request from the batch
                engine_loop.cancel(rid)
            metrics.latency.labels("/v1/chat/completions" if chat else "/v1/completions").observe(
                time.perf_counter() - t0)

    return app


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _error(status: int, message: str, type_: str) -> JSONResponse:
    return JSONResponse(P.error_body(message, type_), status_code=status)

"""The OpenAI API as SGLang and vLLM serve it: request schemas (validated), response and chunk builders, errors.

Requests are hostile input: every field is typed and bounded, unknown fields are ignored (clients send many),
and features this server does not implement are refused by name rather than silently dropped (`n` > 1,
`logprobs`, `tools`, penalties). Every error is an OpenAI error object: {"error": {message, type, param, code}}.
The speculative stats of a response ride in an extension field, `adaspec` (tau, target forwards, and the
tokens each drafter got accepted), as SGLang puts its own in `meta_info`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adaspec.core.engine.engine import GenerationResult

_TEXT_LIMIT = 1_000_000  # characters in one prompt or message (the body limit applies first)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    n: int = Field(default=1, ge=1, le=1)
    logprobs: bool | int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("up to 4 non-empty stop strings of at most 256 characters")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError("penalties are not supported by this server (they would change the distribution "
                             "speculative decoding reproduces)")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        if v:
            raise ValueError("logprobs are not supported by this server")
        return v

    def stops(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[dict[str, Any]]]

    def text(self) -> str:
        """The message text (content parts of type `text` are joined; other kinds are refused)."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: Any) -> Any:
        if v:
            raise ValueError("tools are not supported by this server")
        return v

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        msgs = [{"role": m.role, "content": m.text()} for m in self.messages]
        if sum(len(m["content"]) for m in msgs) > _TEXT_LIMIT:
            raise ValueError(f"messages exceed {_TEXT_LIMIT} characters")
        return msgs


class CompletionRequest(_Common):
    prompt: Union[str, list[str]]
    max_tokens: int | None = Field(default=16, ge=1, le=1_000_000)  # OpenAI's default for completions
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> str:
        if isinstance(v, list):
            if len(v) != 1 or not isinstance(v[0], str):
                raise ValueError("one prompt string per request (batch by sending several requests)")
            v = v[0]
        if len(v) > _TEXT_LIMIT:
            raise ValueError(f"prompt exceeds {_TEXT_LIMIT} characters")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported by this server")
        return v

    def budget(self) -> int | None:
        return self.max_tokens


# -- responses ------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def spec_stats(result: GenerationResult | None, policy: str) -> dict[str, Any]:
    """The `adaspec` extension field: tokens per target forward and each drafter's accepted tokens."""
    if result is None:
        return {"policy": policy}
    accepted: dict[str, int] = {}
    drafted: dict[str, int] = {}
    for r in result.records:
        if r.drafter:
            accepted[r.drafter] = accepted.get(r.drafter, 0) + r.accepted
            drafted[r.drafter] = drafted.get(r.drafter, 0) + r.drafted
    return {"policy": policy, "tau": round(result.tau, 4), "target_forwards": result.target_forwards,
            "accepted_tokens": accepted, "drafted_tokens": drafted}


def chat_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                  stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish}],
        "usage": usage(prompt_tokens, completion_tokens), "adaspec": stats,
    }


def completion_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int,
                        completion_tokens: int, stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": usage(prompt_tokens, completion_tokens), "adaspec": stats,
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


#: Engine finish reasons -> OpenAI's (a request cut at the context window ran out of room: "length").
FINISH = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}

"""Knobs of `adaspec serve` (env prefix `ADASPEC_SERVE_`); every one has a working default."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from adaspec.core.config import load


class ServeSettings(BaseSettings):
    """Where the OpenAI-compatible server listens and how much it admits."""

    model_config = SettingsConfigDict(
        env_prefix="ADASPEC_SERVE_", extra="forbid", validate_default=True, validate_assignment=True
    )

    host: str = Field(default="127.0.0.1", description="Address to listen on (0.0.0.0 in a container).")
    port: int = Field(default=8000, ge=0, le=65535, description="HTTP port (0 = any free port).")
    served_model_name: str = Field(
        default="", max_length=256, description="Model id in responses and /v1/models ('' = the model's name)."
    )
    max_waiting: int = Field(
        default=64, ge=1, le=100_000,
        description="Requests waiting for a batch slot before new ones are refused with 503 (never unbounded).",
    )
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, le=1 << 30, description="Largest request body accepted (413 beyond)."
    )
    default_max_tokens: int = Field(
        default=256, ge=1, le=1_000_000, description="Chat completions' budget when the request sets none."
    )
    tenant_header: str = Field(
        default="x-adaspec-tenant", min_length=1, max_length=64,
        description="Header naming the request's tenant (else the `user` field, else 'default').",
    )


def load_serve_settings(**overrides: Any) -> ServeSettings:
    return load(ServeSettings, "serve settings", **overrides)

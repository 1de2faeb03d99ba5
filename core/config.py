"""Settings for every adaspec process, validated once at start-up.

Sources, highest priority first: explicit keyword arguments (CLI flags), `ADASPEC_*` environment variables,
an optional TOML file (`ADASPEC_CONFIG=path.toml` or `--config`), then the defaults below. A bad value fails
fast with an error naming the field, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from adaspec.core.errors import ConfigError

#: Name of the embedded default model (provisioned by `adaspec models fetch`).
DEFAULT_MODEL = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    """Where converted models and traces live: $XDG_CACHE_HOME/adaspec or ~/.cache/adaspec."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "adaspec"


class Settings(BaseSettings):
    """All adaspec knobs. Each one has a default that works; none is required."""

    model_config = SettingsConfigDict(
        env_prefix="ADASPEC_",
        extra="forbid",
        validate_default=True,
        validate_assignment=True,
    )

    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Directory for converted models, downloaded wheels and recorded traces.",
    )
    model: str = Field(
        default=DEFAULT_MODEL,
        description=f"Target model: '{DEFAULT_MODEL}' (provisioned offline) or a local Hugging Face model dir.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where the target runs; 'auto' picks CUDA when available."
    )
    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] = Field(
        default="auto", description="Target weights dtype; 'auto' = float32 on CPU, bfloat16 on CUDA."
    )
    threads: int = Field(
        default=0, ge=0, le=1024, description="torch CPU threads; 0 keeps torch's default."
    )
    drafter: str = Field(default="prompt-lookup", description="Default drafter name (see `adaspec drafters`).")
    lookahead: int = Field(default=6, ge=0, le=64, description="Draft tokens proposed per step (chain length k).")
    max_new_tokens: int = Field(default=128, ge=1, le=1_000_000, description="Default generation budget.")
    temperature: float = Field(
        default=0.0, ge=0.0, le=100.0, description="Sampling temperature; 0 = greedy decoding."
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (1 = off).")
    seed: int = Field(default=0, ge=0, description="Seed for sampling (per request: seed + request index).")
    batch_size: int = Field(default=4, ge=1, le=4096, description="Requests decoded together by the engine.")
    chat_template: bool = Field(
        default=True, description="Wrap prompts in the model's chat template (instruct models)."
    )
    prompt_lookup_min_ngram: int = Field(default=1, ge=1, le=64, description="Shortest n-gram matched.")
    prompt_lookup_max_ngram: int = Field(default=4, ge=1, le=64, description="Longest n-gram matched.")
    suffix_max_depth: int = Field(default=32, ge=1, le=256, description="Suffix drafter: longest context suffix matched.")
    suffix_spec_factor: float = Field(
        default=1.0, ge=0.0, le=64.0, description="Suffix drafter: draft length <= factor x match length."
    )
    suffix_min_token_prob: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Suffix drafter: stop a chain below this cumulative probability."
    )
    suffix_cache_max_responses: int = Field(
        default=1024, ge=0, le=10_000_000, description="Suffix drafter: past responses kept per tenant (FIFO)."
    )
    suffix_cache_max_tokens: int = Field(
        default=131072, ge=0, le=100_000_000, description="Suffix drafter: past-response tokens kept per tenant."
    )
    suffix_max_tenants: int = Field(default=8, ge=1, le=100_000, description="Suffix drafter: tenant caches kept (LRU).")
    static_head_path: Path | None = Field(
        default=None,
        description="Static drafter: an EAGLE-3 head dir (SGLang format). Unset: the head shipped for the pinned "
        "model, else <cache_dir>/heads/<model>/eagle3/final (what `adaspec train-static` writes).",
    )
    adaptive_kind: Literal["mlp", "adapter"] = Field(
        default="mlp",
        description="Adaptive drafter: 'mlp' (a light head over the target's last hidden state, trained by the "
        "sidecar from logs) or 'adapter' (the static head plus an online LoRA/residual adapter: version 0 drafts "
        "as the static head does; learned in-process by the drift benchmark so far).",
    )
    adaptive_adapter_rank: int = Field(default=16, ge=1, le=512, description="Adapter kind: LoRA rank.")
    adaptive_inner_size: int = Field(
        default=1024, ge=1, le=65536, description="Adaptive drafter: width of its MLP (a fresh head's size)."
    )
    adaptive_lr: float = Field(default=1e-3, gt=0.0, le=1.0, description="Adaptive drafter: online learning rate.")
    adaptive_head_path: Path | None = Field(
        default=None,
        description="Adaptive drafter: a saved head (safetensors from `adaspec sidecar export`) to start from; "
        "unset starts from scratch (it then predicts little until it has learned).",
    )
    adaptive_draft_vocab: bool = Field(
        default=True,
        description="Adaptive drafter: draft over the static head's reduced vocabulary when it has one "
        "(each drafted token then reads a fraction of the LM head).",
    )
    adaptive_collect: int = Field(
        default=0,
        ge=0,
        le=10_000_000,
        description="Adaptive drafter: training samples kept from finished requests for in-process learning "
        "(0 = off; the sidecar learns from logs instead).",
    )
    compact_holes_ratio: float = Field(
        default=0.25,
        gt=0.0,
        le=1.0,
        description="Compact the batched KV cache once compaction would free this fraction of its slots (rejected "
        "drafts, departed rows).",
    )

    @field_validator("prompt_lookup_max_ngram")
    @classmethod
    def _ngram_order(cls, v: int, info: Any) -> int:
        lo = info.data.get("prompt_lookup_min_ngram", 1)
        if v < lo:
            raise ValueError(f"must be >= prompt_lookup_min_ngram ({lo})")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("ADASPEC_CONFIG")
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)


S = TypeVar("S", bound=BaseSettings)


def load(cls: type[S], what: str, **overrides: Any) -> S:
    """The one settings loader: `cls` from overrides (None = not given), then its env vars (and what else its
    sources read); a bad value raises a ConfigError naming each field with the env var users set."""
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, cls.model_config.get("env_prefix", ""), what)) from None


def settings_rows(cls: type[BaseSettings]) -> list[tuple[str, str, str]]:
    """(env var, default, description) of every field: the documented knob list of a settings class."""
    prefix = cls.model_config.get("env_prefix", "")
    return [(prefix + name.upper(), "<computed>" if info.default_factory else str(info.default),
             info.description or "") for name, info in cls.model_fields.items()]


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from overrides, env and an optional TOML file; raise ConfigError naming bad fields."""
    previous = os.environ.get("ADASPEC_CONFIG")
    try:
        if config_file is not None:
            if not Path(config_file).is_file():
                raise ConfigError(f"config file not found: {config_file}")
            os.environ["ADASPEC_CONFIG"] = str(config_file)
        elif previous and not Path(previous).is_file():
            raise ConfigError(f"ADASPEC_CONFIG points to a missing file: {previous}")
        return load(Settings, "settings", **overrides)
    except (ValueError, OSError) as exc:  # e.g. malformed TOML
        raise ConfigError(f"cannot read settings: {exc}") from None
    finally:
        if config_file is not None:
            if previous is None:
                os.environ.pop("ADASPEC_CONFIG", None)
            else:
                os.environ["ADASPEC_CONFIG"] = previous


def describe_validation_error(exc: ValidationError, env_prefix: str = "ADASPEC_", what: str = "settings") -> str:
    """One line per bad field: `field (ENV_VAR): message (got value)`, using the env var spelling users set."""
    lines = [f"invalid {what}:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "?"
        env = f"{env_prefix}{field.upper()}" if field != "?" else f"{env_prefix}*"
        lines.append(f"  {field} ({env}): {err.get('msg')} (got {err.get('input')!r})")
    return "\n".join(lines)


def settings_table() -> list[tuple[str, str, str]]:
    """(field, default, description) rows: the documented knob list for `adaspec config` and the README."""
    rows = []
    for name, info in Settings.model_fields.items():
        default = info.default_factory() if info.default_factory else info.default  # type: ignore[call-arg]
        rows.append((name, str(default), info.description or ""))
    return rows

"""The plugin's knobs (env prefix `ADASPEC_SGLANG_`), read inside each SGLang scheduler process.

SGLang owns the command line, so adaspec's part of `--speculative-algorithm ATLAS` is configured through
the environment (inherited by the scheduler processes SGLang spawns). The controller's own knobs stay
`ADASPEC_CONTROLLER_*`, the transport's `ADASPEC_TRANSPORT_*`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from adaspec.core.config import default_cache_dir, load

ENV_PREFIX = "ADASPEC_SGLANG_"
#: The drafters the worker knows: SGLang's own EAGLE-3 path, the suffix tree, the online adaptive head.
KNOWN_DRAFTERS = ("static", "suffix", "adaptive")


def _split(v: Any) -> Any:
    if isinstance(v, str):
        return tuple(p.strip() for p in v.split(",") if p.strip())
    return v


class PluginSettings(BaseSettings):
    """Which drafters ATLAS may pick, which step counts get pre-captured runtime states, where logs go."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, validate_assignment=True
    )

    drafters: Annotated[tuple[str, ...], NoDecode] = Field(
        default=KNOWN_DRAFTERS,
        description="Drafters the controller may pick (static = SGLang's EAGLE-3 path with the draft model).",
    )
    candidate_steps: Annotated[tuple[int, ...], NoDecode] = Field(
        default=(0, 1, 2, 3, 4, 6, 8),
        description="Batch step counts with pre-captured runtime states (CUDA graphs); a batch runs the "
        "smallest one covering its longest planned chain. The largest sizes SGLang's buffers.",
    )
    adaptive_base: Path | None = Field(
        default=None,
        description="Head base file of the adaptive drafter (written by the sidecar). Unset: "
        "<cache>/sidecar/base.safetensors; when missing the adaptive drafter is off.",
    )
    downshift_after: int = Field(
        default=8, ge=0, le=10_000,
        description="Batches in a row that a smaller runtime state would cover before the worker switches down "
        "to it (up is immediate). A switch costs SGLang an INFO line, two device tensors and an override-log "
        "entry; 0 switches on every batch.",
    )
    server_id: str = Field(default="", description="Name in the logs sent to the sidecar ('' = sglang-<host>-<pid>).")
    sidecar: bool = Field(default=True, description="Ship acceptance logs to the sidecar and follow its weights.")
    feature_sample_rate: float = Field(
        default=0.1, ge=0.0, le=1.0,
        description="Share of requests whose logs carry target hidden states (what the sidecar trains on). "
        "Each sampled row is a device copy held until the sender thread ships it, so this bounds both the "
        "copies per step and the GPU memory the log queue holds.",
    )
    log_feature_mib: float = Field(
        default=256.0, gt=0.0, le=65536.0,
        description="Most MiB of hidden-state copies the log queue may hold on the device; a step whose "
        "features would exceed it is logged without them (counted).",
    )
    log_queue: int = Field(
        default=256, ge=1, le=1_000_000,
        description="Steps of logs queued for the background sender; beyond it logs are dropped (counted).",
    )
    seed: int = Field(default=0, ge=0, description="Seeds the feature sampling (per request).")

    @field_validator("drafters", mode="before")
    @classmethod
    def _drafters(cls, v: Any) -> Any:
        return _split(v)

    @field_validator("candidate_steps", mode="before")
    @classmethod
    def _steps(cls, v: Any) -> Any:
        v = _split(v)
        return tuple(int(x) for x in v) if isinstance(v, tuple) else v

    @model_validator(mode="after")
    def _consistent(self) -> "PluginSettings":
        unknown = [d for d in self.drafters if d not in KNOWN_DRAFTERS]
        if unknown:
            raise ValueError(f"unknown drafters {unknown}; known: {list(KNOWN_DRAFTERS)}")
        if not self.drafters:
            raise ValueError("at least one drafter is needed")
        steps = self.candidate_steps
        if not steps or any(s < 0 for s in steps) or max(steps) < 1:
            raise ValueError(f"candidate_steps need non-negative ints and one >= 1, got {list(steps)}")
        if len(set(steps)) != len(steps):
            raise ValueError(f"candidate_steps has duplicates: {list(steps)}")
        object.__setattr__(self, "candidate_steps", tuple(sorted(steps)))
        return self

    @property
    def max_steps(self) -> int:
        return max(self.candidate_steps)

    def base_path(self) -> Path:
        return self.adaptive_base or default_cache_dir() / "sidecar" / "base.safetensors"


def load_plugin_settings(**overrides: Any) -> PluginSettings:
    """Build PluginSettings from overrides and env; raise ConfigError naming each bad field and its env var."""
    return load(PluginSettings, "SGLang plugin settings", **overrides)

"""Sidecar knobs (env prefix `ADASPEC_SIDECAR_`); every one has a working default, none is required.

The transport (endpoints, CURVE keys, queue depths, wire limits) is configured apart, by
`ADASPEC_TRANSPORT_*` (`adaspec.core.online.settings.TransportSettings`), because the serving side reads
the same values. Sample counts are training samples (one per logged target position with known successors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adaspec.core.config import default_cache_dir, load

ENV_PREFIX = "ADASPEC_SIDECAR_"


class SidecarSettings(BaseSettings):
    """Every sidecar knob: what it trains, how it samples, when it publishes, rolls back and checkpoints."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, validate_assignment=True
    )

    # -- identity and storage -----------------------------------------------------------------------------------
    drafter: str = Field(
        default="adaptive", min_length=1, max_length=128,
        description="Name of the drafter whose weights are trained and published (the servers' drafter name).",
    )
    state_dir: Path = Field(
        default_factory=lambda: default_cache_dir() / "sidecar",
        description="Checkpoints, published versions, the head base and the sidecar log live here.",
    )
    base_path: Path | None = Field(
        default=None,
        description="Head base file (frozen embedding/LM head + initial weights). Unset: <state_dir>/base.safetensors,"
        " built from the target model (ADASPEC_MODEL) on first start if missing.",
    )
    inner_size: int = Field(
        default=1024, ge=1, le=65536, description="MLP width of a head built from the model (ignored with a base)."
    )
    seed: int = Field(default=0, ge=0, description="Init seed of a head built from the model (same as the servers').")
    threads: int = Field(
        default=1, ge=0, le=1024, description="torch CPU threads for training (0 = torch default); keep serving cores free."
    )
    priority: Literal["normal", "idle"] = Field(
        default="normal",
        description="CPU scheduling of the process: 'idle' (Linux SCHED_IDLE, elsewhere nice 19) trains only on "
        "cycles the servers leave free -- for a sidecar that shares their cores (serve, demo, bench drift --live).",
    )
    cpu_share: float = Field(
        default=1.0, gt=0.0, le=1024.0,
        description="Average CPU the sidecar may use, in cores (a token bucket over ~2 s; training waits while it "
        "is spent): a co-located sidecar keeps it below one so serving keeps the rest of the machine.",
    )
    share_follows_earnings: bool = Field(
        default=False,
        description="For a sidecar on the servers' cores: its CPU share follows what its drafter earns there "
        "(`sidecar/budget.py`): `unearned_tax / serving_tax_per_core` cores while the drafter supplies no served "
        "tokens, up to half of its share of the emitted tokens in serving time, never above cpu_share.",
    )
    serving_tax_per_core: float = Field(
        default=3.0, gt=0.0, le=1000.0,
        description="How much slower serving runs per core the co-located learner takes (measured on the 2-core "
        "CPU: 0.23 of a core made the target's forward 1.72x slower).",
    )
    unearned_tax: float = Field(
        default=0.01, ge=0.0, lt=1.0,
        description="The serving slowdown a co-located learner may cause while its drafter earns nothing (it "
        "still learns, slowly, so that it can start to earn).",
    )

    # -- replay buffer ------------------------------------------------------------------------------------------
    tenant_capacity: int = Field(
        default=8192, ge=16, le=10_000_000, description="Training samples kept per tenant (oldest evicted first)."
    )
    max_tenants: int = Field(
        default=16, ge=1, le=100_000, description="Tenants with a buffer; the least recently fed one is evicted beyond."
    )
    recency_half_life: float = Field(
        default=2048.0, gt=0.0, le=1e9,
        description="Sampling weight halves for every this many newer samples of the same tenant.",
    )
    tenant_balance: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Tenant draw weight = size^(1 - balance): 0 = by size, 1 = equal per tenant.",
    )
    holdout_fraction: float = Field(
        default=0.15, gt=0.0, lt=1.0,
        description="Share of requests (by id hash) held out from training for the evaluation gate (which "
        "publishes nothing without them).",
    )
    holdout_capacity: int = Field(
        default=2048, ge=16, le=10_000_000, description="Held-out samples kept per tenant (most recent)."
    )
    max_servers: int = Field(
        default=256, ge=1, le=1_000_000,
        description="Servers whose per-server state (seq, lost batches, last version) and metric series are kept; "
        "beyond, the least recently heard one is forgotten (a peer inventing server ids cannot grow memory or /metrics).",
    )
    max_streams: int = Field(
        default=4096, ge=1, le=10_000_000,
        description="Requests whose log entries are being stitched into streams at once (LRU beyond).",
    )

    # -- trainer ------------------------------------------------------------------------------------------------
    lr: float = Field(default=2e-3, gt=0.0, le=1.0, description="AdamW learning rate of the online updates.")
    unroll: int = Field(default=3, ge=1, le=16, description="Chain positions trained per sample (EAGLE-style unroll).")
    batch_size: int = Field(default=64, ge=1, le=65536, description="Samples per update.")
    min_samples: int = Field(default=32, ge=1, le=10_000_000, description="Training samples needed before the first update.")
    replay_ratio: float = Field(
        default=8.0, gt=0.0, le=10_000.0,
        description="Samples trained per sample received: bounds the work (and CPU) spent on old traffic.",
    )

    # -- evaluation gate ----------------------------------------------------------------------------------------
    gate_every: int = Field(default=8, ge=1, le=1_000_000, description="Updates between evaluations of the candidate.")
    gate_k: int = Field(default=4, ge=1, le=16, description="Chain length replayed to estimate tau.")
    gate_margin: float = Field(
        default=0.01, ge=0.0, le=10.0,
        description="Publish only if the candidate's estimated tau > serving tau x (1 + margin).",
    )
    gate_min_samples: int = Field(
        default=32, ge=1, le=10_000_000, description="Held-out samples needed before the gate decides anything."
    )
    gate_max_samples: int = Field(
        default=256, ge=1, le=10_000_000, description="Most recent held-out samples replayed per evaluation."
    )

    # -- rollback -----------------------------------------------------------------------------------------------
    rollback_min_drafted: int = Field(
        default=256, ge=1, le=1_000_000_000,
        description="Drafted tokens a version needs in the logs before its served acceptance is compared.",
    )
    rollback_min_requests: int = Field(
        default=8, ge=1, le=1_000_000,
        description="Distinct requests each version's served evidence must come from before a rollback (one "
        "request's logs, forged or unlucky, cannot roll a version back).",
    )
    rollback_margin: float = Field(
        default=0.1, ge=0.0, le=1.0,
        description="Roll back when a new version's acceptance < the previous version's x (1 - margin).",
    )
    rollback_window: int = Field(
        default=4096, ge=1, le=1_000_000_000,
        description="Drafted tokens (most recent) a version's served acceptance is measured over.",
    )

    # -- checkpoints --------------------------------------------------------------------------------------------
    checkpoint_every: int = Field(
        default=50, ge=1, le=1_000_000_000, description="Updates between checkpoints (also taken on every publish)."
    )
    keep_checkpoints: int = Field(default=3, ge=1, le=1000, description="Checkpoints kept on disk (newest).")
    keep_versions: int = Field(default=16, ge=2, le=100_000, description="Published versions kept for rollback.")

    # -- service ------------------------------------------------------------------------------------------------
    poll_ms: int = Field(default=50, ge=1, le=60_000, description="Log poll timeout of the idle service loop.")
    max_batches_per_loop: int = Field(
        default=64, ge=1, le=1_000_000, description="Log batches ingested per loop turn before training/admin get a go."
    )
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Prometheus /metrics HTTP port (0 = off).")
    metrics_host: str = Field(default="127.0.0.1", description="Address the /metrics server listens on.")
    parent_pid: int = Field(
        default=0, ge=0,
        description="Stop (gracefully) once the process with this pid is no longer our parent: a sidecar spawned "
        "by another program dies with it, even when that one was killed with SIGKILL (0 = run until signalled).",
    )

    @model_validator(mode="after")
    def _gate_within_targets(self) -> "SidecarSettings":
        if self.gate_min_samples > self.gate_max_samples:
            raise ValueError("gate_min_samples must be <= gate_max_samples")
        return self

    def resolved_base_path(self) -> Path:
        return self.base_path if self.base_path is not None else self.state_dir / "base.safetensors"

    def target_width(self) -> int:
        """Targets stored per sample: enough for both the training unroll and the gate's chain."""
        return max(self.unroll, self.gate_k)


def load_sidecar_settings(**overrides: Any) -> SidecarSettings:
    """Build SidecarSettings from overrides and env; raise ConfigError naming each bad field and its env var."""
    return load(SidecarSettings, "sidecar settings", **overrides)

"""Controller knobs (env prefix `ADASPEC_CONTROLLER_`): every one has a working default, none is required.

Kept apart from the engine-wide `Settings` so the controller can be tuned (and validated) on its own, e.g.
`ADASPEC_CONTROLLER_MAX_K=12`. Times are seconds; token counts are target positions.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from adaspec.core.config import load

ENV_PREFIX = "ADASPEC_CONTROLLER_"


class ControllerSettings(BaseSettings):
    """All ATLAS controller knobs: calibration, cost model, planning, guardrail, exploration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, validate_assignment=True
    )

    # -- planning ---------------------------------------------------------------------------------------------
    max_k: int = Field(default=8, ge=1, le=64, description="Longest chain the controller ever asks for.")
    plan_iters: int = Field(
        default=3, ge=1, le=20,
        description="Dinkelbach iterations per step for the batch goodput ratio (warm-started; 1-2 usually suffice).",
    )
    plan_tol: float = Field(
        default=1e-3, gt=0.0, le=0.5,
        description="Stop iterating once the goodput ratio moves less than this (relative).",
    )
    request_floor_slack: float = Field(
        default=math.inf, ge=0.0,
        description="Per-request latency floor under padded verify (inf: off, the batch's goodput alone decides). "
        "A widened step makes every row pay its width; with a floor the planner never widens past what would leave "
        "any request, in expectation, more than this share of its token budget behind plain decoding's rate "
        "(0: no request ever pays for another's drafts). Measured at 0.02 on this CPU's quick drift stream (one live "
        "run each): it lifts the chat rows beside the first code rows (0.93 -> 1.00x plain) and costs the code rows "
        "as much (0.94 -> 0.89x the suffix tree), so it is off by default.",
    )
    max_spec_batch: int = Field(
        default=0, ge=0, le=1_000_000,
        description="Hard cap: no drafting (nor exploring) at batch sizes >= this (0 = leave it to the cost model).",
    )
    prior_acceptance: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Per-token acceptance assumed before any data: position j starts at prior_acceptance**j.",
    )
    prior_acceptance_others: float = Field(
        default=0.3, ge=0.0, le=1.0,
        description="The same for every drafter but the fallback (static), when the fallback is one of the drafters: "
        "before any evidence, the offline-trained floor is preferred over drafters whose fit is unknown.",
    )
    trim: bool = Field(default=True, description="Offer the engine the post-propose early-stop hook (`trim`).")
    trim_min_evidence: float = Field(
        default=256.0, ge=0.0, le=1e12,
        description="Calibrated tokens a drafter needs before `trim` cuts its drafts (a young calibration is still "
        "the raw confidence, which can be far off).",
    )
    peek_min_evidence: float = Field(
        default=16.0, ge=0.0, le=1e12,
        description="Calibrated tokens a peeked drafter needs before its draft's calibrated confidence replaces the "
        "running statistics in planning.",
    )
    peek: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("suffix",),
        description="Cheap drafters asked for every request before planning, so the choice reads this step's "
        "draft confidence (a suffix-tree lookup costs ~20 us; a head forward is not cheap).",
    )
    trim_counts_draft_cost: bool = Field(
        default=False,
        description="Charge the (already spent) draft cost when trimming; off = only the verify cost is marginal.",
    )

    # -- per-request / tenant / global acceptance statistics ----------------------------------------------------
    ema_request_alpha: float = Field(
        default=0.3, gt=0.0, le=1.0, description="EMA weight of a request's own last draft (fast: requests are short)."
    )
    ema_tenant_alpha: float = Field(
        default=0.05, gt=0.0, le=1.0, description="EMA weight of one draft in its tenant's statistics."
    )
    ema_global_alpha: float = Field(
        default=0.01, gt=0.0, le=1.0, description="EMA weight of one draft in the drafter's global statistics."
    )
    ema_outcome_weight: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Weight of the realised outcome (vs the calibrated survival probability) in EMA targets.",
    )
    request_stale_steps: int = Field(
        default=16, ge=1, le=1_000_000,
        description="A request's own curve for a drafter it has not used for this many steps defers to its tenant's.",
    )
    max_tracked_requests: int = Field(
        default=4096, ge=1, le=10_000_000, description="Per-request statistics kept (oldest dropped first)."
    )
    max_tracked_tenants: int = Field(
        default=1024, ge=1, le=10_000_000, description="Per-tenant statistics kept (oldest dropped first)."
    )

    # -- calibration --------------------------------------------------------------------------------------------
    calib_bins: int = Field(default=16, ge=2, le=1024, description="Confidence bins of the isotonic calibrator.")
    calib_positions: int = Field(
        default=8, ge=1, le=64, description="Chain positions calibrated separately (later ones share the last)."
    )
    calib_prior_strength: float = Field(
        default=4.0, gt=0.0, le=1e6,
        description="Beta-prior pseudo-observations per bin (prior mean: the pooled fit, itself shrunk to identity).",
    )
    calib_half_life_tokens: float = Field(
        default=50_000.0, ge=0.0, le=1e12,
        description="Observed tokens after which old evidence weighs half (0 = never forget).",
    )
    calib_refit_tokens: int = Field(
        default=64, ge=1, le=1_000_000, description="Refit the isotonic table after this many new tokens (amortised)."
    )

    # -- cost model -----------------------------------------------------------------------------------------------
    verify_fixed_s: float = Field(default=0.010, ge=0.0, le=100.0, description="Start-up verify cost per forward (a).")
    verify_token_s: float = Field(
        default=5e-5, ge=0.0, le=10.0, description="Start-up verify cost per chunk token (b)."
    )
    verify_request_s: float = Field(
        default=0.0, ge=0.0, le=10.0, description="Start-up verify cost per request in the batch (c)."
    )
    draft_token_s: float = Field(default=2e-5, ge=0.0, le=10.0, description="Start-up draft cost per drafted token.")
    cost_forgetting: float = Field(
        default=0.999, gt=0.5, le=1.0, description="RLS forgetting factor of the verify fit (1 = remember everything)."
    )
    cost_prior_weight: float = Field(
        default=2.0, gt=0.0, le=1e9, description="How many observations the start-up verify costs are worth."
    )
    draft_cost_alpha: float = Field(
        default=0.1, gt=0.0, le=1.0,
        description="Step of the per-drafter draft-cost fit (an EMA weight when a step used one drafter).",
    )
    cost_fit_prefill: bool = Field(
        default=False, description="Also fit the verify model on prefill forwards (attention over prompts skews it)."
    )

    # -- guardrail ------------------------------------------------------------------------------------------------
    guarded: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("adaptive",), description="Drafters trusted only up to their calibrated evidence."
    )
    fallback: str = Field(default="static", description="Reference drafter a guarded drafter must match.")
    guard_min_evidence: float = Field(
        default=64.0, ge=0.0, le=1e12, description="Calibrated tokens a guarded drafter needs before it is used."
    )
    guard_alpha: float = Field(
        default=0.05, gt=0.0, le=1.0,
        description="EMA weight of one draft in the recent curves the guardrail compares (fast: catches drops).",
    )
    guard_margin: float = Field(
        default=0.0, ge=0.0, le=64.0,
        description="Expected accepted length a guarded drafter may trail the fallback by and stay trusted.",
    )

    # -- exploration ------------------------------------------------------------------------------------------------
    explore_every: int = Field(
        default=16, ge=0, le=1_000_000,
        description="A drafter unused for this many steps gets short drafts (0 = never explore).",
    )
    explore_fraction: float = Field(
        default=1 / 16, gt=0.0, le=1.0,
        description="Share of the batch (at least one request) an exploring drafter drafts for.",
    )
    explore_k: int = Field(default=2, ge=1, le=64, description="Length of an exploration draft.")
    seed: int = Field(default=0, ge=0, description="Offsets the deterministic exploration schedule.")

    @field_validator("guarded", "peek", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):  # env: ADASPEC_CONTROLLER_GUARDED=adaptive,adaptive-2 (or a JSON list)
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return tuple(p.strip() for p in v.split(",") if p.strip())
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ControllerSettings":
        if self.fallback in self.guarded:
            raise ValueError(f"fallback drafter {self.fallback!r} cannot itself be guarded")
        if self.explore_k > self.max_k:
            raise ValueError(f"explore_k ({self.explore_k}) must be <= max_k ({self.max_k})")
        return self


def load_controller_settings(**overrides: Any) -> ControllerSettings:
    """Build ControllerSettings from overrides and env; raise ConfigError naming each bad field and its env var."""
    return load(ControllerSettings, "controller settings", **overrides)

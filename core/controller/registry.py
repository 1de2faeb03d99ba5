"""Policies by name: the one place the CLI, the benchmarks and the servers look them up.

Each entry declares the drafters it plans over, so callers load exactly those (nothing probes a policy for
what it needs) -- as the drafter registry does for drafters. The names are the drift benchmark's JSON keys;
the older CLI spellings (`fixed-static`, `sglang-adaptive`, ...) remain aliases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from adaspec.core.controller.baselines import AcceptOracle, ArcticHybridPolicy, OraclePolicy, SGLangAdaptivePolicy
from adaspec.core.controller.costs import CostModel
from adaspec.core.controller.policy import AtlasPolicy
from adaspec.core.controller.settings import ControllerSettings
from adaspec.core.errors import ConfigError
from adaspec.core.step import FixedPolicy, PlanRequest, PolicyBase

#: The drafters ATLAS and the oracle choose among: the static floor, the online-learned head, the suffix tree.
LEARNED = ("static", "adaptive", "suffix")


@dataclass(frozen=True)
class PolicyArgs:
    """What a factory may use: the drafters to plan over, the fixed-k baselines' k, controller settings,
    a cost model (ATLAS and the oracle price steps with it), and, for the oracle, its hindsight answers."""

    drafters: tuple[str, ...]
    k: int = 6
    settings: ControllerSettings | None = None
    costs: CostModel | None = None
    oracle: AcceptOracle | None = None
    prepare: Callable[[Sequence[PlanRequest]], None] | None = None


@dataclass(frozen=True)
class PolicyEntry:
    name: str
    description: str
    drafters: tuple[str, ...]
    build: Callable[[PolicyArgs], PolicyBase]
    aliases: tuple[str, ...] = ()
    #: Replay only: plans from recorded answers (`PolicyArgs.oracle`).
    needs_oracle: bool = False


_ENTRIES: dict[str, PolicyEntry] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, description: str, drafters: Sequence[str], aliases: Sequence[str] = (),
             needs_oracle: bool = False) -> Callable[[Callable[[PolicyArgs], PolicyBase]], Callable]:
    def deco(build: Callable[[PolicyArgs], PolicyBase]) -> Callable[[PolicyArgs], PolicyBase]:
        for n in (name, *aliases):
            if n in _ENTRIES or n in _ALIASES:
                raise ValueError(f"policy name {n!r} registered twice")
        _ENTRIES[name] = PolicyEntry(name, description, tuple(drafters), build, tuple(aliases), needs_oracle)
        for a in aliases:
            _ALIASES[a] = name
        return build

    return deco


def entry(name: str) -> PolicyEntry:
    """The entry of a name or alias; unknown names raise a ConfigError listing the known ones."""
    e = _ENTRIES.get(_ALIASES.get(name, name))
    if e is None:
        raise ConfigError(f"unknown policy {name!r}; available: {', '.join(_ENTRIES)}")
    return e


def names() -> tuple[str, ...]:
    """Canonical policy names, in registration order (the drift benchmark runs them in this order)."""
    return tuple(_ENTRIES)


def available() -> dict[str, str]:
    """name -> one-line description (aliases in brackets)."""
    return {n: e.description + (f" (also: {', '.join(e.aliases)})" if e.aliases else "") for n, e in _ENTRIES.items()}


def drafters_for(name: str) -> tuple[str, ...]:
    return entry(name).drafters


def uses_adaptive(name: str) -> bool:
    return "adaptive" in entry(name).drafters


def policy_drafters(name: str, loadable: Sequence[str]) -> list[str]:
    """The drafters a runtime must load for `name`: a policy choosing among several takes those of them that
    can be loaded; a single-drafter policy needs its own."""
    e = entry(name)
    if len(e.drafters) > 1:
        return [d for d in e.drafters if d in loadable]
    return list(e.drafters)


def make_policy(name: str, drafters: Sequence[str] | None = None, k: int = 6,
                settings: ControllerSettings | None = None, costs: CostModel | None = None,
                oracle: AcceptOracle | None = None,
                prepare: Callable[[Sequence[PlanRequest]], None] | None = None) -> PolicyBase:
    """A policy by name or alias. `drafters` (default: the entry's) is what a multi-drafter policy plans
    over; `k` is the lookahead of the fixed-k baselines."""
    e = entry(name)
    if e.needs_oracle and oracle is None:
        raise ConfigError(f"policy {e.name!r} plans in hindsight: it needs recorded answers (trace replay)")
    args = PolicyArgs(tuple(drafters) if drafters is not None else e.drafters, k, settings, costs, oracle, prepare)
    return e.build(args)


@register("none", "plain decoding: no drafts", ())
def _none(a: PolicyArgs) -> PolicyBase:
    return FixedPolicy(None, 0)


@register("static", "the static EAGLE-3 head at a fixed lookahead (the speed floor)", ("static",),
          aliases=("fixed-static",))
def _static(a: PolicyArgs) -> PolicyBase:
    return FixedPolicy("static", a.k)


@register("suffix", "the model-free suffix tree at a fixed lookahead", ("suffix",), aliases=("fixed-suffix",))
def _suffix(a: PolicyArgs) -> PolicyBase:
    return FixedPolicy("suffix", a.k)


@register("adaptive", "the online-learned head alone at a fixed lookahead (no controller, no guardrail)",
          ("adaptive",), aliases=("adaptive-alone",))
def _adaptive(a: PolicyArgs) -> PolicyBase:
    return FixedPolicy("adaptive", a.k)


@register("sglang-ema", "SGLang 0.5.17's --speculative-adaptive over the static head", ("static",),
          aliases=("sglang-adaptive",))
def _sglang_ema(a: PolicyArgs) -> PolicyBase:
    return SGLangAdaptivePolicy("static")


@register("arctic-hybrid", "Arctic Inference's hybrid: the suffix draft when its score >= k, else the static "
          "head at k", ("static", "suffix"))
def _arctic_hybrid(a: PolicyArgs) -> PolicyBase:
    return ArcticHybridPolicy("static", a.k)


@register("atlas", "ATLAS: drafter and lookahead per request and step from calibrated confidence and costs",
          LEARNED)
def _atlas(a: PolicyArgs) -> PolicyBase:
    return AtlasPolicy(a.drafters, a.settings, costs=a.costs)


@register("oracle", "hindsight best (drafter, k) per request and step, priced like ATLAS (replay only)",
          LEARNED, needs_oracle=True)
def _oracle(a: PolicyArgs) -> PolicyBase:
    max_k = (a.settings or ControllerSettings()).max_k
    return OraclePolicy(a.drafters, a.oracle, a.costs, max_k=max_k, prepare=a.prepare)  # type: ignore[arg-type]

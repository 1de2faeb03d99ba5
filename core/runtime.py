"""Everything one process needs to serve: settings -> target model -> drafters -> engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from adaspec.core.config import Settings
from adaspec.core.drafters.base import Drafter
from adaspec.core.drafters.registry import make_drafters, require_known
from adaspec.core.engine.engine import GenerationResult, RequestSpec, SpecEngine
from adaspec.core.step import FixedPolicy, PolicyBase
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.target import Target, load_target


@dataclass
class Runtime:
    settings: Settings
    target: Target
    drafters: dict[str, Drafter]
    engine: SpecEngine

    @classmethod
    def load(cls, settings: Settings, drafter_names: Sequence[str] = (), target: Target | None = None) -> "Runtime":
        """Build drafters first (an unknown name fails before the model loads), then the target (or use a
        loaded one)."""
        names = list(dict.fromkeys(["none", *drafter_names]))
        require_known(names)
        target = target if target is not None else load_target(settings)
        drafters = make_drafters(names, settings, target)
        engine = SpecEngine(target, drafters, settings.batch_size, settings.compact_holes_ratio)
        return cls(settings, target, drafters, engine)

    def reset_drafters(self) -> None:
        """Fresh drafter state (e.g. empty suffix caches), so one benchmark run cannot learn from another."""
        self.drafters = make_drafters(list(self.drafters), self.settings, self.target)
        self.engine.drafters = dict(self.drafters)

    def sampling(self) -> SamplingParams:
        s = self.settings
        return SamplingParams(s.max_new_tokens, s.temperature, s.top_p, s.seed)

    def policy(self, name: str) -> PolicyBase:
        """A policy by name (`atlas`, `static`, `sglang-ema`, ... or an alias) over those of its drafters this
        runtime has; controller knobs come from `ADASPEC_CONTROLLER_*`."""
        from adaspec.core.controller import load_controller_settings, make_policy, policy_drafters

        return make_policy(name, policy_drafters(name, list(self.drafters)), self.settings.lookahead,
                           load_controller_settings())

    def generate(
        self,
        prompts: Sequence[list[int] | RequestSpec],
        drafter: str | None = None,
        policy: PolicyBase | str | None = None,
        params: SamplingParams | None = None,
    ) -> list[GenerationResult]:
        if isinstance(policy, str):
            policy = self.policy(policy)
        policy = policy or FixedPolicy(drafter or self.settings.drafter, self.settings.lookahead)
        return self.engine.generate(prompts, params or self.sampling(), policy)

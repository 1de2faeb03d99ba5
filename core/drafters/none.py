"""The `none` drafter: proposes nothing, so the engine does plain decoding (one token per target forward)."""

from __future__ import annotations

from typing import Sequence

from adaspec.core.drafters.base import Draft, DraftRequest, DrafterBase, Observation


class NoneDrafter(DrafterBase):
    name = "none"
    hidden_layers: tuple[int, ...] = ()

    def start(self, request: DraftRequest) -> None:
        return None

    def observe(self, observations: Sequence[Observation]) -> None:
        return None

    def propose(self, requests: Sequence[DraftRequest], ks: Sequence[int]) -> list[Draft]:
        return [Draft() for _ in requests]

    def finish(self, request: DraftRequest) -> None:
        return None

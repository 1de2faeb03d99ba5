"""In-process online learning for the adaptive drafter: the sidecar's job, run inside the benchmark.

A trainer copy of the adaptive head learns continuously from finished requests' (hidden, tokens) streams;
every `update_tokens` new samples it takes `steps` AdamW steps on recency-weighted minibatches, then an
evaluation gate compares it with the serving head on held-out recent traffic (mean accepted chain length
of greedy drafts against the recorded target tokens). Only a candidate that beats the serving version by
`margin` is published: copied in place into the serving head between engine steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from adaspec.core.drafters.adaptive import AdaptiveDrafter
from adaspec.core.heads.adaptive import IGNORE, AdaptiveFeatures, AdaptiveHead


@dataclass
class LearnerStats:
    updates: int = 0
    published: int = 0
    rejected: int = 0
    samples_seen: int = 0
    versions: list[dict] = field(default_factory=list)  # {version, at_step, gate_new, gate_old}


@torch.inference_mode()
def chain_score(head: AdaptiveHead, feats: AdaptiveFeatures, targets: Tensor) -> float:
    """Mean accepted length of greedy chains of len(targets[0]) drafted from each sample (the gate's metric)."""
    if len(feats) == 0:
        return 0.0
    ids, _ = head.draft(feats.hidden.to(head.up.weight.device), feats.tokens.to(head.up.weight.device),
                        targets.shape[1])
    match = (ids.cpu() == targets) & (targets != IGNORE)
    return float(match.long().cumprod(dim=1).sum(dim=1).float().mean())


class InProcessLearner:
    """Engine hooks: call `between_steps()` from `SpecEngine.between_steps` (the drafter must collect)."""

    def __init__(
        self, drafter: AdaptiveDrafter, update_tokens: int = 1024, batch: int = 128, steps: int = 4,
        buffer: int = 16384, holdout: int = 1024, margin: float = 0.0, seed: int = 0,
    ) -> None:
        if not drafter.collect:
            raise ValueError("the adaptive drafter must collect experience (collect > 0)")
        self.drafter = drafter
        self.serving = drafter.head
        self.trainer = AdaptiveHead(self.serving.cfg, self.serving.embed_weight, self.serving.lm_head_weight)
        self.trainer.load_state_dict(self.serving.state_dict())
        self.trainer.set_draft_vocab(self.serving.draft_ids)  # the gate must judge drafts as served
        self.trainer.to(self.serving.up.weight.device)
        self.update_tokens, self.batch, self.steps = update_tokens, batch, steps
        self.buffer_cap, self.holdout_cap, self.margin = buffer, holdout, margin
        self.train_h: list[Tensor] = []
        self.train_t: list[Tensor] = []
        self.train_y: list[Tensor] = []
        self.hold: tuple[Tensor, Tensor, Tensor] | None = None
        self.new_samples = 0
        self.version = 0
        self.step = 0
        self.stats = LearnerStats()
        self.gen = torch.Generator().manual_seed(seed)

    def between_steps(self) -> None:
        self.step += 1
        exp = self.drafter.take_experience()
        if exp is not None:
            self._add(*exp)
        if self.new_samples >= self.update_tokens:
            self._update()

    def _add(self, feats: AdaptiveFeatures, targets: Tensor) -> None:
        n = len(feats)
        self.stats.samples_seen += n
        cut = max(0, n - max(1, n // 5))  # newest fifth of each delivery is held out for the gate
        h, t, y = feats.hidden, feats.tokens, targets
        self.train_h.append(h[:cut]); self.train_t.append(t[:cut]); self.train_y.append(y[:cut])
        hold = (h[cut:], t[cut:], y[cut:])
        if self.hold is not None:
            hold = tuple(torch.cat([a, b])[-self.holdout_cap :] for a, b in zip(self.hold, hold))  # type: ignore
        self.hold = hold  # type: ignore[assignment]
        self.new_samples += cut
        total = sum(len(x) for x in self.train_t)
        while total > self.buffer_cap and len(self.train_t) > 1:
            total -= len(self.train_t[0])
            del self.train_h[0], self.train_t[0], self.train_y[0]

    def _update(self) -> None:
        self.new_samples = 0
        H, T, Y = torch.cat(self.train_h), torch.cat(self.train_t), torch.cat(self.train_y)
        n = len(T)
        weights = torch.linspace(0.25, 1.0, n)  # recency-weighted: the newest samples 4x the oldest
        for _ in range(self.steps):
            idx = torch.multinomial(weights, min(self.batch, n), replacement=False, generator=self.gen)
            self.trainer.learn(AdaptiveFeatures(H[idx], T[idx]), Y[idx])
        self.stats.updates += 1
        assert self.hold is not None
        feats, y = AdaptiveFeatures(self.hold[0], self.hold[1]), self.hold[2]
        new, old = chain_score(self.trainer, feats, y), chain_score(self.serving, feats, y)
        if new > old + self.margin:
            with torch.no_grad():
                for dst, src in zip(self.serving.parameters(), self.trainer.parameters()):
                    dst.copy_(src)  # in place: the serving head's tensors keep their identity
            self.version += 1
            self.stats.published += 1
            self.stats.versions.append({"version": self.version, "at_step": self.step, "gate_new": new,
                                        "gate_old": old})
        else:
            self.stats.rejected += 1

"""The trainer step: online AdamW updates of the adaptive head from replay-buffer batches.

The head is the servers' `AdaptiveHead` (same base, same code), so what the gate scores and what gets
published is exactly what the servers will run. AdamW moments are exported by parameter name so a
checkpoint restores the optimizer too (no pickle anywhere).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from adaspec.core.heads.adaptive import IGNORE, AdaptiveFeatures, AdaptiveHead
from adaspec.core.online.weights import copy_into


class Trainer:
    """Owns the candidate head; counts updates, trained tokens, loss and throughput."""

    def __init__(self, head: AdaptiveHead, unroll: int) -> None:
        self.head = head.eval()
        self.unroll = unroll
        self.updates = 0
        self.trained_tokens = 0
        self.last_loss = float("nan")
        self.tokens_per_s = 0.0
        self.train_s = 0.0

    def step(self, features: AdaptiveFeatures, targets: Tensor) -> dict[str, float]:
        """One AdamW update on a batch; returns loss, first-position accuracy, tokens and seconds."""
        tgt = targets[:, : self.unroll]
        tokens = int((tgt != IGNORE).sum())
        t0 = time.perf_counter()
        report = self.head.learn(features, tgt)
        dt = time.perf_counter() - t0
        self.updates += 1
        self.trained_tokens += tokens
        self.train_s += dt
        self.last_loss = float(report.get("loss", float("nan")))
        rate = tokens / dt if dt > 0 else 0.0
        self.tokens_per_s = rate if self.updates == 1 else 0.8 * self.tokens_per_s + 0.2 * rate
        return {**report, "tokens": float(tokens), "seconds": dt}

    # -- state ----------------------------------------------------------------------------------------------
    def weights(self) -> dict[str, Tensor]:
        """A detached CPU copy of the trainable weights (what gets published)."""
        return {k: v.detach().to("cpu").clone() for k, v in self.head.state_dict().items()}

    def load_weights(self, weights: dict[str, Tensor], reset_optimizer: bool = True) -> None:
        """Copy `weights` into the head in place; by default forget AdamW moments (they belong to other weights)."""
        copy_into(self.head.state_dict(keep_vars=True), weights)
        if reset_optimizer:
            self.head.reset_optimizer()

    def optimizer_state(self) -> tuple[dict[str, dict[str, Tensor]], int]:
        """AdamW moments by parameter name, and the step count ({} and 0 before the first update)."""
        opt = self.head._optimizer
        if opt is None:
            return {}, 0
        sd = opt.state_dict()["state"]
        out: dict[str, dict[str, Tensor]] = {}
        step = 0
        for i, (name, _) in enumerate(self.head.named_parameters()):
            st = sd.get(i)
            if st:
                out[name] = {"exp_avg": st["exp_avg"].clone(), "exp_avg_sq": st["exp_avg_sq"].clone()}
                step = max(step, int(float(st["step"])))
        return out, step

    def load_optimizer_state(self, moments: dict[str, dict[str, Tensor]], step: int) -> None:
        names = [n for n, _ in self.head.named_parameters()]
        if not moments or set(moments) != set(names):
            self.head.reset_optimizer()
            return
        opt = self.head.optimizer()
        sd = opt.state_dict()
        sd["state"] = {
            i: {"step": torch.tensor(float(step)), "exp_avg": moments[n]["exp_avg"],
                "exp_avg_sq": moments[n]["exp_avg_sq"]}
            for i, n in enumerate(names)
        }
        opt.load_state_dict(sd)

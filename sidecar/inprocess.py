"""The sidecar's learning pipeline driven synchronously inside one process (the drift benchmark).

Same pieces as `SidecarService` -- per-tenant `ReplayBuffer` (train) and held-out buffer (split per request
by the same crc32 rule), the `Trainer`'s AdamW updates paced by `replay_ratio`, the evaluation `gate` every
`gate_every` updates -- minus sockets, threads and wall-clock expiry, so a run is deterministic: samples
arrive when the engine finishes a request, updates run between engine steps, and a published candidate is
copied in place into the serving drafter's head (what a weight swap does in a server).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from adaspec.core.drafters.adaptive import AdaptiveDrafter
from adaspec.core.heads.adaptive import AdaptiveFeatures, AdaptiveHead
from adaspec.core.online.weights import copy_into
from adaspec.sidecar.gate import decide
from adaspec.sidecar.buffer import ReplayBuffer
from adaspec.sidecar.samples import Samples, is_heldout
from adaspec.sidecar.settings import SidecarSettings
from adaspec.sidecar.trainer import Trainer


@dataclass
class InProcessStats:
    updates: int = 0
    samples: int = 0
    heldout_samples: int = 0
    gates: int = 0
    versions: list[dict] = field(default_factory=list)  # {version, at_step, candidate_tau, serving_tau}


class InProcessSidecar:
    """Attach to a collecting `AdaptiveDrafter`; call `between_steps()` from the engine's hook of that name."""

    def __init__(self, drafter: AdaptiveDrafter, settings: SidecarSettings | None = None,
                 tenant_key: str = "server") -> None:
        self.s = s = settings or SidecarSettings()
        self.drafter = drafter
        self.serving: AdaptiveHead = drafter.head
        width = s.target_width()
        drafter.unroll = width  # samples carry as many targets as training and the gate read
        cand = AdaptiveHead(self.serving.cfg, self.serving.embed_weight, self.serving.lm_head_weight)
        cand.load_state_dict(self.serving.state_dict())
        cand.set_draft_vocab(self.serving.draft_ids)
        cand.to(self.serving.up.weight.device)
        for g in cand.optimizer().param_groups:
            g["lr"] = s.lr
        self.trainer = Trainer(cand, s.unroll)
        d = self.serving.cfg.hidden_size
        self.buffer = ReplayBuffer(d, width, s.tenant_capacity, s.max_tenants, s.recency_half_life,
                                   s.tenant_balance, seed=s.seed)
        self.holdout = ReplayBuffer(d, width, s.holdout_capacity, s.max_tenants, s.recency_half_life,
                                    s.tenant_balance, seed=s.seed + 1)
        self.tenant_key = tenant_key
        self.budget = 0.0
        self.version = 0
        self.step = 0
        self._updates_at_gate = 0
        self.stats = InProcessStats()
        drafter.on_experience = self._on_experience

    def _heldout(self, request_id: str) -> bool:
        return is_heldout(self.tenant_key, request_id, self.s.holdout_fraction)

    def _on_experience(self, request_id: str, feats: AdaptiveFeatures, targets: Tensor) -> None:
        held = self._heldout(request_id)
        g = Samples("default", held, feats.hidden.float(), feats.tokens.long(), targets.long())
        if held:
            self.stats.heldout_samples += self.holdout.add(g, require_full=True)
        else:
            n = self.buffer.add(g)
            self.stats.samples += n
            self.budget = min(self.budget + n * self.s.replay_ratio / self.s.batch_size, 4.0 * self.s.gate_every)

    def between_steps(self) -> None:
        self.step += 1
        s = self.s
        while self.budget >= 1.0 and len(self.buffer) >= s.min_samples:
            batch = self.buffer.sample(s.batch_size)
            if batch is None:
                break
            self.budget -= 1.0
            self.trainer.step(*batch)
            self.stats.updates += 1
            if self.trainer.updates - self._updates_at_gate >= s.gate_every:
                self._gate()

    def _gate(self) -> None:
        s = self.s
        self._updates_at_gate = self.trainer.updates
        held = self.holdout.newest(s.gate_max_samples)
        if held is None:
            return
        self.stats.gates += 1
        d = decide(self.trainer.head, self.serving, held[0], held[1], s.gate_k, s.gate_margin, s.gate_min_samples)
        if d.publish:
            # in place: the serving head's tensors keep their identity (a server's swap)
            copy_into(self.serving.state_dict(keep_vars=True), self.trainer.head.state_dict())
            self.version += 1
            self.drafter.weight_version = self.version
            self.stats.versions.append({"version": self.version, "at_step": self.step,
                                        "candidate_tau": d.candidate_tau, "serving_tau": d.serving_tau})

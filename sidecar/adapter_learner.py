"""Online learning of the static head's adapter (the adaptive speculator of kind `adapter`).

Streams, not rows: the adapter's attention reads the whole committed context, so a training example is one
finished request -- the target features at all its positions (prompt included) and its tokens -- and an
update is the EAGLE-3 training-time test over a few of them, unrolled `unroll` steps, with the static head
frozen underneath. Labels are the target's own greedy tokens (exactly what acceptance compares with); a label
outside the head's draft vocabulary is masked (the head cannot draft it); prompt positions count at
`prompt_weight`. The gate replays held-out streams: greedy acceptance is exact under teacher forcing (a chain
is the true continuation for as long as it is accepted), so the gate scores exactly what servers would run.

Driven synchronously between engine steps (the drift benchmark), deterministic for a given stream.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from adaspec.core.drafters.static_adapted import AdaptedStaticDrafter, AdapterStream
from adaspec.core.heads.static_adapter import StaticAdapter
from adaspec.core.online.weights import copy_into
from adaspec.sidecar.samples import is_heldout


NO_LABEL = -1  # past the stream's end
OUTSIDE = -2  # the target's token is not in the head's draft vocabulary


@dataclass(frozen=True)
class AdapterLearnerSettings:
    unroll: int = 4
    streams_per_batch: int = 4
    #: AdamW updates per finished training request (each stream is drawn ~ this x streams_per_batch times
    #: while it is among the most recent: the replay ratio).
    updates_per_request: float = 2.0
    half_life_requests: float = 200.0
    buffer_positions: int = 32_768
    holdout_fraction: float = 0.15
    holdout_streams: int = 16
    gate_every: int = 8
    gate_k: int = 6
    gate_margin: float = 0.0
    gate_min_roots: int = 64
    prompt_weight: float = 0.5
    step_decay: float = 0.8
    max_len: int = 1024
    #: Rows per stream an update computes: output rows (a random subset beyond this) + sampled prompt rows.
    max_rows: int = 128
    prompt_rows: int = 32
    lr: float = 2e-3
    seed: int = 0


@dataclass
class AdapterLearnerStats:
    updates: int = 0
    streams: int = 0
    heldout_streams: int = 0
    samples: int = 0  # training positions (draft roots) received, as the MLP learner counts rows
    heldout_samples: int = 0
    gates: int = 0
    versions: list[dict] = field(default_factory=list)
    last_loss: float = float("nan")


@dataclass
class TTTBatch:
    aux: Tensor  # [B, T, width] target features
    tokens: Tensor  # [B, T+steps-1]: index t+i holds token t+1+i
    valid: Tensor  # [B, T]
    rows: list[Tensor]  # per stream: the positions computed (chain roots)
    targets: Tensor  # [R, steps] draft-vocab index of token t+2+i at each row; NO_LABEL / OUTSIDE
    weights: Tensor  # [R] loss weight (prompt rows lighter)


def make_batch(adapter: StaticAdapter, streams: Sequence[AdapterStream], steps: int, max_len: int,
               prompt_weight: float, gen: torch.Generator | None = None, max_rows: int = 0,
               prompt_rows: int = 0, gate: bool = False) -> TTTBatch:
    """Pad streams into one batch and pick the rows to compute. Training (`gate` False): every output row (a
    random `max_rows` of them if more) and `prompt_rows` random prompt rows at `prompt_weight`. Gate: every
    output root whose whole chain has labels."""
    head = adapter.head
    dev = head.fc.weight.device
    T = min(max_len, max(len(s) for s in streams))
    B, width = len(streams), streams[0].aux.shape[1]
    aux = torch.zeros(B, T, width, dtype=head.dtype)
    tokens = torch.zeros(B, T + steps - 1, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    rows, targets, weights = [], [], []
    lut = None
    if head.draft_ids is not None:
        lut = torch.full((head.cfg.vocab_size,), OUTSIDE, dtype=torch.long)
        lut[head.draft_ids.cpu()] = torch.arange(len(head.draft_ids))
    for b, s in enumerate(streams):
        n = min(len(s), T)
        off = len(s) - n  # a long stream keeps its last T positions (RoPE is relative: only context is lost)
        aux[b, :n] = s.aux[off:].to(head.dtype)
        own = s.tokens[off:]  # [n + 1]
        k = min(n, T + steps - 1)
        tokens[b, :k] = own[1 : k + 1]
        valid[b, :n] = True
        abs_tok = torch.cat([own, torch.full((steps + 1,), NO_LABEL, dtype=torch.long)])
        prompt_len = s.prompt_len - off
        t = torch.arange(n)
        lab = torch.stack([abs_tok[t + 2 + i] for i in range(steps)], dim=1)  # [n, steps]
        if lut is not None:
            lab = torch.where(lab >= 0, lut[lab.clamp(min=0)], lab)
        out_first = max(0, prompt_len - (1 if gate else 2))  # root t's first draft predicts token t+2
        if gate:
            pick = t[out_first:][lab[out_first:, steps - 1] != NO_LABEL]
            w = torch.ones(len(pick))
        else:
            out = t[out_first:][lab[out_first:, 0] != NO_LABEL]
            if max_rows and len(out) > max_rows:
                out = out[torch.randperm(len(out), generator=gen)[:max_rows]].sort().values
            prm = t[:out_first]
            if len(prm) > prompt_rows:
                prm = prm[torch.randperm(len(prm), generator=gen)[:prompt_rows]].sort().values
            pick = torch.cat([prm, out])
            w = torch.cat([torch.full((len(prm),), prompt_weight), torch.ones(len(out))])
        rows.append(pick)
        targets.append(lab[pick])
        weights.append(w)
    return TTTBatch(aux.to(dev), tokens.to(dev), valid.to(dev), rows, torch.cat(targets).to(dev),
                    torch.cat(weights).to(dev))


def ttt_loss(adapter: StaticAdapter, batch: TTTBatch, steps: int, decay: float) -> Tensor:
    outs = adapter.chain_forward(batch.tokens, batch.aux, batch.valid, steps, batch.rows)
    w_lm = adapter.head.lm_head_weight.float()
    total = torch.zeros((), device=batch.aux.device)
    wsum = 0.0
    for i, hid in enumerate(outs):
        y = batch.targets[:, i]
        keep = y >= 0
        if not bool(keep.any()):
            break
        logits = hid[keep].float() @ w_lm.T  # [N, V_draft]
        per = F.cross_entropy(logits, y[keep], reduction="none")
        w = batch.weights[keep]
        total = total + (decay**i) * (per * w).sum() / w.sum().clamp(min=1e-9)
        wsum += decay**i
    return total / max(wsum, 1e-9)


@torch.no_grad()
def accepted_lengths(adapter: StaticAdapter, batch: TTTBatch, k: int) -> Tensor:
    """Greedy accepted length [R] of a k-chain at every gate row (exact: teacher forcing is the chain for as
    long as it is accepted); a label outside the draft vocabulary is a rejection."""
    outs = adapter.chain_forward(batch.tokens, batch.aux, batch.valid, k, batch.rows)
    w_lm = adapter.head.lm_head_weight.float()
    ok = [(hid.float() @ w_lm.T).argmax(-1) == batch.targets[:, i] for i, hid in enumerate(outs)]
    if not ok or not len(ok[0]):
        return torch.zeros(0, dtype=torch.long)
    return torch.stack(ok, -1).long().cumprod(-1).sum(-1)


class AdapterLearner:
    """Attach to an `AdaptedStaticDrafter` (collecting); call `between_steps()` from the engine's hook."""

    def __init__(self, drafter: AdaptedStaticDrafter, settings: AdapterLearnerSettings | None = None) -> None:
        self.s = s = settings or AdapterLearnerSettings()
        self.drafter = drafter
        self.serving = drafter.adapter
        self.candidate = StaticAdapter(self.serving.head, self.serving.cfg)
        self.candidate.load_state_dict(self.serving.state_dict())
        for g in self.candidate.optimizer().param_groups:
            g["lr"] = s.lr
        self.train: collections.deque[AdapterStream] = collections.deque()
        self.held: collections.deque[AdapterStream] = collections.deque(maxlen=s.holdout_streams)
        self._positions = 0
        self.budget = 0.0
        self.version = 0
        self.step = 0
        self._updates_at_gate = 0
        self._gen = torch.Generator().manual_seed(s.seed)
        self.stats = AdapterLearnerStats()
        drafter.on_experience = self._on_experience

    def _heldout(self, request_id: str) -> bool:
        return is_heldout("adapter", request_id, self.s.holdout_fraction)

    def _on_experience(self, stream: AdapterStream) -> None:
        if len(stream) < 4:
            return
        if self._heldout(stream.request_id):
            self.held.append(stream)
            self.stats.heldout_streams += 1
            self.stats.heldout_samples += len(stream)
            return
        self.train.append(stream)
        self._positions += len(stream)
        while self._positions > self.s.buffer_positions and len(self.train) > 1:
            self._positions -= len(self.train.popleft())
        self.stats.streams += 1
        self.stats.samples += len(stream)
        self.budget = min(self.budget + self.s.updates_per_request, 4.0 * self.s.gate_every)

    def _draw(self) -> list[AdapterStream]:
        n = len(self.train)
        age = torch.arange(n - 1, -1, -1, dtype=torch.float64)  # 0 = newest
        w = torch.exp2(-age / self.s.half_life_requests)
        picks = torch.multinomial(w / w.sum(), min(self.s.streams_per_batch, n), replacement=False,
                                  generator=self._gen).tolist()
        return [self.train[i] for i in picks]

    def between_steps(self) -> None:
        self.step += 1
        while self.budget >= 1.0 and self.train:
            self.budget -= 1.0
            self.update(self._draw())
            if self.stats.updates - self._updates_at_gate >= self.s.gate_every:
                self.gate()

    def update(self, streams: Sequence[AdapterStream]) -> float:
        s = self.s
        batch = make_batch(self.candidate, streams, s.unroll, s.max_len, s.prompt_weight, self._gen,
                           s.max_rows, s.prompt_rows)
        with torch.inference_mode(False), torch.enable_grad():
            self.candidate.train()
            opt = self.candidate.optimizer()
            loss = ttt_loss(self.candidate, batch, s.unroll, s.step_decay)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.candidate.parameters(), self.candidate.cfg.grad_clip)
            opt.step()
            self.candidate.eval()
        self.stats.updates += 1
        self.stats.last_loss = float(loss.detach())
        return self.stats.last_loss

    def mean_accepted(self, adapter: StaticAdapter, streams: Sequence[AdapterStream]) -> tuple[float, int]:
        if not streams:
            return 0.0, 0
        batch = make_batch(adapter, streams, self.s.gate_k, self.s.max_len, 1.0, gate=True)
        acc = accepted_lengths(adapter, batch, self.s.gate_k)
        return (float(acc.float().mean()) if len(acc) else 0.0), int(len(acc))

    def gate(self) -> bool:
        s = self.s
        self._updates_at_gate = self.stats.updates
        held = list(self.held)
        if not held:
            return False
        self.stats.gates += 1
        cand, n = self.mean_accepted(self.candidate, held)
        serv, _ = self.mean_accepted(self.serving, held)
        if n < s.gate_min_roots or not math.isfinite(cand) or cand <= serv * (1.0 + s.gate_margin):
            return False
        copy_into(self.serving.state_dict(keep_vars=True), self.candidate.state_dict())  # in place: a swap
        self.version += 1
        self.drafter.weight_version = self.version
        self.stats.versions.append({"version": self.version, "at_step": self.step, "candidate_tau": 1.0 + cand,
                                    "serving_tau": 1.0 + serv})
        return True

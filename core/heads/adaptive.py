"""The adaptive head: a light MLP drafter, cheap enough to fine-tune online from live traffic.

No attention, no KV cache: from the target's final normed hidden h_t (layer -1, what the target's own LM
head reads at position t) and the embedding of token t+1 (the token the target just emitted there), it
predicts a hidden g whose LM-head logits give token t+2:

    g = h + down(silu(up(cat(rmsnorm(h), rmsnorm(embed(token))))))      # `down` starts at zero

Residual-friendly init: at step 0 g == h, so the head starts as a valid distribution in the target's own
hidden space (it repeats the target's last prediction) and every update is a small correction to it,
which keeps online AdamW steps stable. Chains of k > 1 feed g back as the next h, EAGLE-style, with the
drafted token as the next input; `learn` trains exactly that unroll (teacher-forced tokens, own hidden).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

from torch import Tensor, nn

from adaspec.kernels import dispatch
from adaspec.core import fsio
from adaspec.core.heads.eagle3 import RMSNorm

IGNORE = -100


@dataclass(frozen=True)
class AdaptiveConfig:
    hidden_size: int
    vocab_size: int
    inner_size: int = 1024
    rms_norm_eps: float = 1e-5
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    #: Loss weight of unroll step j is decay**j (later chain positions matter less, as in EAGLE-3).
    step_decay: float = 0.8

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AdaptiveFeatures:
    """Training inputs: h_t [N, d] (target layer -1 at position t) and token t+1 [N]."""

    hidden: Tensor
    tokens: Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def features_from_stream(
    hidden: Tensor, tokens: Tensor | list[int], unroll: int = 1, first: int = 0
) -> tuple[AdaptiveFeatures, Tensor]:
    """Samples from one sequence: hidden [T, d] at positions 0..T-1, tokens [T+1] (token T = the last emitted).

    Sample t (t >= first) is (h_t, token t+1) with targets token t+2 .. t+1+unroll (IGNORE past the end).
    Returns (features, target_tokens [N, unroll]).
    """
    tok = torch.as_tensor(tokens, dtype=torch.long)
    T = hidden.shape[0]
    if tok.shape[0] != T + 1:
        raise ValueError(f"need T+1={T + 1} tokens for {T} hidden rows, got {tok.shape[0]}")
    t = torch.arange(first, max(first, T - 1))
    padded = torch.cat([tok, torch.full((unroll,), IGNORE, dtype=torch.long)])
    if not len(t):
        return AdaptiveFeatures(hidden[:0], tok[:0]), torch.zeros(0, unroll, dtype=torch.long)
    targets = torch.stack([padded[t + 2 + j] for j in range(unroll)], dim=1)
    return AdaptiveFeatures(hidden[t], tok[t + 1]), targets


@torch.no_grad()
def distill_targets(
    hidden: Tensor, targets: Tensor, lm_head_weight: Tensor, topk: int = 32, first: int = 0
) -> tuple[Tensor, Tensor]:
    """The target's own top-k logits for every (sample, unroll step) of one stream's `features_from_stream`.

    Free soft labels: the target's distribution over token t+2+j is its LM head on h_{t+1+j}, a row of the same
    stream's hidden states (which the logs already carry). hidden [T, d] (the stream's rows), targets [N, U] from
    `features_from_stream(..., first)` (sample i = row first + i). Where h_{t+1+j} is not in the stream (the
    last emitted tokens), the label is the hard target (one-hot). Returns (ids, logits), each [N, U, topk], for
    `AdaptiveHead.loss(..., target_topk_logits=...)`.
    """
    N, U = targets.shape
    ids = torch.zeros(N, U, topk, dtype=torch.long)
    logits = torch.full((N, U, topk), -1e4)
    if N == 0:
        return ids, logits
    # row r -> the target's top-k logits for the token at r + 1 (once per row; unroll steps share rows)
    top_v, top_i = (hidden.float() @ lm_head_weight.float().T).topk(topk, -1)
    rows = torch.arange(N) + first
    for j in range(U):
        src = rows + 1 + j
        have = src < hidden.shape[0]
        src = src.clamp(max=hidden.shape[0] - 1)
        ids[:, j], logits[:, j] = top_i[src], top_v[src]
        hard = ~have
        ids[hard, j, 0] = targets[hard, j].clamp(min=0)
        logits[hard, j, 0] = 0.0
        logits[hard, j, 1:] = -1e4
    return ids, logits


class AdaptiveHead(nn.Module):
    """MLP over [h, embed(token)] -> residual hidden -> the target's frozen LM head."""

    def __init__(self, cfg: AdaptiveConfig, embed_weight: Tensor, lm_head_weight: Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.hidden_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.embed_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.up = nn.Linear(2 * d, cfg.inner_size, bias=False)
        self.down = nn.Linear(cfg.inner_size, d, bias=False)
        nn.init.zeros_(self.down.weight)
        object.__setattr__(self, "embed_weight", embed_weight.detach())
        object.__setattr__(self, "lm_head_weight", lm_head_weight.detach())
        self.draft_ids: Tensor | None = None
        self.draft_lm_head: Tensor = self.lm_head_weight
        self._draft_lut: Tensor | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    def set_draft_vocab(self, ids: Tensor | None) -> None:
        """Draft over a subset of the vocabulary (EAGLE-3's d2t idea): each drafted token then reads only
        those LM-head rows, the dominant cost of a light head. Training still uses the full vocabulary."""
        if ids is None:
            self.draft_ids, self.draft_lm_head, self._draft_lut = None, self.lm_head_weight, None
            return
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.lm_head_weight.device)
        self.draft_ids, self.draft_lm_head = ids, self.lm_head_weight[ids]
        lut = torch.full((self.cfg.vocab_size,), -1, dtype=torch.long, device=ids.device)
        lut[ids] = torch.arange(len(ids), device=ids.device)
        self._draft_lut = lut  # target id -> draft index, -1 outside

    @classmethod
    def for_target(cls, target: Any, inner_size: int = 1024, seed: int = 0, **overrides: Any) -> "AdaptiveHead":
        model = target.model
        cfg = AdaptiveConfig(
            hidden_size=int(model.config.hidden_size),
            vocab_size=int(model.get_output_embeddings().weight.shape[0]),
            inner_size=inner_size,
            rms_norm_eps=float(getattr(model.config, "rms_norm_eps", 1e-5)),
            **overrides,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = cls(cfg, model.get_input_embeddings().weight, model.get_output_embeddings().weight)
        return head.to(target.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.up.weight.dtype

    def step(self, hidden: Tensor, tokens: Tensor) -> Tensor:
        """One draft position: h [N, d], token [N] -> g [N, d] (g's logits predict the token after `tokens`)."""
        h = hidden.to(self.dtype)
        e = F.embedding(tokens, self.embed_weight).to(self.dtype)
        x = torch.cat([self.hidden_norm(h), self.embed_norm(e)], dim=-1)
        return h + self.down(F.silu(self.up(x)))

    @torch.inference_mode()
    def draft(self, hidden: Tensor, tokens: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Greedy chains of k tokens: ids [N, k] and their softmax probabilities [N, k]."""
        ids, probs = [], []
        h, tok = hidden, tokens
        for _ in range(k):
            h = self.step(h, tok)
            i, p = dispatch.draft_topk(h, self.draft_lm_head, 1)
            tok = i[:, 0] if self.draft_ids is None else self.draft_ids[i[:, 0]]
            ids.append(tok)
            probs.append(p[:, 0])
        return torch.stack(ids, 1), torch.stack(probs, 1)

    # -- online learning ----------------------------------------------------------------------------------
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(
                self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, betas=(0.9, 0.98)
            )
        return self._optimizer

    def loss(
        self, features: AdaptiveFeatures, target_tokens: Tensor,
        target_topk_logits: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Unrolled loss: step j reads its own previous hidden and the true token; weight decay**j.

        target_tokens [N] or [N, U] (IGNORE = no target). target_topk_logits, optional (ids, logits) each
        [N, U, k]: the target's top-k logits; then the loss is the soft cross-entropy against their softmax.
        With a draft vocabulary the softmax is over it (what the head drafts from when served, at a fraction of
        the cost): a target outside it is masked, and soft labels keep their ids inside it.
        """
        dev = self.up.weight.device
        tgt = target_tokens.to(dev).long()
        tgt = tgt.unsqueeze(1) if tgt.dim() == 1 else tgt
        h = features.hidden.to(dev).clone()
        tok = features.tokens.to(dev).long().clone()
        alive = torch.ones_like(tok, dtype=torch.bool)
        total, weight_sum, correct, counted = h.new_zeros((), dtype=torch.float32), 0.0, 0, 0
        for j in range(tgt.shape[1]):
            y = tgt[:, j]
            keep = alive & (y != IGNORE)
            if not bool(keep.any()):
                break
            h = self.step(h, tok)
            lut = self._draft_lut
            logits = h.float() @ self.draft_lm_head.float().T  # [N, V_draft] (the full V without one)
            y_d = y.clamp(min=0) if lut is None else lut[y.clamp(min=0)]
            if target_topk_logits is not None:
                ids, tl = (t.to(dev) for t in target_topk_logits)
                ids_j, tl_j = ids[:, j].long(), tl[:, j].float()
                if lut is not None:
                    ids_j = lut[ids_j]
                    tl_j = tl_j.masked_fill(ids_j < 0, float("-inf"))
                    keep = keep & (ids_j >= 0).any(-1)
                logp = torch.log_softmax(logits, -1).gather(-1, ids_j.clamp(min=0))
                p = torch.softmax(tl_j, -1).nan_to_num(0.0)
                per = -(p * logp).sum(-1)
            else:
                keep = keep & (y_d >= 0)
                per = F.cross_entropy(logits, y_d.clamp(min=0), reduction="none")
            w = self.cfg.step_decay**j
            if bool(keep.any()):
                total = total + w * per[keep].mean()
                weight_sum += w
            if j == 0:
                correct, counted = int((logits.argmax(-1) == y_d)[keep].sum()), int(keep.sum())
            alive = keep
            tok = y.clamp(min=0)
        loss = total / max(weight_sum, 1e-9)
        return loss, {"acc": correct / max(counted, 1), "tokens": float(counted)}

    def learn(
        self, features: AdaptiveFeatures, target_tokens: Tensor,
        target_topk_logits: tuple[Tensor, Tensor] | None = None, steps: int = 1,
    ) -> dict[str, float]:
        """`steps` AdamW steps (grad-norm clipped) on one batch; returns the first step's loss/acc and tokens."""
        report: dict[str, float] = {}
        with torch.inference_mode(False), torch.enable_grad():
            feats = AdaptiveFeatures(features.hidden.clone(), features.tokens.clone())
            tgt = target_tokens.clone()
            topk = None if target_topk_logits is None else tuple(t.clone() for t in target_topk_logits)
            self.train()
            opt = self.optimizer()
            for s in range(steps):
                loss, stats = self.loss(feats, tgt, topk)  # type: ignore[arg-type]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.parameters(), self.cfg.grad_clip)
                opt.step()
                if s == 0:
                    report = {"loss": float(loss.detach()), **stats}
            self.eval()
        return report

    @torch.inference_mode()
    def accuracy(self, features: AdaptiveFeatures, target_tokens: Tensor) -> float:
        """Top-1 agreement of the first draft token with target_tokens[:, 0] (a quick held-out metric)."""
        tgt = target_tokens if target_tokens.dim() == 1 else target_tokens[:, 0]
        keep = tgt != IGNORE
        if not bool(keep.any()):
            return 0.0
        g = self.step(features.hidden.to(self.up.weight.device), features.tokens.to(self.up.weight.device))
        pred = dispatch.draft_topk(g, self.lm_head_weight, 1)[0][:, 0].cpu()
        return float((pred == tgt)[keep].float().mean())

    def reset_optimizer(self) -> None:
        """Forget AdamW moments (after a weight swap from elsewhere, the old moments no longer apply)."""
        self._optimizer = None


def save_adaptive(head: AdaptiveHead, path: Path | str) -> Path:
    """Write the head's trainable tensors (safetensors, atomic) with its config in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    return fsio.save_safetensors(tensors, path, {"adaspec_adaptive": json.dumps(head.cfg.to_json())})


def load_adaptive(path: Path | str, target: Any, **overrides: Any) -> AdaptiveHead:
    """A head for `target` with the weights of `path` (its width is read from the file, not assumed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adaptive head {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("adaspec_adaptive", "{}"))
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    inner = int(tensors["up.weight"].shape[0]) if "up.weight" in tensors else int(meta.get("inner_size", 1024))
    keep = {k: meta[k] for k in ("lr", "weight_decay", "grad_clip", "step_decay") if k in meta}
    head = AdaptiveHead.for_target(target, inner_size=inner, **{**keep, **overrides})
    head.load_state_dict({k: v.to(head.up.weight.device, head.dtype) for k, v in tensors.items()}, strict=True)
    return head

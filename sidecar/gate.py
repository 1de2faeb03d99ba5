"""The evaluation gate: replay held-out traffic to estimate tau, publish a candidate only if it beats serving.

For every held-out sample (h_t, token t+1, the target's next `k` tokens) the head drafts a greedy chain of k
tokens exactly as the serving drafter would from that root (its own hidden fed back), and the chain is
verified against the logged target tokens: accepted = the length of the matching prefix. The estimate is
tau = 1 + mean(accepted), the tokens one target forward would yield at a fixed lookahead k under greedy
verification. Candidate and serving heads are scored on the same samples, so traffic drift cancels out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from adaspec.kernels import dispatch
from adaspec.core.heads.adaptive import IGNORE, AdaptiveFeatures, AdaptiveHead


@torch.inference_mode()
def replay_accepted(head: AdaptiveHead, features: AdaptiveFeatures, targets: Tensor, k: int) -> Tensor:
    """Accepted draft length per sample [N] when `head` drafts k tokens from each root (IGNORE ends a chain).

    Rows whose chain already failed are dropped from later positions, so the cost is ~ N x (1 + acceptance).
    """
    dev = head.up.weight.device
    n = int(features.tokens.shape[0])
    tgt = targets[:, :k].to(dev)
    accepted = torch.zeros(n, dtype=torch.long, device=dev)
    alive = torch.arange(n, device=dev)
    h = features.hidden.to(dev)
    tok = features.tokens.to(dev)
    for j in range(min(k, tgt.shape[1])):
        if alive.numel() == 0:
            break
        g = head.step(h, tok)
        ids = dispatch.draft_topk(g, head.draft_lm_head, 1)[0][:, 0]  # the vocabulary it drafts over when served
        if head.draft_ids is not None:
            ids = head.draft_ids[ids]
        want = tgt[alive, j]
        ok = (ids == want) & (want != IGNORE)
        accepted[alive[ok]] += 1
        alive, h, tok = alive[ok], g[ok], ids[ok]
    return accepted.cpu()


def estimate_tau(head: AdaptiveHead, features: AdaptiveFeatures, targets: Tensor, k: int) -> float:
    """1 + mean accepted chain length over the samples (0.0 for no samples)."""
    if len(features) == 0:
        return 0.0
    return 1.0 + float(replay_accepted(head, features, targets, k).float().mean())


@dataclass(frozen=True)
class GateDecision:
    publish: bool
    candidate_tau: float
    serving_tau: float
    samples: int
    reason: str


def decide(
    candidate: AdaptiveHead,
    serving: AdaptiveHead,
    features: AdaptiveFeatures,
    targets: Tensor,
    k: int,
    margin: float,
    min_samples: int,
) -> GateDecision:
    """Publish iff there are enough held-out samples and candidate tau > serving tau x (1 + margin)."""
    n = len(features)
    if n < min_samples:
        return GateDecision(False, 0.0, 0.0, n, f"only {n} held-out samples (< {min_samples})")
    cand = estimate_tau(candidate, features, targets, k)
    serv = estimate_tau(serving, features, targets, k)
    if cand > serv * (1.0 + margin):
        return GateDecision(True, cand, serv, n, f"tau {cand:.3f} > {serv:.3f} x (1 + {margin:g})")
    return GateDecision(False, cand, serv, n, f"tau {cand:.3f} <= {serv:.3f} x (1 + {margin:g})")

"""Exact acceptance over a draft *tree* (torch reference): several drafters' chains verified in one forward.

A request's draft may be a small tree: branches that share a prefix (the suffix tree's chain and a head's
chain, or a head's top-2 at the first position). The target's forward scores every node; acceptance then
walks down from the root (the request's last pending token), at each node choosing among its children:

* greedy: the child whose token is the target's argmax there (the longest branch that matches), else stop
  and emit the argmax;
* sampling, for deterministic drafts (each child a point mass): recursive rejection over siblings, as in
  SpecInfer's multi-step speculative sampling (Miao et al. 2023, "SpecInfer", Algorithm 2, with q a point
  mass): try the children in node order; accept child x with the target's probability of x renormalised over
  what is left, p(x) / (1 - sum of the rejected siblings' p); on rejection remove x from the distribution and
  try the next sibling; when every child fails, sample the residual (p with the tried children removed). An
  accepted child becomes the new root; an accepted leaf emits a bonus sampled from the target there.

Why it is exact: the first child is emitted with probability p(x1); the second with (1 - p(x1)) * p(x2) /
(1 - p(x1)) = p(x2); any other token y with (1 - sum p(x_i)) * p(y) / (1 - sum p(x_i)) = p(y). So each emitted
token is distributed as the target's own sample, node by node; with one child per node this is exactly the
chain rule `rejection_verify_reference` applies with a point-mass q (the same uniforms give the same result).

Tree layout, per row b (N = the batch's node budget; nodes at index >= n_nodes[b] are padding):
  parents [B, N] int64: the parent node's index (always lower than the node's own), -1 for a root child;
  tokens [B, N] int64: the node's draft token;
  target rows [B, N+1, ...]: row 0 is the target at the root, row n+1 the target after node n.
Returns (accepted [B]: the accepted path's length, path [B, D]: its node ids, -1 padded, D = the deepest
path of the batch's trees (1 for a batch of empty trees), next_token [B]: the correction or bonus token).
"""

from __future__ import annotations

import torch
from torch import Tensor

from adaspec.kernels.reference import inverse_cdf_sample


def _children(parents: Tensor, n_nodes: Tensor) -> list[dict[int, list[int]]]:
    """Per row: parent id (-1 = root) -> its children's node ids in node order; checks the tree is well formed."""
    B, N = parents.shape
    out = []
    for b in range(B):
        n = int(n_nodes[b])
        if not 0 <= n <= N:
            raise ValueError(f"n_nodes[{b}] = {n} is outside [0, {N}]")
        kids: dict[int, list[int]] = {}
        for i, par in enumerate(parents[b, :n].tolist()):
            if not -1 <= par < i:
                raise ValueError(f"row {b}: node {i}'s parent {par} must be -1 or an earlier node")
            kids.setdefault(par, []).append(i)
        out.append(kids)
    return out


def _depth(paths: list[list[int]]) -> int:
    return max([len(p) for p in paths] + [1])


def _pack(paths: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    D = _depth(paths)
    path = torch.full((len(paths), D), -1, dtype=torch.long)
    for b, p in enumerate(paths):
        path[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    return torch.tensor([len(p) for p in paths], dtype=torch.long, device=device), path.to(device)


def tree_greedy_verify(parents: Tensor, n_nodes: Tensor, tokens: Tensor,
                       target_argmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The longest branch whose tokens are the target's argmax at each step; target_argmax [B, N+1]."""
    B, N = parents.shape
    if tuple(target_argmax.shape) != (B, N + 1):
        raise ValueError(f"target_argmax must be [{B}, {N + 1}], got {tuple(target_argmax.shape)}")
    kids = _children(parents, n_nodes)
    tok, am = tokens.tolist(), target_argmax.tolist()
    paths, nxt = [], []
    for b in range(B):
        node, path = -1, []
        while True:
            want = am[b][node + 1]
            step = next((c for c in kids[b].get(node, ()) if tok[b][c] == want), None)
            if step is None:
                break
            node = step
            path.append(node)
        paths.append(path)
        nxt.append(am[b][node + 1])
    accepted, path = _pack(paths, parents.device)
    return accepted, path, torch.tensor(nxt, dtype=torch.long, device=parents.device)


def tree_rejection_verify(parents: Tensor, n_nodes: Tensor, tokens: Tensor, target_probs: Tensor,
                          uniforms: Tensor, residual_uniforms: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Recursive rejection over siblings for deterministic drafts. target_probs [B, N+1, V] (normalised);
    uniforms [B, N]: node n's trial uses uniforms[b, n] (each node is tried at most once); residual_uniforms
    [B]: the final draw (residual or bonus). A residual with no mass left (the tried children held all of p,
    up to rounding) falls back to p there, as the chain rule does."""
    B, N = parents.shape
    V = target_probs.shape[-1]
    if target_probs.shape[:2] != (B, N + 1):
        raise ValueError(f"target_probs must be [{B}, {N + 1}, V], got {tuple(target_probs.shape)}")
    if tuple(uniforms.shape) != (B, N) or tuple(residual_uniforms.shape) != (B,):
        raise ValueError(f"uniforms must be [{B}, {N}] and residual_uniforms [{B}]")
    kids = _children(parents, n_nodes)
    tok = tokens.tolist()
    for b in range(B):
        if any(not 0 <= t < V for t in tok[b][: int(n_nodes[b])]):
            raise ValueError(f"row {b}: draft tokens must lie in [0, {V})")
    p_all = target_probs if target_probs.dtype == torch.float32 else target_probs.float()
    u = uniforms.tolist()
    paths, dists = [], []
    for b in range(B):
        node, path = -1, []
        while True:
            p = p_all[b, node + 1]
            residual, left, step = None, 1.0, None
            for c in kids[b].get(node, ()):
                x = tok[b][c]
                px = float(p[x]) if residual is None else float(residual[x])
                if left > 0.0 and u[b][c] < px / left:
                    step = c
                    break
                if residual is None:
                    residual = p.clone()
                residual[x] = 0.0
                left -= px
            if step is None:
                use = residual is not None and float(residual.sum()) > 0.0
                dists.append(residual if use else p)
                break
            node = step
            path.append(node)
        paths.append(path)
    next_token = inverse_cdf_sample(torch.stack(dists), residual_uniforms) if B else torch.zeros(0, dtype=torch.long)
    accepted, path = _pack(paths, parents.device)
    return accepted, path, next_token.to(parents.device)

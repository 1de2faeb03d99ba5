"""Chain drafts -> the token tensor of SGLang's topk-1 EAGLE verify input (no SGLang import here).

With `--speculative-eagle-topk 1` SGLang verifies one chain per request: `build_eagle_verify_input`
(sglang 0.5.17 `srt/speculative/eagle_worker_common.py`) takes `draft_tokens` [bs, S] (S = the batch's
`speculative_num_steps`), prepends each request's root (the previous bonus token) and builds the chain
mask, positions and retrieve indices from S alone -- never from the token values. So any chain of S tokens
per row is a valid verify input: the rows the controller gave to the suffix or adaptive drafter are written
over the EAGLE rows (or over an empty tensor when no request uses EAGLE this step) and everything downstream
(target verify, acceptance, KV bookkeeping, draft extend) is SGLang's own code, unchanged.

Verification decides acceptance from the target alone (greedy: draft == target argmax; sampling: SGLang's
target-only rule for deterministic drafts), so padding a short chain up to S is lossless whatever the pad.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Sequence

import torch
from torch import Tensor


def batch_steps(ks: Sequence[int], candidates: Sequence[int]) -> int:
    """The step count a batch runs: the smallest pre-captured candidate covering its longest chain
    (candidates sorted ascending; a chain longer than every candidate is cut to the largest)."""
    if not candidates:
        raise ValueError("no candidate step counts")
    want = max(ks, default=0)
    i = bisect_left(candidates, want)
    return candidates[i] if i < len(candidates) else candidates[-1]


def chain_rows(chains: Sequence[Sequence[int] | None], steps: int, pad: int = 0) -> tuple[Tensor, Tensor]:
    """(tokens [bs, steps] int64, use [bs] bool) on CPU: row i is chains[i] cut/padded to `steps`, `use[i]`
    False where chains[i] is None (the row keeps EAGLE's draft). A chain is padded with its own last token
    (or `pad` when empty)."""
    bs = len(chains)
    out = torch.full((bs, steps), pad, dtype=torch.int64)
    use = torch.zeros(bs, dtype=torch.bool)
    for i, c in enumerate(chains):
        if c is None:
            continue
        use[i] = True
        n = min(len(c), steps)
        if n:
            out[i, :n] = torch.as_tensor(list(c[:n]), dtype=torch.int64)
            out[i, n:] = int(c[n - 1])
    return out, use


def overlay_chains(
    eagle_tokens: Tensor | None, chains: Sequence[Sequence[int] | None], steps: int, device: torch.device | str
) -> Tensor:
    """The [bs, steps] draft tensor for the verify input: EAGLE's rows where chains[i] is None, the chain
    elsewhere. `eagle_tokens` may be None only when every row has a chain (EAGLE did not run)."""
    tokens, use = chain_rows(chains, steps)
    if eagle_tokens is None:
        if not bool(use.all()):
            raise ValueError("rows without a chain need EAGLE's draft tokens")
        return tokens.to(device, non_blocking=True)
    if tuple(eagle_tokens.shape) != (len(chains), steps):
        raise ValueError(f"EAGLE draft tokens {tuple(eagle_tokens.shape)} != ({len(chains)}, {steps})")
    if not bool(use.any()):
        return eagle_tokens
    dev = eagle_tokens.device
    return torch.where(use.to(dev).unsqueeze(1), tokens.to(dev, eagle_tokens.dtype), eagle_tokens)


def accepted_rows(accept_lens: Sequence[int], stride: int) -> list[int]:
    """Flat row index (into the verify's [bs * stride] outputs) of each request's last committed position:
    request i kept rows i*stride .. i*stride + accept_lens[i] - 1 (the root, then the accepted drafts)."""
    return [i * stride + a - 1 for i, a in enumerate(accept_lens)]

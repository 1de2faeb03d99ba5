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
from typing import Any, Sequence

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


def chain_rows(chains: Sequence[Sequence[int] | None], steps: int,
               pads: Sequence[int] | None = None) -> tuple[list[list[int]], list[bool]]:
    """(tokens [bs][steps], use [bs]) as plain lists: row i is chains[i] cut/padded to `steps`, `use[i]`
    False where chains[i] is None (the row keeps EAGLE's draft). A chain is padded with its own last token,
    an empty one with `pads[i]` (the request's last token; 0 without pads)."""
    tokens: list[list[int]] = []
    use: list[bool] = []
    for i, c in enumerate(chains):
        if c is None:
            tokens.append([0] * steps)
            use.append(False)
            continue
        row = [int(t) for t in c[:steps]]
        fill = row[-1] if row else (int(pads[i]) if pads is not None else 0)
        tokens.append(row + [fill] * (steps - len(row)))
        use.append(True)
    return tokens, use


class ChainStager:
    """Host->device staging of the chain rows, one copy per step from reused buffers.

    A pageable host tensor's `.to(device)` waits for the stream first, so right after the EAGLE draft launch
    it would block the host until the whole draft ran; from pinned memory the copy is truly asynchronous.
    The buffers are reused every step: before refilling, the host waits on the event recorded after the
    previous step's copy (long done by then: that step's verify results were read back)."""

    def __init__(self, max_bs: int, max_steps: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        self.host = torch.zeros((max_bs, max_steps + 1), dtype=torch.int64, pin_memory=pin)  # [bs, use + S]
        self.dev = torch.zeros((max_bs, max_steps + 1), dtype=torch.int64, device=self.device)
        self._copied: Any = None  # CUDA event after the last copy

    def stage(self, chains: Sequence[Sequence[int] | None], steps: int,
              pads: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """(tokens [bs, steps] int64, use [bs] bool) on the device, views into the staging buffer."""
        bs = len(chains)
        if bs > self.host.shape[0] or steps + 1 > self.host.shape[1]:  # beyond the sizes captured at start-up
            self.host = torch.zeros((max(bs, self.host.shape[0]), max(steps + 1, self.host.shape[1])),
                                    dtype=torch.int64, pin_memory=self.host.is_pinned())
            self.dev = torch.zeros_like(self.host, device=self.device)
        tokens, use = chain_rows(chains, steps, pads)
        if self._copied is not None:
            self._copied.synchronize()
        rows = torch.tensor([[int(u)] + t for u, t in zip(use, tokens)], dtype=torch.int64)  # [bs, 1 + S]
        host = self.host[:bs, : steps + 1]
        host.copy_(rows)
        dev = self.dev[:bs, : steps + 1]
        dev.copy_(host, non_blocking=host.is_pinned())
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        return dev[:, 1:], dev[:, 0].bool()


def overlay_chains(
    eagle_tokens: Tensor | None, chains: Sequence[Sequence[int] | None], steps: int, device: torch.device | str,
    pads: Sequence[int] | None = None, stager: ChainStager | None = None,
) -> Tensor:
    """The [bs, steps] draft tensor for the verify input: EAGLE's rows where chains[i] is None, the chain
    elsewhere. `eagle_tokens` may be None only when every row has a chain (EAGLE did not run)."""
    if eagle_tokens is None and any(c is None for c in chains):
        raise ValueError("rows without a chain need EAGLE's draft tokens")
    if eagle_tokens is not None and tuple(eagle_tokens.shape) != (len(chains), steps):
        raise ValueError(f"EAGLE draft tokens {tuple(eagle_tokens.shape)} != ({len(chains)}, {steps})")
    if eagle_tokens is not None and all(c is None for c in chains):
        return eagle_tokens
    stager = stager if stager is not None else ChainStager(len(chains), steps, device)
    tokens, use = stager.stage(chains, steps, pads)
    if eagle_tokens is None:
        return tokens
    return torch.where(use.unsqueeze(1), tokens.to(eagle_tokens.dtype), eagle_tokens)


def accepted_rows(accept_lens: Sequence[int], stride: int) -> list[int]:
    """Flat row index (into the verify's [bs * stride] outputs) of each request's last committed position:
    request i kept rows i*stride .. i*stride + accept_lens[i] - 1 (the root, then the accepted drafts)."""
    return [i * stride + a - 1 for i, a in enumerate(accept_lens)]

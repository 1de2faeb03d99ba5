"""The one-launch Triton greedy verifier against `greedy_verify_reference`, in the Triton interpreter."""

from __future__ import annotations

import itertools

import pytest
import torch

from adaspec.kernels.reference import greedy_verify_reference


def _exhaustive(K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (draft length L, first mismatch position m) pair; m == K means the whole draft matches."""
    rows = list(itertools.product(range(K + 1), range(K + 1)))
    B = len(rows)
    target = torch.arange(B * (K + 1)).view(B, K + 1) % 1000 + 10
    draft = target[:, :K].clone()
    lens = torch.empty(B, dtype=torch.long)
    for i, (L, m) in enumerate(rows):
        lens[i] = L
        if m < K:
            draft[i, m] = 0  # mismatch at m (target ids are >= 10)
        draft[i, L:] = target[i, L:K]  # padding that happens to match must still be ignored
    return draft, lens, target


def _check(verify, draft, lens, target):
    got = verify(draft, lens, target)
    want = greedy_verify_reference(draft, lens, target)
    for name, g, w in zip(("accepted", "next_token", "keep_len"), got, want):
        assert g.dtype == torch.int64 and g.shape == w.shape, name
        assert torch.equal(g, w), (name, g, w)


@pytest.mark.parametrize("K", [0, 1, 2, 4, 7, 8])
def test_greedy_verify_triton_every_length_and_mismatch_position(triton_kernels, K):
    _, verify = triton_kernels
    draft, lens, target = _exhaustive(K)
    _check(verify.greedy_verify_triton, draft, lens, target)
    acc = verify.greedy_verify_triton(draft, lens, target)[0]
    # accepted == min(L, m) by construction: spot-check the semantics, not only agreement with the reference
    for i, (L, m) in enumerate(itertools.product(range(K + 1), range(K + 1))):
        assert acc[i].item() == min(L, m)


@pytest.mark.parametrize("B,K", [(1, 4), (3, 8), (64, 5), (130, 6), (257, 3)])
def test_greedy_verify_triton_random(triton_kernels, B, K):
    _, verify = triton_kernels
    g = torch.Generator().manual_seed(B * 31 + K)
    draft = torch.randint(0, 3, (B, K), generator=g)
    target = torch.randint(0, 3, (B, K + 1), generator=g)
    lens = torch.randint(0, K + 1, (B,), generator=g)
    lens[0], lens[-1] = 0, K
    _check(verify.greedy_verify_triton, draft, lens, target)
    _check(verify.greedy_verify_triton, draft.int(), lens.int(), target)  # int32 ids and lengths
    _check(verify.greedy_verify_triton, draft.T.contiguous().T, lens, target[:, : K + 1])  # column-major draft


def test_greedy_verify_triton_large_vocab_ids_and_empty_batch(triton_kernels):
    _, verify = triton_kernels
    draft = torch.tensor([[151_000, 152_063, 7]])
    target = torch.tensor([[151_000, 152_063, 8, 152_000]])
    acc, nxt, keep = verify.greedy_verify_triton(draft, torch.tensor([3]), target)
    assert (acc.item(), nxt.item(), keep.item()) == (2, 8, 3)
    outs = verify.greedy_verify_triton(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                                       torch.zeros(0, 5, dtype=torch.long))
    assert all(o.shape == (0,) for o in outs)
    with pytest.raises(ValueError):
        verify.greedy_verify_triton(draft, torch.tensor([3]), target[:, :3])

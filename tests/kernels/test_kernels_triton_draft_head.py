"""The fused Triton draft head against `draft_topk_reference`, in the Triton interpreter on CPU."""

from __future__ import annotations

import pytest
import torch

from adaspec.kernels.reference import draft_topk_reference, topk_lowest_id


def _full_probs(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax((hidden.double() @ weight.double().T) / temperature, dim=-1)


def assert_topk_matches(ids, probs, hidden, weight, k, temperature=1.0, rtol=2e-4, atol=1e-9):
    """Kernel output == reference up to fp32 summation order.

    Values must match the reference's top-k values; each returned probability must be the true full-vocab
    probability of its id; ids must equal the reference's wherever the reference's k-th-ranked values are
    separated from their neighbours by more than the tolerance (only near-ties may legitimately swap), and
    that must be the case for nearly all positions so the check is not vacuous.
    """
    B, V = hidden.shape[0], weight.shape[0]
    assert ids.shape == (B, k) and probs.shape == (B, k)
    assert ids.dtype == torch.int64 and probs.dtype == torch.float32
    assert bool(((ids >= 0) & (ids < V)).all())
    assert all(len(set(r)) == k for r in ids.tolist()), "duplicate ids in a row"
    ref_ids, ref_probs = draft_topk_reference(hidden, weight, k, temperature)
    full = _full_probs(hidden, weight, temperature)
    torch.testing.assert_close(probs.double(), full.gather(1, ids), rtol=rtol, atol=atol)
    torch.testing.assert_close(probs, ref_probs, rtol=rtol, atol=atol)
    assert bool((probs[:, 1:] <= probs[:, :-1] * (1 + rtol) + atol).all()), "not sorted by probability"
    ext, _ = topk_lowest_id(full, min(k + 1, V))
    vals = full.gather(1, ext)
    vals = torch.cat([vals, torch.full((B, k + 2 - vals.shape[1]), -1.0, dtype=vals.dtype)], 1)
    rel_gap = (vals[:, :k] - vals[:, 1 : k + 1]) / vals[:, :k]  # gap to the next-ranked value
    sep = rel_gap > 10 * rtol
    clear = sep & torch.cat([torch.ones(B, 1, dtype=torch.bool), sep[:, : k - 1]], 1)
    assert bool((ids[clear] == ref_ids[clear]).all()), (ids, ref_ids)
    assert clear.float().mean().item() > 0.9, "test data too tie-heavy to check ids"


CASES = [
    # B, V, d, k, dtype, temperature
    (1, 1000, 16, 1, torch.float32, 1.0),
    (3, 4099, 24, 3, torch.bfloat16, 0.7),
    (17, 30011, 64, 8, torch.float32, 1.3),
    (64, 2053, 32, 8, torch.bfloat16, 1.0),
    (33, 12345, 48, 1, torch.float16, 1.0),
    (64, 49152, 16, 3, torch.bfloat16, 1.0),
    (7, 777, 200, 8, torch.float32, 0.5),  # d spans two BLOCK_D chunks with a masked tail
    (5, 152064, 16, 8, torch.float32, 1.0),  # Qwen-size vocabulary
    (2, 152064, 32, 3, torch.bfloat16, 0.8),
    (64, 152064, 16, 8, torch.bfloat16, 1.0),
]


@pytest.mark.parametrize("B,V,D,k,dtype,temperature", CASES)
def test_draft_topk_triton_matches_reference(triton_kernels, B, V, D, k, dtype, temperature):
    draft_head, _ = triton_kernels
    g = torch.Generator().manual_seed(B * 7919 + V + D + k)
    hidden = (torch.randn(B, D, generator=g) * 2).to(dtype)
    weight = torch.randn(V, D, generator=g).to(dtype)
    ids, probs = draft_head.draft_topk_triton(hidden, weight, k, temperature)
    assert_topk_matches(ids, probs, hidden, weight, k, temperature)


@pytest.mark.parametrize("V,k", [(8, 8), (3, 3), (1, 1), (70, 32)])
def test_draft_topk_triton_small_vocab_and_max_k(triton_kernels, V, k):
    draft_head, _ = triton_kernels
    g = torch.Generator().manual_seed(V)
    hidden, weight = torch.randn(4, 16, generator=g), torch.randn(V, 16, generator=g)
    ids, probs = draft_head.draft_topk_triton(hidden, weight, k)
    assert_topk_matches(ids, probs, hidden, weight, k)
    if k == V:
        torch.testing.assert_close(probs.sum(-1), torch.ones(4), rtol=1e-5, atol=1e-6)


def test_draft_topk_triton_exact_ties_break_by_lower_id(triton_kernels):
    """Integer data makes logits exact in fp32, so many exact ties, spread across tiles and splits."""
    draft_head, _ = triton_kernels
    g = torch.Generator().manual_seed(5)
    V, D = 9000, 16
    weight = torch.randint(-1, 2, (V, D), generator=g).float()
    hidden = torch.randint(0, 2, (6, D), generator=g).float()
    hidden[5] = 0.0  # all logits equal: the answer is ids 0..k-1
    for k in (1, 3, 8):
        ids, probs = draft_head.draft_topk_triton(hidden, weight, k)
        ref_ids, ref_probs = draft_topk_reference(hidden, weight, k)
        assert ids.tolist() == ref_ids.tolist()
        assert ids[5].tolist() == list(range(k))
        torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-9)


def test_draft_topk_triton_strided_and_mixed_dtypes(triton_kernels):
    draft_head, _ = triton_kernels
    g = torch.Generator().manual_seed(9)
    base_h = torch.randn(10, 96, generator=g)
    hidden = base_h[::2, ::3]  # [5, 32], non-contiguous in both dims
    weight = torch.randn(32, 3001, generator=g).T  # [3001, 32] with stride (1, 3001)
    ids, probs = draft_head.draft_topk_triton(hidden, weight, 8)
    assert_topk_matches(ids, probs, hidden, weight, 8)
    wb = torch.randn(3001, 32, generator=g).bfloat16()
    ids, probs = draft_head.draft_topk_triton(hidden, wb, 3)  # fp32 hidden x bf16 weight
    assert_topk_matches(ids, probs, hidden, wb, 3)


def test_draft_topk_triton_empty_batch_and_bad_args(triton_kernels):
    draft_head, _ = triton_kernels
    ids, probs = draft_head.draft_topk_triton(torch.randn(0, 16), torch.randn(100, 16), 4)
    assert ids.shape == (0, 4) and probs.shape == (0, 4)
    with pytest.raises(ValueError):
        draft_head.draft_topk_triton(torch.randn(2, 16), torch.randn(100, 16), draft_head.MAX_K + 1)
    with pytest.raises(ValueError):
        draft_head.draft_topk_triton(torch.randn(2, 16), torch.randn(100, 16), 0)
    with pytest.raises(ValueError):
        draft_head.draft_topk_triton(torch.randn(2, 16).double(), torch.randn(100, 16).double(), 2)


def test_topk_check_detects_wrong_answers():
    """Control: the comparison helper must reject a top-k that is off by one rank or has wrong probabilities."""
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(4, 16, generator=g), torch.randn(500, 16, generator=g)
    ids, probs = draft_topk_reference(hidden, weight, 4)
    with pytest.raises(AssertionError):
        assert_topk_matches(ids.roll(1, dims=1), probs.roll(1, dims=1), hidden, weight, 4)
    with pytest.raises(AssertionError):
        assert_topk_matches(ids, probs * 1.01, hidden, weight, 4)
    wrong_ids, wrong_probs = draft_topk_reference(hidden, weight, 5)
    with pytest.raises(AssertionError):
        assert_topk_matches(wrong_ids[:, 1:], wrong_probs[:, 1:], hidden, weight, 4)

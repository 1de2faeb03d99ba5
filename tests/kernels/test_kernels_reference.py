"""The torch references are the oracle for the kernels, so they are checked against brute force here."""

from __future__ import annotations

import pytest
import torch

from adaspec.kernels.reference import (
    draft_topk_reference,
    greedy_verify_reference,
    inverse_cdf_sample,
    rejection_verify_reference,
    topk_lowest_id,
)


def _brute_topk(probs: torch.Tensor, k: int) -> tuple[list[list[int]], list[list[float]]]:
    ids, vals = [], []
    for row in probs.tolist():
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        ids.append(order)
        vals.append([row[i] for i in order])
    return ids, vals


@pytest.mark.parametrize("B,V,D,k,temperature", [(1, 50, 8, 1, 1.0), (5, 97, 16, 3, 0.5), (8, 300, 32, 8, 2.0)])
def test_draft_topk_reference_matches_brute_force(B, V, D, k, temperature):
    g = torch.Generator().manual_seed(B * V + k)
    hidden, weight = torch.randn(B, D, generator=g), torch.randn(V, D, generator=g)
    ids, probs = draft_topk_reference(hidden, weight, k, temperature)
    full = torch.softmax((hidden.double() @ weight.double().T) / temperature, dim=-1)
    want_ids, want_vals = _brute_topk(full, k)
    assert ids.dtype == torch.int64 and probs.dtype == torch.float32 and ids.shape == (B, k)
    assert ids.tolist() == want_ids
    torch.testing.assert_close(probs.double(), torch.tensor(want_vals, dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_draft_topk_reference_bf16_accumulates_in_fp32():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 64, generator=g).bfloat16()
    weight = torch.randn(20000, 64, generator=g).bfloat16()  # more rows than one upcast chunk
    ids, probs = draft_topk_reference(hidden, weight, 4)
    full = torch.softmax(hidden.double() @ weight.double().T, dim=-1)
    assert ids.tolist() == _brute_topk(full, 4)[0]
    torch.testing.assert_close(probs.double(), full.gather(1, ids), rtol=1e-5, atol=1e-8)


def test_topk_ties_break_by_lower_id():
    scores = torch.tensor(
        [
            [0.1, 0.3, 0.3, 0.1, 0.3, 0.2],  # tie inside the top-k and across the k-th place
            [0.2, 0.2, 0.2, 0.2, 0.2, 0.2],  # all equal
            [0.0, 0.5, 0.1, 0.5, 0.1, 0.1],
        ]
    )
    for k in range(1, 7):
        ids, vals = topk_lowest_id(scores, k)
        want_ids, want_vals = _brute_topk(scores, k)
        assert ids.tolist() == want_ids, k
        assert vals.tolist() == want_vals


def test_draft_topk_reference_rejects_bad_arguments():
    h, w = torch.randn(2, 4), torch.randn(10, 4)
    for bad in (dict(k=0), dict(k=11), dict(k=2, temperature=0.0)):
        with pytest.raises(ValueError):
            draft_topk_reference(h, w, **bad)
    with pytest.raises(ValueError):
        draft_topk_reference(h, torch.randn(10, 5), 2)


def _brute_greedy(draft, lens, target):
    out = []
    for d, L, t in zip(draft.tolist(), lens.tolist(), target.tolist()):
        a = 0
        while a < L and d[a] == t[a]:
            a += 1
        out.append((a, t[a], a + 1))
    return out


def test_greedy_verify_reference_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for K in (0, 1, 4, 8):
        B = 200
        draft = torch.randint(0, 3, (B, K), generator=g)
        lens = torch.randint(0, K + 1, (B,), generator=g)
        target = torch.randint(0, 3, (B, K + 1), generator=g)
        acc, nxt, keep = greedy_verify_reference(draft, lens, target)
        assert list(zip(acc.tolist(), nxt.tolist(), keep.tolist())) == _brute_greedy(draft, lens, target)


def test_greedy_verify_reference_ignores_padding_and_validates_lens():
    draft = torch.tensor([[5, 6, 7]])
    target = torch.tensor([[5, 6, 7, 8]])
    assert [t.item() for t in greedy_verify_reference(draft, torch.tensor([2]), target)] == [2, 7, 3]
    assert [t.item() for t in greedy_verify_reference(draft, torch.tensor([0]), target)] == [0, 5, 1]
    assert [t.item() for t in greedy_verify_reference(draft, torch.tensor([3]), target)] == [3, 8, 4]
    with pytest.raises(ValueError):
        greedy_verify_reference(draft, torch.tensor([4]), target)


def test_inverse_cdf_definition():
    dist = torch.tensor([[0.0, 0.5, 0.0, 0.5]] * 6)
    u = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.75, 0.999999])
    assert inverse_cdf_sample(dist, u).tolist() == [1, 1, 1, 3, 3, 3]
    unnormalised = torch.tensor([[2.0, 0.0, 6.0]] * 3)
    assert inverse_cdf_sample(unnormalised, torch.tensor([0.2, 0.25, 0.3])).tolist() == [0, 2, 2]
    # u * total rounding up to total: still a positive-mass index, never a trailing zero-mass one.
    assert inverse_cdf_sample(torch.tensor([[0.3, 0.7, 0.0, 0.0]]), torch.tensor([1.0])).tolist() == [1]


def test_rejection_verify_deterministic_cases():
    V = 5
    p = torch.zeros(3, 3, V)
    p[:, 0, 2] = 1.0  # the target is sure of token 2 at position 0 ...
    p[:, 1, 4] = 1.0  # ... token 4 at position 1
    p[:, 2] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])  # bonus: token 3
    draft = torch.tensor([[2, 4], [2, 1], [0, 4]])
    lens = torch.tensor([2, 2, 2])
    u = torch.full((3, 2), 0.999)
    ru = torch.full((3,), 0.5)
    acc, nxt, keep = rejection_verify_reference(draft, lens, p, None, u, ru)
    assert acc.tolist() == [2, 1, 0]
    assert nxt.tolist() == [3, 4, 2]  # bonus / corrections from the residual p with the rejected token zeroed
    assert keep.tolist() == [3, 2, 1]


def test_rejection_verify_uses_uniforms_and_ratio():
    V = 4
    p = torch.tensor([0.1, 0.2, 0.3, 0.4]).expand(4, 2, V).clone()
    q = torch.tensor([0.4, 0.3, 0.2, 0.1]).expand(4, 1, V).clone()
    draft = torch.tensor([[0], [0], [3], [3]])
    u = torch.tensor([[0.24], [0.26], [0.0], [0.999]])  # p/q = 0.25 for token 0; p/q = 4 for token 3
    acc, nxt, _ = rejection_verify_reference(draft, torch.ones(4, dtype=torch.long), p, q, u, torch.zeros(4))
    assert acc.tolist() == [1, 0, 1, 1]
    # row 1 rejected token 0: residual max(0, p - q) = [0, 0, 0.1, 0.3] -> u=0 picks token 2
    assert nxt[1].item() == 2


def test_rejection_verify_zero_residual_falls_back_to_p():
    p = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    q = torch.tensor([[[0.5, 0.5]]])
    # u >= p/q = 1 can only come from rounding; the residual is empty so the draw is from p.
    acc, nxt, _ = rejection_verify_reference(torch.tensor([[0]]), torch.tensor([1]), p, q, torch.tensor([[1.0]]), torch.tensor([0.75]))
    assert acc.tolist() == [0] and nxt.tolist() == [1]


def _tv(samples: torch.Tensor, probs: torch.Tensor) -> float:
    hist = torch.bincount(samples, minlength=probs.numel()).double() / samples.numel()
    return 0.5 * (hist - probs.double()).abs().sum().item()


# N samples over V outcomes: E[TV] <= 0.5 * sqrt(V / N) * sqrt(2/pi) ~ 2e-3 for V=8, N=2e5. Bounds below
# are ~4x that, and the broken-sampler controls land far above them, so the tests have power.
N_MC = 200_000
TV_BOUND = 0.01


def _first_token_mc(p: torch.Tensor, q: torch.Tensor | None, drafted: torch.Tensor, gen: torch.Generator,
                    verify=rejection_verify_reference) -> torch.Tensor:
    N, V = drafted.shape[0], p.numel()
    tp = torch.stack([p, p]).expand(N, 2, V)
    dq = None if q is None else q.expand(N, 1, V)
    u, ru = torch.rand(N, 1, generator=gen), torch.rand(N, generator=gen)
    acc, nxt, _ = verify(drafted[:, None], torch.ones(N, dtype=torch.long), tp, dq, u, ru)
    return torch.where(acc >= 1, drafted, nxt)


def _target_and_draft(V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    q[0] = 0.0  # a token the drafter never proposes: only the residual can produce it
    return p, q / q.sum()


def test_rejection_first_token_is_distributed_as_p_full_q():
    V = 8
    p, q = _target_and_draft(V, 3)
    gen = torch.Generator().manual_seed(11)
    drafted = torch.multinomial(q, N_MC, replacement=True, generator=gen)
    first = _first_token_mc(p, q[None], drafted, gen)
    assert _tv(first, p) < TV_BOUND
    assert _tv(drafted, p) > 5 * TV_BOUND  # the draft alone is far from p: acceptance does real work


def test_rejection_first_token_is_distributed_as_p_point_mass():
    V = 8
    p, _ = _target_and_draft(V, 4)
    gen = torch.Generator().manual_seed(12)
    for token in (int(p.argmax()), int(p.argmin())):
        drafted = torch.full((N_MC,), token, dtype=torch.long)
        assert _tv(_first_token_mc(p, None, drafted, gen), p) < TV_BOUND


def test_mc_check_detects_a_broken_verifier():
    """Controls: resampling from p instead of the residual, or accepting everything, must fail the check."""
    V = 8
    p, q = _target_and_draft(V, 3)
    gen = torch.Generator().manual_seed(13)

    def always_accept(draft, lens, tp, dq, u, ru):
        return rejection_verify_reference(draft, lens, tp, dq, torch.full_like(u, -1.0), ru)

    def broken(draft, lens, tp, dq, u, ru):
        acc, _, keep = rejection_verify_reference(draft, lens, tp, dq, u, ru)
        return acc, inverse_cdf_sample(tp[:, 0], ru), keep  # correction drawn from p, not max(0, p - q)

    drafted = torch.multinomial(q, N_MC, replacement=True, generator=gen)
    assert _tv(_first_token_mc(p, q[None], drafted, gen, verify=broken), p) > 3 * TV_BOUND
    assert _tv(_first_token_mc(p, q[None], drafted, gen, verify=always_accept), p) > 3 * TV_BOUND


def _markov(V: int, seed: int, sharp: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(V, V, generator=g) * sharp, dim=-1)


def _generate(P: torch.Tensor, Q: torch.Tensor | None, det: torch.Tensor | None, N: int, T: int, K: int,
              gen: torch.Generator, verify=rejection_verify_reference) -> torch.Tensor:
    """N independent generations of T tokens by repeated chain speculative steps over Markov models.

    P[a] is the target's next-token distribution after token a; the drafter samples from Q[a] or, when Q is
    None, deterministically proposes det[a]. Each step drafts a random length in [0, K]. Start token 0.
    """
    out = torch.full((N, T), -1, dtype=torch.long)
    n = torch.zeros(N, dtype=torch.long)
    last = torch.zeros(N, dtype=torch.long)
    rows = torch.arange(N)
    while bool((n < T).any()):
        lens = torch.randint(0, K + 1, (N,), generator=gen)
        draft = torch.empty(N, K, dtype=torch.long)
        prev = last
        for j in range(K):
            draft[:, j] = torch.multinomial(Q[prev], 1, generator=gen).squeeze(1) if det is None else det[prev]
            prev = draft[:, j]
        ctx = torch.cat([last[:, None], draft], dim=1)  # token each position's distribution conditions on
        tp = P[ctx]  # [N, K+1, V]
        dq = None if Q is None else Q[ctx[:, :K]]
        acc, nxt, _ = verify(draft, lens, tp, dq, torch.rand(N, K, generator=gen), torch.rand(N, generator=gen))
        emitted = torch.cat([draft, torch.zeros(N, 1, dtype=torch.long)], dim=1)
        emitted[rows, acc] = nxt
        for j in range(K + 1):
            pos = n + j
            m = (j <= acc) & (pos < T)
            out[rows[m], pos[m]] = emitted[m, j]
        n = n + acc + 1
        last = nxt
    return out


def _chain_tv(out: torch.Tensor, P: torch.Tensor) -> float:
    """TV between the empirical law of the first T tokens and the exact target chain started at token 0."""
    V, T = P.shape[0], out.shape[1]
    codes = torch.zeros(out.shape[0], dtype=torch.long)
    for t in range(T):
        codes = codes * V + out[:, t]
    exact = P[0].double()  # P(y1), then P(y1..yt) in row-major code order
    for _ in range(1, T):
        exact = (exact.view(-1, V)[:, :, None] * P.double()[None]).reshape(-1)
    return _tv(codes, exact)


@pytest.mark.parametrize("drafter", ["sampled", "deterministic"])
def test_whole_chain_output_is_target_markov_chain(drafter):
    """Repeated verify steps must generate sequences distributed exactly as the target's own chain."""
    V, T, K = 4, 3, 3  # 64 outcomes: E[TV] ~ 0.4 * sqrt(64 / N) ~ 7e-3; bound at ~3x
    P, Q = _markov(V, 20, 1.5), _markov(V, 21, 1.5)
    det = Q.argmax(dim=-1)
    gen = torch.Generator().manual_seed(22)
    out = _generate(P, Q if drafter == "sampled" else None, det if drafter == "deterministic" else None,
                    N_MC, T, K, gen)
    assert bool((out >= 0).all())
    assert _chain_tv(out, P) < 0.02


def test_whole_chain_check_detects_a_broken_verifier():
    """Controls: accepting every draft, or drawing the bonus from the wrong position, fails the same check."""
    V, T, K = 4, 3, 3
    P, Q = _markov(V, 20, 1.5), _markov(V, 21, 1.5)
    gen = torch.Generator().manual_seed(23)

    def accept_all(draft, lens, tp, dq, u, ru):
        return rejection_verify_reference(draft, lens, tp, dq, torch.zeros_like(u) - 1.0, ru)

    out = _generate(P, Q, None, 50_000, T, K, gen, verify=accept_all)
    assert _chain_tv(out, P) > 0.05

    def bonus_from_first_position(draft, lens, tp, dq, u, ru):  # bonus from p_0 instead of p_L
        acc, nxt, keep = rejection_verify_reference(draft, lens, tp, dq, u, ru)
        return acc, torch.where(acc == lens, inverse_cdf_sample(tp[:, 0], ru), nxt), keep

    out = _generate(P, Q, None, N_MC, T, K, gen, verify=bonus_from_first_position)
    assert _chain_tv(out, P) > 0.05

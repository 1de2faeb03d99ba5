"""Tree acceptance (kernels/tree_verify.py): greedy = the longest branch matching the target, sampling = recursive
rejection over siblings, exact in distribution (chi-square against the target, with negative controls)."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest
import torch

from adaspec.kernels.reference import rejection_verify_reference
from adaspec.kernels.tree_verify import tree_greedy_verify, tree_rejection_verify
from tests.stats_helpers import ALPHA, goodness_of_fit


def random_tree(rng: random.Random, n: int, V: int, distinct: bool = True) -> tuple[list[int], list[int]]:
    """parents, tokens of an n-node tree in node order (a parent before its children)."""
    parents, tokens = [], []
    used: dict[int, set[int]] = defaultdict(set)
    for i in range(n):
        par = rng.randrange(-1, i)
        choices = [t for t in range(V) if not (distinct and t in used[par])] or list(range(V))
        t = rng.choice(choices)
        used[par].add(t)
        parents.append(par)
        tokens.append(t)
    return parents, tokens


def batch_of(trees: list[tuple[list[int], list[int]]], N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B = len(trees)
    parents = torch.full((B, N), -1, dtype=torch.long)
    tokens = torch.zeros(B, N, dtype=torch.long)
    for b, (par, tok) in enumerate(trees):
        parents[b, : len(par)] = torch.tensor(par, dtype=torch.long)
        tokens[b, : len(tok)] = torch.tensor(tok, dtype=torch.long)
    return parents, torch.tensor([len(p) for p, _ in trees], dtype=torch.long), tokens


def brute_force_greedy(par: list[int], tok: list[int], argmax: list[int]) -> tuple[list[int], int]:
    """The deepest node whose whole root path matches the argmax (distinct sibling tokens: unique)."""
    best: list[int] = []
    for i in range(len(par)):
        path, node = [], i
        while node != -1:
            path.append(node)
            node = par[node]
        path.reverse()
        prev = -1
        ok = True
        for node in path:
            if tok[node] != argmax[prev + 1]:
                ok = False
                break
            prev = node
        if ok and len(path) > len(best):
            best = path
    last = best[-1] if best else -1
    return best, argmax[last + 1]


@pytest.mark.parametrize("B", [1, 3, 8])
def test_greedy_takes_the_longest_matching_branch(B):
    rng = random.Random(B)
    V, N = 4, 9
    for _ in range(30):
        trees = [random_tree(rng, rng.randrange(0, N + 1), V) for _ in range(B)]
        parents, n_nodes, tokens = batch_of(trees, N)
        argmax = torch.randint(0, V, (B, N + 1), generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        accepted, path, nxt = tree_greedy_verify(parents, n_nodes, tokens, argmax)
        for b, (par, tok) in enumerate(trees):
            want, want_next = brute_force_greedy(par, tok, argmax[b].tolist())
            assert int(accepted[b]) == len(want)
            assert path[b, : len(want)].tolist() == want and (path[b, len(want):] == -1).all()
            assert int(nxt[b]) == want_next


def test_greedy_duplicate_siblings_take_the_first():
    parents, n_nodes, tokens = batch_of([([-1, -1, 1], [2, 2, 3])], 3)
    argmax = torch.tensor([[2, 3, 3, 0]])  # node 0 matches, its row (1) says 3 but node 0 has no children
    accepted, path, nxt = tree_greedy_verify(parents, n_nodes, tokens, argmax)
    assert int(accepted[0]) == 1 and path[0].tolist()[0] == 0 and int(nxt[0]) == 3


def test_one_hot_targets_make_sampling_greedy():
    rng = random.Random(7)
    V, N, B = 5, 8, 8
    trees = [random_tree(rng, rng.randrange(0, N + 1), V, distinct=False) for _ in range(B)]
    parents, n_nodes, tokens = batch_of(trees, N)
    argmax = torch.randint(0, V, (B, N + 1), generator=torch.Generator().manual_seed(3))
    probs = torch.nn.functional.one_hot(argmax, V).float()
    g = tree_greedy_verify(parents, n_nodes, tokens, argmax)
    s = tree_rejection_verify(parents, n_nodes, tokens, probs, torch.rand(B, N), torch.rand(B))
    for a, b in zip(g, s):
        assert torch.equal(a, b)


def test_a_chain_is_the_chain_rule_with_the_same_uniforms():
    gen = torch.Generator().manual_seed(11)
    B, K, V = 64, 5, 6
    probs = torch.softmax(torch.randn(B, K + 1, V, generator=gen) * 2, dim=-1)
    draft = torch.randint(0, V, (B, K), generator=gen)
    lens = torch.randint(0, K + 1, (B,), generator=gen)
    u, ru = torch.rand(B, K, generator=gen), torch.rand(B, generator=gen)
    parents = (torch.arange(K) - 1).expand(B, K).clone()
    accepted, path, nxt = tree_rejection_verify(parents, lens, draft, probs, u, ru)
    want_acc, want_next, _ = rejection_verify_reference(draft, lens, probs, None, u, ru)
    assert torch.equal(accepted, want_acc) and torch.equal(nxt, want_next)
    for b in range(B):
        assert path[b, : int(accepted[b])].tolist() == list(range(int(accepted[b])))


# -- exact in distribution ------------------------------------------------------------------------------------------
# Root children: node 0 (token 1) and node 1 (token 3); node 0's children: node 2 (token 0), node 3 (token 4);
# node 2's child: node 4 (token 2). The emitted tokens must follow the target: the first ~ row 0; after token 1
# the second ~ row 1 (node 0's); after token 3 the bonus ~ row 2 (node 1, a leaf); after 1, 0 the third ~ row 3.
TREE = ([-1, -1, 0, 0, 2], [1, 3, 0, 4, 2])
SAMPLES = 20_000


def sample_emitted(verify, probs: torch.Tensor, seed: int) -> list[tuple[int, ...]]:
    parents, n_nodes, tokens = batch_of([TREE], len(TREE[0]))
    M, N = SAMPLES, parents.shape[1]
    gen = torch.Generator().manual_seed(seed)
    accepted, path, nxt = verify(parents.expand(M, N), n_nodes.expand(M), tokens.expand(M, N),
                                 probs.expand(M, *probs.shape[1:]), torch.rand(M, N, generator=gen),
                                 torch.rand(M, generator=gen))
    out = []
    for m in range(M):
        k = int(accepted[m])
        out.append(tuple(TREE[1][n] for n in path[m, :k].tolist()) + (int(nxt[m]),))
    return out


def conditional_fits(emitted: list[tuple[int, ...]], probs: torch.Tensor) -> dict[str, float]:
    """p-values: the first token vs row 0, and each next token given the prefix that leads to a node's row."""
    rows = {(): 0, (1,): 1, (3,): 2, (1, 0): 3}
    fits = {}
    for prefix, row in rows.items():
        nxt = [e[len(prefix)] for e in emitted if e[: len(prefix)] == prefix and len(e) > len(prefix)]
        fits[str(prefix)] = goodness_of_fit(nxt, probs[0, row])[0]
    return fits


@pytest.fixture(scope="module")
def probs() -> torch.Tensor:
    """[1, N+1, V]: the tree's tokens likely enough that every branch is reached often (rows 4, 5: leaves)."""
    rows = [[0.10, 0.35, 0.05, 0.30, 0.12, 0.08],  # root: children tokens 1 and 3
            [0.40, 0.05, 0.10, 0.05, 0.30, 0.10],  # after node 0 (token 1): children tokens 0 and 4
            [0.20, 0.20, 0.15, 0.15, 0.20, 0.10],  # after node 1 (token 3, a leaf): the bonus
            [0.10, 0.10, 0.50, 0.10, 0.10, 0.10],  # after node 2 (token 0): child token 2
            [0.05, 0.15, 0.20, 0.30, 0.10, 0.20],
            [0.30, 0.10, 0.10, 0.20, 0.20, 0.10]]
    return torch.tensor([rows])


def test_tree_sampling_emits_the_targets_distribution(probs):
    emitted = sample_emitted(tree_rejection_verify, probs, seed=1)
    fits = conditional_fits(emitted, probs)
    assert all(p > ALPHA for p in fits.values()), fits
    lengths = Counter(len(e) for e in emitted)
    assert lengths[3] > 0 and lengths[4] > 0  # the deeper branches are reached


def _no_renormalising(parents, n_nodes, tokens, target_probs, uniforms, residual_uniforms):
    """Wrong rule (negative control): a later sibling is accepted with its raw p(x), not p(x) / what is left."""
    # The second root child's trial against p(x) instead of p(x) / (1 - p(first)): u' = u / (1 - p(first)).
    first = target_probs[:, 0].gather(-1, tokens[:, :1]).squeeze(-1)
    u = uniforms.clone()
    u[:, 1] = (u[:, 1] / (1.0 - first)).clamp(max=1.0 - 1e-7)
    return tree_rejection_verify(parents, n_nodes, tokens, target_probs, u, residual_uniforms)


def _rows_off_by_one(parents, n_nodes, tokens, target_probs, uniforms, residual_uniforms):
    """Wrong rule (negative control): a node's children judged against its parent's row."""
    shifted = torch.cat([target_probs[:, :1], target_probs[:, :-1]], dim=1)
    return tree_rejection_verify(parents, n_nodes, tokens, shifted, uniforms, residual_uniforms)


@pytest.mark.parametrize("broken", [_no_renormalising, _rows_off_by_one])
def test_the_distribution_check_catches_a_wrong_rule(probs, broken):
    fits = conditional_fits(sample_emitted(broken, probs, seed=1), probs)
    assert min(fits.values()) < 1e-6, fits


def test_malformed_trees_are_refused():
    parents, n_nodes, tokens = batch_of([([-1, 1], [0, 1])], 2)  # node 1 is its own parent
    with pytest.raises(ValueError, match="parent"):
        tree_greedy_verify(parents, n_nodes, tokens, torch.zeros(1, 3, dtype=torch.long))
    parents, n_nodes, tokens = batch_of([([-1], [9])], 1)
    with pytest.raises(ValueError, match="lie in"):
        tree_rejection_verify(parents, n_nodes, tokens, torch.full((1, 2, 4), 0.25), torch.rand(1, 1), torch.rand(1))
    with pytest.raises(ValueError, match="n_nodes"):
        tree_greedy_verify(parents, torch.tensor([2]), tokens, torch.zeros(1, 2, dtype=torch.long))

"""Greedy draft chains read off a `SuffixIndex`: follow the most frequent continuation, token by token.

Why a separate module: both draft sources (the request's own context and the tenant's cache of past
responses) draft the same way once located; only where they start differs (see `suffix_match.ChainStart`).
"""

from __future__ import annotations

from typing import NamedTuple

from .match import ChainStart
from .tree import SuffixIndex, leaf_target


class Chain(NamedTuple):
    """A drafted chain: tokens, each one's frequency probability, and its expected accepted length."""

    tokens: list[int]
    confidence: list[float]
    #: sum over i of the product of the first i+1 probabilities: the chain's expected accepted length if the
    #: frequencies were the truth. SuffixDecoding's way to compare candidate drafts.
    score: float


EMPTY_CHAIN = Chain([], [], 0.0)


def greedy_chain(
    index: SuffixIndex, start: ChainStart, max_len: int, min_prob: float, live_doc: int = -1
) -> Chain:
    """Up to `max_len` tokens continuing `start`, stopping once the cumulative probability < `min_prob`.

    At a node the next token is its most frequent child, with probability count(child) / out(node); at the
    depth bound the chain slides to the node's suffix (conditioning on the last max_depth tokens). Inside a
    unique occurrence (a leaf, or a copy start) the chain copies that occurrence with probability 1 until it
    ends: one past occurrence is all the evidence there is.

    `live_doc` names the document the draft itself continues (the request's own context): a copy that runs
    into its end goes on reading the tokens drafted so far, as an overlapping copy does, so a periodic
    context drafts whole periods rather than stopping at the live end.
    """
    if max_len <= 0:
        return EMPTY_CHAIN
    tokens: list[int] = []
    confs: list[float] = []
    prob = 1.0
    score = 0.0
    v, doc, pos = start.node, start.doc, start.pos
    count, out, depth, link, top = index.count, index.out, index.depth, index.link, index.top
    k1t, k1c, kids = index.k1t, index.k1c, index.kids
    height = index.height
    seq = index.docs[doc] if doc >= 0 else None
    while len(tokens) < max_len:
        if seq is None:
            o = out[v]
            if o == 0:
                break
            t = top[v]
            code = k1c[v] if k1t[v] == t else kids[v][t]  # type: ignore[index]
            p = (count[code] if code >= 0 else 1) / o
            prob *= p
            if prob < min_prob:
                break
            tokens.append(t)
            confs.append(p)
            score += prob
            if code >= 0:
                v = code
                if depth[v] >= height:
                    v = link[v]
            else:
                doc, at = leaf_target(code)
                seq = index.docs[doc]
                pos = at + 1
        else:
            if pos < len(seq):
                tokens.append(seq[pos])
            elif doc == live_doc:
                tokens.append(tokens[pos - len(seq)])
            else:
                break
            confs.append(1.0)
            score += prob
            pos += 1
    return Chain(tokens, confs, score)

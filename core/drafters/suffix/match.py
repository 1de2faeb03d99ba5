"""Where an external context stands in a `SuffixIndex`: its longest suffix found there, kept incrementally.

Why: a live request's context is not in the global cache's index, yet every step we need the longest suffix of
it (up to the depth bound) that some cached response contains. Rescanning the context costs O(depth^2) per
step; instead this matcher is an Aho-Corasick-style automaton over the index's nodes that advances with each
new context token in amortized O(1).

Two pieces of state: `node`, the deepest *node* that is a suffix of the context (nodes are closed under
suffixes, so falling back along suffix links visits every shorter candidate), and an optional *candidate*
occurrence (document, position, length) for a longer match that lies inside a unique leaf occurrence. A
candidate can only stay the longest match by extending along its own document; a new one is spotted for free
while the node falls back.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from .tree import ROOT, SuffixIndex, leaf_target


class ChainStart(NamedTuple):
    """Where a draft chain begins: at `node`, or copying `docs[doc][pos:]` when doc >= 0."""

    node: int
    doc: int
    pos: int
    #: length of the context suffix the start stands for (the match length that bounds the draft length).
    match_len: int


def node_start(index: SuffixIndex, v: int) -> ChainStart:
    """The deepest suffix of node v (v included) that has a continuation and room below the depth bound."""
    depth, out, link = index.depth, index.out, index.link
    height = index.height
    while v != ROOT and (depth[v] >= height or out[v] == 0):
        v = link[v]
    return ChainStart(v, -1, 0, depth[v])


class ContextMatcher:
    """Longest suffix of a growing context that occurs in `index` (up to its height)."""

    __slots__ = ("index", "version", "node", "cand_doc", "cand_pos", "cand_len")

    def __init__(self, index: SuffixIndex, context: Sequence[int] = ()) -> None:
        self.index = index
        self.reset(context)

    def reset(self, context: Sequence[int]) -> None:
        """Re-resolve from scratch (the index changed): only the last `height` tokens can matter."""
        self.version = self.index.version
        self.node = ROOT
        self.cand_doc = -1
        self.cand_pos = 0
        self.cand_len = 0
        start = max(0, len(context) - self.index.height)
        for i in range(start, len(context)):
            self.feed(context[i])

    @property
    def stale(self) -> bool:
        """True once documents were added or removed since the last reset (node ids may be reused)."""
        return self.version != self.index.version

    @property
    def match_len(self) -> int:
        """Length of the longest context suffix found in the index."""
        return max(self.cand_len, self.index.depth[self.node])

    def feed(self, x: int) -> None:
        """Advance by one context token."""
        index = self.index
        height = index.height
        depth, link, k1t, k1c, kids = index.depth, index.link, index.k1t, index.k1c, index.kids
        cand = self.cand_len
        if cand:
            seq = index.docs[self.cand_doc]
            q = self.cand_pos
            if q < len(seq) and seq[q] == x:
                self.cand_pos = q + 1
                if cand < height:
                    cand += 1
            else:
                cand = 0
        v = self.node
        leaf_len = 0
        leaf = 0
        while True:
            if depth[v] < height:
                if k1t[v] == x:
                    code: int | None = k1c[v]
                else:
                    kd = kids[v]
                    code = kd.get(x) if kd is not None else None
                if code is not None:
                    if code >= 0:
                        v = code
                        break
                    if not leaf_len:  # deepest suffix followed by x in a unique occurrence
                        leaf_len = depth[v] + 1
                        leaf = code
            if v == ROOT:
                break
            v = link[v]
        self.node = v
        if leaf_len > cand:
            doc, pos = leaf_target(leaf)
            self.cand_doc = doc
            self.cand_pos = pos + 1
            cand = leaf_len
        if cand <= depth[v]:
            cand = 0
        self.cand_len = cand

    def start(self) -> ChainStart:
        """Where to draft from: the candidate when it is the longer match and goes on, else a node."""
        index = self.index
        if self.cand_len and self.cand_pos < len(index.docs[self.cand_doc]):
            return ChainStart(ROOT, self.cand_doc, self.cand_pos, min(self.cand_len, index.max_depth))
        return node_start(index, self.node)

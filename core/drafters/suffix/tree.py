"""A depth-bounded suffix trie with occurrence counts, compressed at its unique leaves.

Why this shape: a suffix drafter needs, for any string u of up to `max_depth` tokens, how often u occurred in
some documents and how often each token followed it. A plain depth-bounded suffix trie answers that but holds
about `tokens * depth` nodes, nearly all on chains of strings that occurred once. Here a string is
*materialized* as a node only once it has occurred at least twice; an occurrence that has become unique
hangs off its deepest shared node as a *leaf*: a pointer (document, position) into the stored tokens, which
spells out the rest of that occurrence for free. Nodes then number about as many as repeated substrings.

Invariants (checked by tests against brute force):
- every node is a string of depth <= height (= max_depth + 1) that occurs in the documents; `count[v]` is
  its number of occurrences; `out[v]` counts those followed by a token (the sum of its children's counts);
- a string that occurs at least twice is a node; nodes are closed under prefixes and suffixes, so `link[v]`
  (v without its first token) is always a node;
- each occurrence runs from the root through nodes and ends at the depth bound, at its document's end, or
  at its own leaf (a child entry with a negative code pointing at the occurrence's next token);
- `top[v]` is a most frequent child token and `topc[v]` its count (NO_CHILD when v has no children).

Children: most nodes (about 90% on text) have exactly one, so a lone child is stored inline (`k1t`/`k1c`) and
only nodes with two or more get a dict (`kids`): a dict per node would triple the memory.

Documents are added token by token (`extend`), so the structure also serves a live, growing request. While a
document is open, `tail(doc)` is the deepest node that is a suffix of it: its longest suffix seen before.
Removing a document (`remove_document`) walks its occurrences from the root and undoes their counts exactly,
so an evicted response leaves no trace.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

ROOT = 0
_POS_BITS = 32
_POS_MASK = (1 << _POS_BITS) - 1
#: `top[v]` / `k1t[v]` value meaning "no (inline) child".
NO_CHILD = -1


def leaf_code(doc: int, pos: int) -> int:
    """Encode 'the occurrence continues at docs[doc][pos]' as a negative child code (node ids are >= 0)."""
    return -1 - ((doc << _POS_BITS) | pos)


def leaf_target(code: int) -> tuple[int, int]:
    """Decode a leaf child code into (doc, pos)."""
    x = -1 - code
    return x >> _POS_BITS, x & _POS_MASK


class SuffixIndex:
    """Counts of all substrings (up to `max_depth + 1` tokens) of a set of token documents.

    Node fields live in parallel lists indexed by node id (cheaper in memory and time than node objects);
    freed ids are recycled. `version` changes whenever a document is added or removed, so holders of node ids
    (context matchers) know when to re-resolve them.
    """

    def __init__(self, max_depth: int) -> None:
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        self.max_depth = max_depth
        #: deepest node depth; one more than max_depth so a max_depth-long context still has children.
        self.height = max_depth + 1
        self.count: list[int] = [0]
        self.out: list[int] = [0]
        self.depth: list[int] = [0]
        self.link: list[int] = [ROOT]
        self.top: list[int] = [NO_CHILD]
        self.topc: list[int] = [0]
        #: the lone child (token, code) when a node has exactly one; NO_CHILD otherwise.
        self.k1t: list[int] = [NO_CHILD]
        self.k1c: list[int] = [0]
        #: token -> child code (node id >= 0, or a negative leaf code) when a node has two or more children.
        self.kids: list[dict[int, int] | None] = [None]
        self.docs: dict[int, list[int]] = {}
        self.version = 0
        self.leaf_count = 0
        self.token_count = 0
        self._free: list[int] = []
        self._next_doc = 0
        self._open: dict[int, int] = {}  # open doc -> its tail node

    # ------------------------------------------------------------------ sizes and children

    @property
    def node_count(self) -> int:
        """Live nodes, the root included."""
        return len(self.count) - len(self._free)

    def child(self, v: int, t: int) -> int | None:
        """Code of v's child by token t (node id, or negative leaf code), None if v is never followed by t."""
        if self.k1t[v] == t:
            return self.k1c[v]
        kd = self.kids[v]
        return kd.get(t) if kd is not None else None

    def children(self, v: int) -> Iterator[tuple[int, int]]:
        """(token, code) of each child of v."""
        kd = self.kids[v]
        if kd is not None:
            yield from kd.items()
        elif self.k1t[v] != NO_CHILD:
            yield self.k1t[v], self.k1c[v]

    def child_count(self, code: int) -> int:
        """Occurrences of the string a child code stands for (a leaf is a single occurrence)."""
        return self.count[code] if code >= 0 else 1

    def _del_child(self, v: int, t: int) -> None:
        if self.k1t[v] == t:
            self.k1t[v] = NO_CHILD
            return
        kd = self.kids[v]
        del kd[t]  # type: ignore[attr-defined]
        if len(kd) == 1:  # type: ignore[arg-type]
            ((t1, c1),) = kd.items()  # type: ignore[union-attr]
            self.k1t[v] = t1
            self.k1c[v] = c1
            self.kids[v] = None

    # ------------------------------------------------------------------ building

    def open_document(self) -> int:
        """Start an empty document that `extend` grows; returns its id."""
        doc = self._next_doc
        self._next_doc += 1
        self.docs[doc] = []
        self._open[doc] = ROOT
        self.version += 1
        return doc

    def close_document(self, doc: int) -> None:
        """No more tokens will be added to `doc` (its active suffixes simply end at its last token)."""
        self._open.pop(doc, None)

    def add_document(self, tokens: Iterable[int]) -> int:
        """Insert a complete document; returns its id (for `remove_document`)."""
        doc = self.open_document()
        self.extend(doc, tokens)
        self.close_document(doc)
        return doc

    def tail(self, doc: int) -> int:
        """Deepest node that is a suffix of open document `doc` (ROOT if none)."""
        return self._open[doc]

    def extend(self, doc: int, tokens: Iterable[int]) -> None:
        """Append tokens to open document `doc`, counting every new substring occurrence.

        Per token this visits only the *active* suffixes, the ones seen before (at most height of them, often
        a handful), walking the suffix-link chain from the tail.
        """
        seq = self.docs[doc]
        tail = self._open[doc]
        count, out, depth, link = self.count, self.out, self.depth, self.link
        top, topc, k1t, k1c, kids = self.top, self.topc, self.k1t, self.k1c, self.kids
        height = self.height
        docs, free = self.docs, self._free
        base = doc << _POS_BITS
        n_before = len(seq)
        new_leaves = 0
        for t in tokens:
            pos = len(seq)
            seq.append(t)
            v = tail if depth[tail] < height else link[tail]  # only the tail can sit at the depth bound
            prev = -1
            new_tail = ROOT
            while True:
                kd = None
                if k1t[v] == t:
                    code: int | None = k1c[v]
                else:
                    kd = kids[v]
                    code = kd.get(t) if kd is not None else None
                if code is None:  # this suffix was never followed by t: a new unique occurrence
                    leaf = -1 - (base | pos)
                    if kd is not None:
                        kd[t] = leaf
                    elif k1t[v] == NO_CHILD:
                        k1t[v] = t
                        k1c[v] = leaf
                    else:
                        kids[v] = {k1t[v]: k1c[v], t: leaf}
                        k1t[v] = NO_CHILD
                    new_leaves += 1
                    o = out[v]
                    out[v] = o + 1
                    if o == 0:
                        top[v] = t
                        topc[v] = 1
                else:
                    if code >= 0:
                        c = code
                        nc = count[c] + 1
                        count[c] = nc
                    else:  # split: v+t occurred once, as a leaf; materialize it (inlined: hot in copies)
                        x = -1 - code
                        doc2 = x >> _POS_BITS
                        q = (x & _POS_MASK) + 1
                        seq2 = docs[doc2]
                        d1 = depth[v] + 1
                        if d1 < height and q < len(seq2):
                            # the old occurrence hangs one level down, by its next token
                            t2 = seq2[q]
                            o1, tp, tc, kt, kc = 1, t2, 1, t2, -1 - ((doc2 << _POS_BITS) | q)
                        else:
                            o1, tp, tc, kt, kc = 0, NO_CHILD, 0, NO_CHILD, 0
                            new_leaves -= 1
                        if free:
                            c = free.pop()
                            count[c] = 2
                            out[c] = o1
                            depth[c] = d1
                            top[c] = tp
                            topc[c] = tc
                            k1t[c] = kt
                            k1c[c] = kc
                            kids[c] = None
                        else:
                            c = len(count)
                            count.append(2)
                            out.append(o1)
                            depth.append(d1)
                            link.append(ROOT)
                            top.append(tp)
                            topc.append(tc)
                            k1t.append(kt)
                            k1c.append(kc)
                            kids.append(None)
                        if kd is None:
                            k1c[v] = c
                        else:
                            kd[t] = c
                        nc = 2
                    out[v] += 1
                    if top[v] == t:
                        topc[v] = nc
                    elif nc > topc[v]:
                        top[v] = t
                        topc[v] = nc
                    if prev >= 0:
                        link[prev] = c
                    else:
                        new_tail = c
                    prev = c
                if v == ROOT:
                    break
                v = link[v]
            if prev >= 0:
                link[prev] = ROOT
            tail = new_tail
        self._open[doc] = tail
        self.token_count += len(seq) - n_before
        self.leaf_count += new_leaves

    # ------------------------------------------------------------------ removal

    def remove_document(self, doc: int) -> None:
        """Undo every occurrence of `doc`: counts drop, its leaves go, emptied nodes are freed.

        Cost: one root walk per position, as deep as the occurrence is shared (<= height), plus one rescan of
        the children of each node whose most frequent child lost an occurrence.
        """
        self._open.pop(doc, None)
        seq = self.docs.pop(doc)
        count, out, top, topc = self.count, self.out, self.top, self.topc
        k1t, k1c, kids = self.k1t, self.k1c, self.kids
        height = self.height
        n = len(seq)
        dead: list[int] = []
        rescan: set[int] = set()
        for i in range(n):
            v = ROOT
            for j in range(i, min(i + height, n)):
                t = seq[j]
                if k1t[v] == t:
                    code: int | None = k1c[v]
                else:
                    kd = kids[v]
                    code = kd.get(t) if kd is not None else None
                if code is None:
                    raise AssertionError(f"occurrence {doc}:{i} lost at depth {j - i}")
                o = out[v] - 1
                out[v] = o
                if code >= 0:
                    nc = count[code] - 1
                    count[code] = nc
                    if nc == 0:
                        self._del_child(v, t)
                        dead.append(code)
                else:
                    if leaf_target(code) != (doc, j):
                        raise AssertionError(f"leaf of doc {doc} pos {j} points at {leaf_target(code)}")
                    self._del_child(v, t)
                    self.leaf_count -= 1
                    nc = 0
                if top[v] == t:
                    if o == 0:
                        top[v] = NO_CHILD
                        topc[v] = 0
                    elif kids[v] is None:  # a lone child stays the most frequent one
                        if nc == 0:
                            top[v] = k1t[v]
                            topc[v] = self.child_count(k1c[v])
                        else:
                            topc[v] = nc
                    else:
                        rescan.add(v)
                if code < 0:
                    break
                v = code
            for d in dead:
                rescan.discard(d)
                kids[d] = None
                k1t[d] = NO_CHILD
                top[d] = NO_CHILD
                self._free.append(d)
            dead.clear()
        for v in rescan:  # some may have lost children since they were queued
            if kids[v] is not None:
                self._rescan_top(v)
            elif k1t[v] != NO_CHILD:
                top[v] = k1t[v]
                topc[v] = self.child_count(k1c[v])
            else:
                top[v] = NO_CHILD
                topc[v] = 0
        self.token_count -= n
        self.version += 1

    def _rescan_top(self, v: int) -> None:
        """Recompute the most frequent child of v (whose children are in a dict); ties go to the first."""
        count = self.count
        best, best_count = NO_CHILD, 0
        for t, code in self.kids[v].items():  # type: ignore[union-attr]
            c = count[code] if code >= 0 else 1
            if c > best_count:
                best, best_count = t, c
        self.top[v] = best
        self.topc[v] = best_count

    # ------------------------------------------------------------------ queries (tests and tools)

    def find(self, tokens: Sequence[int]) -> tuple[int, int] | None:
        """Locate a string: (node, -1) if it is a node, (leaf code, offset into the leaf) if it lies inside a
        unique occurrence, None if it does not occur. Walks from the root."""
        v = ROOT
        seq = list(tokens)
        for i, t in enumerate(seq):
            if self.depth[v] >= self.height:
                return None
            code = self.child(v, t)
            if code is None:
                return None
            if code < 0:
                doc, pos = leaf_target(code)
                rest = seq[i + 1 :]
                stored = self.docs[doc][pos + 1 : pos + 1 + len(rest)]
                if stored != rest or self.depth[v] + 1 + len(rest) > self.height:
                    return None
                return code, len(rest)
            v = code
        return v, -1

    def occurrences(self, tokens: Sequence[int]) -> int:
        """How many times a non-empty string occurs (0 if never, or if longer than the depth bound)."""
        found = self.find(tokens)
        if found is None:
            return 0
        code, offset = found
        return self.count[code] if offset == -1 else 1

    def continuations(self, tokens: Sequence[int]) -> int:
        """How many occurrences of a string are followed by a token (within the depth bound)."""
        seq = list(tokens)
        found = self.find(seq)
        if found is None:
            return 0
        code, offset = found
        if offset == -1:
            return self.out[code]
        doc, pos = leaf_target(code)
        after = pos + 1 + offset  # index of the token after the string in its document
        return int(after < len(self.docs[doc]) and len(seq) < self.height)

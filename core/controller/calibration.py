"""Per-drafter calibration: raw per-token confidence (and chain position) -> P(accepted | all earlier accepted).

Drafters report confidences on their own scales (a softmax probability, a match frequency); the controller
needs probabilities it can multiply. Each drafter gets a `Calibrator`: a grid of (position bucket x confidence
bin) cells counting how often a token in that cell was accepted, given that every earlier token of its chain
was. Token j of a draft is accepted iff j < accepted; the token at the first rejection counts as a failure and
tokens after it are never seen by the verifier, so they give no information and are not counted.

The fit is binned isotonic regression (pool-adjacent-violators over confidence bins) with Beta-prior
smoothing in two levels: a pooled-over-positions curve shrunk toward the identity (trust the raw confidence
until data says otherwise), then per position shrunk toward the pooled curve, so sparse cells (late positions,
rare confidences) stay close to what the rest of the data says. Evidence decays with a half-life in tokens so
the calibration follows drift. Lookups are O(1) table reads; the table is refit lazily after
`refit_tokens` new observations, so updates are amortised O(1) per token.
"""

from __future__ import annotations

import math
from typing import Sequence

_RENORM = 1e150  # rescale stored weights before they overflow (lazy exponential forgetting)


def pav(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Weighted pool-adjacent-violators: the nondecreasing sequence closest to `values` in weighted L2."""
    blocks_v: list[float] = []
    blocks_w: list[float] = []
    blocks_n: list[int] = []
    for v, w in zip(values, weights):
        blocks_v.append(v)
        blocks_w.append(w)
        blocks_n.append(1)
        while len(blocks_v) > 1 and blocks_v[-2] > blocks_v[-1]:
            v2, w2, n2 = blocks_v.pop(), blocks_w.pop(), blocks_n.pop()
            w1 = blocks_w[-1]
            tw = w1 + w2
            blocks_v[-1] = (blocks_v[-1] * w1 + v2 * w2) / tw if tw > 0 else 0.5 * (blocks_v[-1] + v2)
            blocks_w[-1] = tw
            blocks_n[-1] += n2
    out: list[float] = []
    for v, n in zip(blocks_v, blocks_n):
        out.extend([v] * n)
    return out


class Calibrator:
    """Online binned isotonic calibration of one drafter's confidences, with evidence counts per cell."""

    def __init__(
        self,
        bins: int = 16,
        positions: int = 8,
        prior_strength: float = 4.0,
        half_life_tokens: float = 50_000.0,
        refit_tokens: int = 64,
    ) -> None:
        self.bins, self.positions = bins, positions
        self.prior_strength = prior_strength
        self.refit_tokens = refit_tokens
        #: Per-token growth of the weight of new evidence (1 = no forgetting).
        self._growth = 2.0 ** (1.0 / half_life_tokens) if half_life_tokens > 0 else 1.0
        self._w = 1.0  # weight of the next observation; effective count of a stored weight is stored / _w
        n = bins * positions
        self._succ = [0.0] * n
        self._seen = [0.0] * n
        self._total = 0.0
        self._pending = 0  # tokens observed since the last refit
        self.centers = [(b + 0.5) / bins for b in range(bins)]
        self.pooled = list(self.centers)
        self.table = list(self.centers) * positions  # flat [position * bins + bin]
        self.fits = 0

    # -- learning ---------------------------------------------------------------------------------------------
    def update(self, confidence: Sequence[float], accepted: int) -> None:
        """Log one verified draft: its per-token confidences and how many leading tokens were accepted."""
        n = len(confidence)
        seen = accepted + 1 if accepted < n else n  # tokens the verifier actually judged
        if seen <= 0:
            return
        if self._growth != 1.0:
            self._w *= self._growth**seen
            if self._w > _RENORM:
                self._renormalise()
        w = self._w
        nb, last = self.bins, self.positions - 1
        top = nb - 1
        succ, obs = self._succ, self._seen
        for j in range(seen):
            b = int(confidence[j] * nb)
            if b > top:
                b = top
            elif b < 0:
                b = 0
            i = (j if j < last else last) * nb + b
            obs[i] += w
            if j < accepted:
                succ[i] += w
        self._total += w * seen
        self._pending += seen

    def _renormalise(self) -> None:
        s = 1.0 / self._w
        self._succ = [x * s for x in self._succ]
        self._seen = [x * s for x in self._seen]
        self._total *= s
        self._w = 1.0

    def refit(self) -> None:
        """Rebuild the lookup table: pooled isotonic curve, then per-position curves shrunk toward it."""
        nb, s0, inv = self.bins, self.prior_strength, 1.0 / self._w
        succ, obs = self._succ, self._seen
        ps = [0.0] * nb
        pn = [0.0] * nb
        for p in range(self.positions):
            off = p * nb
            for b in range(nb):
                ps[b] += succ[off + b]
                pn[b] += obs[off + b]
        vals = [(ps[b] * inv + s0 * self.centers[b]) / (pn[b] * inv + s0) for b in range(nb)]
        pooled = pav(vals, [pn[b] * inv + s0 for b in range(nb)])
        table: list[float] = []
        for p in range(self.positions):
            off = p * nb
            ns = [obs[off + b] * inv for b in range(nb)]
            vals = [(succ[off + b] * inv + s0 * pooled[b]) / (ns[b] + s0) for b in range(nb)]
            table.extend(pav(vals, [x + s0 for x in ns]))
        self.pooled, self.table = pooled, table
        self._pending = 0
        self.fits += 1

    def _fresh(self) -> list[float]:
        if self._pending >= self.refit_tokens:
            self.refit()
        return self.table

    # -- lookups ----------------------------------------------------------------------------------------------
    def prob(self, confidence: float, position: int) -> float:
        """Calibrated P(token at 0-based `position` accepted | earlier ones accepted)."""
        nb = self.bins
        b = min(nb - 1, max(0, int(confidence * nb)))
        return self._fresh()[min(position, self.positions - 1) * nb + b]

    def cumulative(self, confidence: Sequence[float]) -> list[float]:
        """P(the first j+1 tokens are all accepted) for each j: the chain's survival curve."""
        table = self._fresh()
        nb, last = self.bins, self.positions - 1
        top = nb - 1
        out = []
        c = 1.0
        for j, x in enumerate(confidence):
            b = int(x * nb)
            if b > top:
                b = top
            elif b < 0:
                b = 0
            c *= table[(j if j < last else last) * nb + b]
            out.append(c)
        return out

    def expected_accepted(self, confidence: Sequence[float]) -> float:
        """Expected number of accepted tokens of this chain (sum of its survival curve)."""
        return math.fsum(self.cumulative(confidence))

    # -- evidence -----------------------------------------------------------------------------------------------
    @property
    def evidence(self) -> float:
        """Effective number of judged tokens behind the fit (decayed)."""
        return self._total / self._w

    def cell_evidence(self, confidence: float, position: int) -> float:
        """Effective judged tokens in the cell a (confidence, position) falls in."""
        nb = self.bins
        b = min(nb - 1, max(0, int(confidence * nb)))
        return self._seen[min(position, self.positions - 1) * nb + b] / self._w

    def evidence_table(self) -> list[list[float]]:
        """[position][bin] effective judged tokens, for reports and the guardrail."""
        nb, inv = self.bins, 1.0 / self._w
        return [[x * inv for x in self._seen[p * nb : (p + 1) * nb]] for p in range(self.positions)]

    def curve(self, position: int = 0) -> list[float]:
        """The fitted calibration curve (one probability per confidence bin) at a position."""
        table = self._fresh()
        p = min(position, self.positions - 1)
        return table[p * self.bins : (p + 1) * self.bins]

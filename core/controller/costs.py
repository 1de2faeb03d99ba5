"""Cost model: how long a step takes for a given batch of chains, learned online from StepRecords.

Verify: one target forward over the whole chunk, t = a + b * tokens + c * batch + s * [any draft] (tokens =
pending + drafted tokens over the batch, filled up to the engine's packing multiple, or batch x the widest
chunk where the engine pads: `step.forward_tokens`; s = what a
forward that verifies anything costs over a plain decode step on top of its tokens: measured on this CPU at
~13 ms on a ~47 ms step, from the matmuls' shapes at more than one row per request). Fit by recursive least squares with forgetting, regularised toward the start-up
values (which count as `prior_weight` observations), in scaled units so the prior means the same thing on a
GPU (ms) as on a CPU (tens of ms). A linear model is enough for the controller's question: what does one more
verified token cost (b), against what does the step cost anyway (a + c * batch). When b dominates, verify is
compute-bound and speculation stops paying.

Draft: seconds per drafted token per drafter. The engine times all drafters of a step together, so the
per-drafter costs are fitted by normalised LMS on draft_s = sum_d cost_d * tokens_d (an EMA per token when a
step used one drafter). A *batched* drafter (a GPU head: one forward per chain position for all its rows)
may instead be given a per-position step cost (`draft_step_costs`): a chain of k positions costs k steps
for the whole batch, whatever the number of rows -- the planner amortises it over the batch.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from adaspec.core.step import StepRecord, forward_tokens

_TOK_SCALE = 100.0  # feature scaling: tokens / 100, batch / 10
_BATCH_SCALE = 10.0
_MIN_B = 1e-12  # a verified token never costs exactly nothing (keeps the planner's ratios finite)
_MIN_CONTRAST = 8.0  # recent plain and speculative forwards each, before the speculation term is fitted
_WIDTH_MIN_STEPS = 3  # steps at a (batch, width) before its measured time replaces the linear fit's
_WIDTH_ALPHA = 0.05  # EMA weight of a new step in the per-width table


class CostModel:
    """Online verify + draft cost estimates; `expected_step_time` is what the planner optimises against."""

    def __init__(
        self,
        verify_fixed_s: float = 0.010,
        verify_token_s: float = 5e-5,
        verify_request_s: float = 0.0,
        draft_token_s: float = 2e-5,
        verify_spec_s: float = 0.0,
        forgetting: float = 0.999,
        prior_weight: float = 2.0,
        draft_alpha: float = 0.1,
        fit_prefill: bool = False,
        draft_costs: Mapping[str, float] | None = None,
        frozen: bool = False,
        draft_step_costs: Mapping[str, float] | None = None,
        padded: bool = False,
        multiple: int = 1,
    ) -> None:
        #: Seconds a step costs beyond the forward and drafting (planning, observe, logging), an EMA of the
        #: engines' `overhead_s`; the planner adds it to every step's time, so it prices tokens per real second.
        self.overhead = 0.0
        # Work in units of the default step (batch 10, 100 tokens) so the prior has a scale-free meaning.
        self._ys = max(verify_fixed_s + verify_token_s * _TOK_SCALE + verify_request_s * _BATCH_SCALE, 1e-9)
        self._theta = [
            verify_fixed_s / self._ys,
            verify_token_s * _TOK_SCALE / self._ys,
            verify_request_s * _BATCH_SCALE / self._ys,
            verify_spec_s / self._ys,
        ]
        p0 = 1.0 / prior_weight
        n = len(self._theta)
        self._p0_trace = n * p0
        self._P = [[p0 if i == j else 0.0 for j in range(n)] for i in range(n)]
        self.forgetting = forgetting
        self.default_draft = draft_token_s
        self.draft_alpha = draft_alpha
        self.fit_prefill = fit_prefill
        self._draft: dict[str, float] = dict(draft_costs or {})
        #: Batched drafters: seconds per chain position for the whole batch (not learned online).
        self.draft_step: dict[str, float] = dict(draft_step_costs or {})
        #: Batched drafters: seconds per row they draft for beyond the chain, learned online (an EMA over steps
        #: where one batched drafter ran). A head's propose first extends its cache over the positions the row
        #: committed since the head last drafted for it, one pass that cost 6-100 ms here: what a sporadic use
        #: (a probe, a head picked now and then) really costs, and what the per-position fit cannot see.
        self._row_overhead: dict[str, float] = {}
        #: Frozen: keep the start-up values (benchmarks that must decide identically live and on replay).
        self.frozen = frozen
        #: The verify forward runs right-padded chunks (the reference engine says so: `set_padded_verify`):
        #: a step's tokens are batch x its widest chunk, so a row's longer chain costs every row.
        self.padded = padded
        #: A ragged forward that runs packed is filled up to this many tokens (`step.forward_tokens`): the
        #: fit sees what the forward computed, and the planner may fill that round-up with real draft tokens.
        self.multiple = multiple
        self.steps_seen = 0
        #: Recent plain and speculative forwards (decayed like the fit): `s` is only identifiable from both.
        self._n_plain = self._n_spec = 0.0
        #: Padded decode steps measured per (batch, chunk width): [EMA of verify seconds, steps seen]. The linear
        #: fit cannot see a forward's real shape in width -- on this CPU at batch 4 a chunk of 2 to 7 tokens per
        #: row costs the same ~95-110 ms (1 token: 65 ms, 8: 127 ms) -- so the planner prices widths from it.
        self._width_t: dict[tuple[int, int], list[float]] = {}
        self._refresh()

    # -- estimates ------------------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        t, ys = self._theta, self._ys
        self.a = max(0.0, t[0] * ys)
        self.b = max(_MIN_B, t[1] * ys / _TOK_SCALE)
        self.c = max(0.0, t[2] * ys / _BATCH_SCALE)
        self.s = max(0.0, t[3] * ys)

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """(a, b, c) of t_verify = a + b * tokens + c * batch (+ s when it verifies a draft), non-negative."""
        return self.a, self.b, self.c

    def verify_time(self, tokens: float, batch: int, spec: bool = False) -> float:
        return self.a + self.b * tokens + self.c * batch + (self.s if spec else 0.0)

    def step_time(self, tokens: float, batch: int, spec: bool = False) -> float:
        """A whole step: the verify forward plus the measured per-step overhead."""
        return self.verify_time(tokens, batch, spec) + self.overhead

    def width_extra(self, batch: int, width: int) -> float:
        """What a padded decode step whose widest chain drafts `width` tokens costs over a plain step, at this
        batch: measured (`_width_t`) once both widths have `_WIDTH_MIN_STEPS` steps; a width not measured yet
        is priced as the widest measured narrower one (optimistic under a cost that grows with width, so the
        planner tries it once and then knows); without measurements, the linear fit's b * batch * width + s."""
        if width <= 0:
            return 0.0
        linear = self.b * batch * width + self.s
        if self.frozen:
            return linear
        table = self._width_t
        plain = table.get((batch, 1))
        if plain is None or plain[1] < _WIDTH_MIN_STEPS:
            return linear
        for w in range(width, 0, -1):
            got = table.get((batch, w + 1))
            if got is not None and got[1] >= _WIDTH_MIN_STEPS:
                measured = max(0.0, got[0] - plain[0])
                return measured if w == width else min(linear, measured)
        return linear

    def draft_cost(self, drafter: str | None) -> float:
        """Seconds per drafted token of `drafter` (0 for no drafter; a batched drafter's per-row part)."""
        if drafter is None:
            return 0.0
        if drafter in self.draft_step:
            return self._draft.get(drafter, 0.0)
        return self._draft.get(drafter, self.default_draft)

    def draft_step_cost(self, drafter: str | None) -> float:
        """Seconds per chain position of a batched drafter for the whole batch (0 when priced per token)."""
        return self.draft_step.get(drafter, 0.0) if drafter else 0.0

    def row_overhead(self, drafter: str | None) -> float:
        """Seconds a batched drafter costs per row it drafts for, beyond its chain (its catch-up)."""
        return self._row_overhead.get(drafter, 0.0) if drafter else 0.0

    def amortised_draft_cost(self, drafter: str | None, batch: int) -> float:
        """Per drafted token, a batched drafter's step cost shared by the batch's rows."""
        return self.draft_cost(drafter) + self.draft_step_cost(drafter) / max(1, batch)

    def expected_step_time(
        self,
        ks: Sequence[int],
        drafters: Sequence[str | None] | None = None,
        pending: Sequence[int] | int = 1,
    ) -> float:
        """Draft + verify seconds for a batch whose request i drafts ks[i] tokens with drafters[i].

        `pending` is the number of already-known tokens each request feeds the forward (1 in decode, the
        prompt at prefill); an int applies to every request.
        """
        n = len(ks)
        pend = [pending] * n if isinstance(pending, int) else list(pending)
        tokens = float(forward_tokens([k + p for k, p in zip(ks, pend)], self.padded, self.multiple, any(ks)))
        draft = 0.0
        if drafters is None:
            draft = self.default_draft * sum(ks)
        else:
            depth: dict[str, int] = {}
            for k, d in zip(ks, drafters):
                if k and d is not None:
                    draft += k * self.draft_cost(d) + self.row_overhead(d)
                    depth[d] = max(depth.get(d, 0), k)
            draft += sum(self.draft_step_cost(d) * k for d, k in depth.items())
        return self.step_time(tokens, n, any(ks)) + draft

    # -- learning -------------------------------------------------------------------------------------------------
    def observe(self, records: Iterable[StepRecord]) -> None:
        """Learn from records; consecutive records with the same `step` form one forward."""
        if self.frozen:
            return
        group: list[StepRecord] = []
        for r in records:
            if group and r.step != group[0].step:
                self._observe_step(group)
                group = []
            group.append(r)
        if group:
            self._observe_step(group)

    def _observe_step(self, recs: list[StepRecord]) -> None:
        r0 = recs[0]
        self.steps_seen += 1
        if not r0.prefill and r0.overhead_s > 0.0:
            self.overhead += self.draft_alpha * (r0.overhead_s - self.overhead)
        if r0.prefill and not self.fit_prefill:
            pass
        else:
            spec = any(r.drafted for r in recs)
            tokens = forward_tokens([r.chunk_tokens for r in recs], self.padded, self.multiple, spec)
            self.observe_verify(tokens, r0.batch_size, r0.verify_s, spec)
            if self.padded and not r0.prefill:
                key = (r0.batch_size, max(r.chunk_tokens for r in recs))
                cell = self._width_t.setdefault(key, [r0.verify_s, 0.0])
                cell[1] += 1.0
                alpha = max(1.0 / cell[1], _WIDTH_ALPHA)
                cell[0] += alpha * (r0.verify_s - cell[0])
        per: dict[str, int] = {}
        for r in recs:
            n = r.proposed if r.proposed > r.drafted else r.drafted  # what the step's drafting computed
            if r.drafter is not None and n:
                per[r.drafter] = per.get(r.drafter, 0) + n
        if per and not any(d in self.draft_step for d in per):  # batched drafters' step costs are given
            self.observe_draft(per, r0.draft_s)
        elif per and not r0.prefill:
            self._observe_row_overhead(recs, per, r0.draft_s)

    def _observe_row_overhead(self, recs: list[StepRecord], per: dict[str, int], seconds: float) -> None:
        """One EMA step of a batched drafter's per-row overhead: the step's drafting time less its chain
        (positions x step cost + tokens x token cost) and the other drafters' tokens, over the rows it drafted
        for. Steps where two batched drafters ran cannot separate them and teach nothing."""
        batched = [d for d in per if d in self.draft_step]
        if len(batched) != 1:
            return
        d = batched[0]
        rows = [r for r in recs if r.drafter == d and r.k]
        if not rows:
            return
        chain = self.draft_step[d] * max(r.k for r in rows) + self.draft_cost(d) * per[d]
        others = sum(self.draft_cost(o) * n for o, n in per.items() if o != d)
        each = max(0.0, (seconds - chain - others) / len(rows))
        now = self._row_overhead.get(d, 0.0)
        self._row_overhead[d] = now + self.draft_alpha * (each - now)

    def observe_verify(self, tokens: float, batch: int, seconds: float, spec: bool = False) -> None:
        """One RLS step on (tokens, batch, any draft verified) -> seconds. The speculation term is fitted only
        once recent steps include enough of both kinds (otherwise it is the intercept under another name)."""
        lam0 = self.forgetting
        self._n_plain = self._n_plain * lam0 + (0.0 if spec else 1.0)
        self._n_spec = self._n_spec * lam0 + (1.0 if spec else 0.0)
        contrast = min(self._n_plain, self._n_spec) >= _MIN_CONTRAST
        x = (1.0, tokens / _TOK_SCALE, batch / _BATCH_SCALE, 1.0 if spec and contrast else 0.0)
        y = seconds / self._ys - (0.0 if contrast or not spec else self._theta[3])
        P, th, lam = self._P, self._theta, self.forgetting
        n = len(x)
        px = [sum(P[i][j] * x[j] for j in range(n)) for i in range(n)]
        denom = lam + sum(x[i] * px[i] for i in range(n))
        g = [v / denom for v in px]
        err = y - sum(th[i] * x[i] for i in range(n))
        for i in range(n):
            th[i] += g[i] * err
        inv = 1.0 / lam
        newP = [[(P[i][j] - g[i] * px[j]) * inv for j in range(n)] for i in range(n)]
        trace = sum(newP[i][i] for i in range(n))
        if trace > self._p0_trace:  # no wind-up when the data stop exciting a direction
            s = self._p0_trace / trace
            newP = [[v * s for v in row] for row in newP]
        self._P = newP
        self._refresh()

    def observe_draft(self, tokens_by_drafter: dict[str, int], seconds: float) -> None:
        """One normalised-LMS step on seconds = sum_d cost_d * tokens_d.

        With one drafter in the step this is exactly an EMA of seconds per token; steps that mix drafters
        move each estimate in proportion to its share of the tokens, which separates their costs over time.
        """
        est = {d: self._draft.get(d, self.default_draft) for d in tokens_by_drafter}
        err = seconds - sum(est[d] * n for d, n in tokens_by_drafter.items())
        norm = sum(n * n for n in tokens_by_drafter.values())
        if norm <= 0:
            return
        step = self.draft_alpha * err / norm
        for d, n in tokens_by_drafter.items():
            self._draft[d] = max(0.0, est[d] + step * n)

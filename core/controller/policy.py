"""ATLAS: the confidence-aware controller. Per request and step it picks a drafter (or none) and a lookahead k
that maximise the batch's expected goodput (emitted tokens per second).

Prediction (before drafting): for every drafter the controller keeps survival curves C[j] = P(the first j+1
drafted tokens are all accepted), as EMAs at three levels: per request (warm-started from its tenant; after
`request_stale_steps` without use it defers to the tenant again), per tenant (warm-started from the global
curve) and global. A chain of k tokens then emits 1 + C[0] + ... + C[k-1] tokens in expectation. EMA targets
blend the realised outcome with the calibrated survival of the drafted tokens (`Calibrator`: confidence ->
P(accept | earlier accepted)), so a curve is request-specific yet low-variance; positions a drafter could not
fill count as 0, and when a chain stopped only because k did, the target is extended past k with the last
token's calibrated rate (otherwise positions never asked for would never be learned and k could not grow).
Tenant and global EMAs weigh their n-th draft by max(alpha, 1/n), so a young curve leaves its prior quickly.

Choice: with the cost model's t_step = a + b * tokens + c * batch + sum(draft cost), maximising
E[emitted] / E[time] over all requests' (drafter, k) is a fractional programme. Dinkelbach's method solves it
exactly: for a ratio lam, each request independently keeps token j of drafter d iff C_d[j] > lam * (b + draft_d)
(the token's expected yield beats the batch's rate), then lam <- E/T; warm-started from the previous step it
converges in one or two passes. This is the batch verify budget: draft tokens go where expected acceptance is
highest, and none go anywhere once the marginal verify cost outweighs their value (large, compute-bound
batches turn speculation off by themselves; `max_spec_batch` is a hard cap on top).

Peek: cheap drafters (`settings.peek`, the suffix tree) propose for every request before planning; once their
calibration has evidence, a request's curve for such a drafter is the calibrated survival of the draft it has
right now (none: nothing to gain), so the choice between suffix and a head follows the request's own text.

After drafting, `trim` (optional engine hook) cuts a chain where the calibrated survival probability of the
next token no longer pays for verifying it. A guarded drafter (default "adaptive", the one that learns online)
is only a candidate once its calibrator has enough evidence and its recent expected accepted length (a faster
global EMA) is not below the fallback's ("static"); otherwise it is excluded and the remaining drafters
(static, when it is the best of them) take over. A drafter unused for `explore_every` steps gets short drafts
on a deterministic schedule so its calibration keeps learning (on a decode step with nothing planned they are
shadows: drafted, not verified, and scored against the tokens the request then emits). A drafter made unavailable from outside
(`set_available`; the online-learned one while its sidecar is silent) is neither planned nor explored.
Nothing here is random: equal inputs give equal plans (the seed only shifts the exploration rotation).
"""

from __future__ import annotations

from typing import Sequence

from adaspec.core.controller.calibration import Calibrator
from adaspec.core.controller.costs import CostModel
from adaspec.core.controller.settings import ControllerSettings
from adaspec.core.drafters.base import Draft, DraftRequest
from adaspec.core.step import Plan, PlanRequest, PolicyBase, StepRecord
Curves = list  # list[list[float] | None], one survival curve per drafter index
#: A tenant's warm start (the global curve) weighs at most as many drafts as this.
_TENANT_PRIOR_DRAFTS = 8
#: A drafter whose probes keep finding nothing is probed at least once every this many x explore_every steps.
_EXPLORE_BACKOFF = 8


class _Group:
    """A tenant's survival curves and the drafts behind each (an EMA weighs draft n by max(alpha, 1/n), so
    a young curve is a plain mean and its warm start fades as fast as data arrive)."""

    __slots__ = ("cum", "n")

    def __init__(self, n_drafters: int) -> None:
        self.cum: Curves = [None] * n_drafters
        self.n = [0] * n_drafters


class _Req:
    """Controller state of one live request (kept small: it is touched for every request every step)."""

    __slots__ = ("tenant", "cum", "seen", "kcap", "plan_d", "plan_k", "memo", "memo_d", "explore", "peek",
                 "peek_step", "shadow", "shadowing", "slack")

    def __init__(self, tenant: _Group, n_drafters: int) -> None:
        self.tenant = tenant
        self.cum: Curves = [None] * n_drafters
        self.seen = [0] * n_drafters  # step of the last update of each curve (stale ones defer to the tenant)
        self.kcap = 0
        self.plan_d = -1
        self.plan_k = 0
        self.memo: list[float] | None = None  # calibrated survival curve of the full (untrimmed) proposal
        self.memo_d = -1
        self.explore = False
        self.peek: list[list[float] | None] | None = None  # this step's calibrated curves of peeked drafts
        self.peek_step = -1
        #: Drafts the step did not serve, scored against the tokens the request emits next (`_Shadow`): at most
        #: one per drafter, a peeked one (calibration only) or an exploration draft kept out of a plain forward.
        self.shadow: list[_Shadow] = []
        self.shadowing = -1  # the drafter whose exploration draft this step's `trim` keeps as a shadow
        #: The per-request floor's account, in plain decode steps: the allowance (`request_floor_slack` x its
        #: token budget) plus, over its padded decode steps, the tokens each plan expected it to emit minus the
        #: step's planned cost relative to a plain step (expected, so a draft's bad luck is not a debt); None
        #: until first planned.
        self.slack: float | None = None


class _Shadow:
    """A draft scored against what its request emits instead of being verified. `curve` set: an exploration
    draft, whose outcome teaches the survival curves as a served draft's would (k = `kcap`); None: a peeked
    draft, whose outcome goes to the calibrator alone."""

    __slots__ = ("d", "tokens", "conf", "matched", "step", "curve", "kcap")

    def __init__(self, d: int, tokens: list[int], conf: list[float], step: int,
                 curve: list[float] | None = None, kcap: int = 0) -> None:
        self.d, self.tokens, self.conf, self.matched, self.step = d, tokens, conf, 0, step
        self.curve, self.kcap = curve, kcap


def make_costs(s: ControllerSettings) -> CostModel:
    """The cost model configured from controller settings."""
    return CostModel(
        verify_fixed_s=s.verify_fixed_s,
        verify_token_s=s.verify_token_s,
        verify_request_s=s.verify_request_s,
        draft_token_s=s.draft_token_s,
        forgetting=s.cost_forgetting,
        prior_weight=s.cost_prior_weight,
        draft_alpha=s.draft_cost_alpha,
        fit_prefill=s.cost_fit_prefill,
    )


def make_calibrator(s: ControllerSettings) -> Calibrator:
    return Calibrator(
        bins=s.calib_bins,
        positions=s.calib_positions,
        prior_strength=s.calib_prior_strength,
        half_life_tokens=s.calib_half_life_tokens,
        refit_tokens=s.calib_refit_tokens,
    )


class AtlasPolicy(PolicyBase):
    """ATLAS over named drafters: `plan`/`feedback`, plus the `peek`, `peeked`, `trim`, `finish` and
    `set_available` hooks of `PolicyBase`. `plan` and `feedback` are hand-inlined loops (locals, no helper
    calls per row) because they run for every request every step within a ~50 us budget."""

    def __init__(
        self,
        drafters: Sequence[str],
        settings: ControllerSettings | None = None,
        costs: CostModel | None = None,
    ) -> None:
        s = settings if settings is not None else ControllerSettings()
        self.settings = s
        self.names = [d for d in dict.fromkeys(drafters) if d and d != "none"]
        self.index = {d: i for i, d in enumerate(self.names)}
        D, K = len(self.names), s.max_k
        self.costs = costs if costs is not None else make_costs(s)
        self.calibrators = [make_calibrator(s) for _ in range(D)]
        has_floor = s.fallback in self.index
        prior = [s.prior_acceptance if d == s.fallback or not has_floor else s.prior_acceptance_others
                 for d in self.names]
        self.glob: Curves = [[prior[d] ** (j + 1) for j in range(K)] for d in range(D)]
        self.glob_n = [1] * D  # drafts behind each global curve (the prior counts as one)
        #: Faster global curves, only for the guardrail's "has it dropped below the fallback?" check.
        self.recent: Curves = [list(c) for c in self.glob]
        self.tenants: dict[str, _Group] = {}
        self.requests: dict[str, _Req] = {}
        self._plans = [[Plan(d, k) for k in range(K + 1)] for d in self.names]
        self._none = Plan(None, 0)
        self._guarded = [self.index[g] for g in s.guarded if g in self.index]
        self._fallback = self.index.get(s.fallback)
        self.trusted = [True] * D
        #: Set from outside (`set_available`): False while a drafter's weights are unwatched (sidecar down).
        self.available = [True] * D
        self._short = [False] * D  # guarded and below its evidence threshold: explored 4x as often
        self.last_used = [0] * D
        #: Steps between explorations of each drafter: doubled (up to `_EXPLORE_BACKOFF` x explore_every) after
        #: each exploration that did not lead the planner to choose it, reset when it is chosen.
        self.explore_period = [s.explore_every] * D
        self._chosen = [False] * D  # planned (not explored) since its last exploration
        self._versions = [0] * D  # the weight version each drafter's last record carried
        self.step = 0
        self.lam = 0.0  # the batch goodput ratio (tokens/s) the last plan achieved; trim prices tokens with it
        self._lam_decode = 0.0
        self._choice_d: list[int] = []
        self._choice_k: list[int] = []
        self._curves: list = []  # the survival curve behind each row's choice (batched-drafter fill pass)
        self._rows: list[_Req] = []
        self._tgt = [0.0] * K
        self._explore_seed = s.seed

    # -- state ---------------------------------------------------------------------------------------------------
    def _tenant(self, name: str) -> _Group:
        t = self.tenants.get(name)
        if t is None:
            t = self.tenants[name] = _Group(len(self.names))
            if len(self.tenants) > self.settings.max_tracked_tenants:
                del self.tenants[next(iter(self.tenants))]
        return t

    def _admit(self, request_id: str, tenant: str) -> _Req:
        r = self.requests[request_id] = _Req(self._tenant(tenant), len(self.names))
        if len(self.requests) > self.settings.max_tracked_requests:
            del self.requests[next(iter(self.requests))]
        return r

    def finish(self, request_id: str) -> None:
        """Drop a finished request's statistics (optional: old ones are evicted anyway)."""
        self.requests.pop(request_id, None)

    def curve(self, drafter: str, request_id: str | None = None, tenant: str | None = None) -> list[float]:
        """The survival curve the planner would use (request, else tenant, else global level)."""
        di = self.index[drafter]
        if request_id is not None and request_id in self.requests:
            r = self.requests[request_id]
            own = r.cum[di] if self.step - r.seen[di] <= self.settings.request_stale_steps else None
            return list(own or r.tenant.cum[di] or self.glob[di])
        if tenant is not None and tenant in self.tenants:
            return list(self.tenants[tenant].cum[di] or self.glob[di])
        return list(self.glob[di])

    def set_available(self, drafter: str, available: bool) -> None:
        """Allow or forbid a drafter (e.g. the online-learned one while its sidecar is silent: `LinkGuard`).
        An unavailable drafter is neither planned nor explored; its statistics are kept for its return."""
        d = self.index.get(drafter)
        if d is not None:
            if available and not self.available[d]:
                self.explore_period[d] = self.settings.explore_every  # back: probe it as a new drafter
            self.available[d] = bool(available)

    def set_padded_verify(self, padded: bool, multiple: int = 1) -> None:
        """Padded: plan the batch's width (every row pays the widest chain). Ragged with a packing multiple:
        fill a speculative step's round-up with draft tokens (`_fill_to_multiple`)."""
        self.costs.padded = bool(padded)
        self.costs.multiple = max(1, int(multiple))

    def _update_trust(self) -> None:
        """trusted = available and, for a guarded drafter, past its evidence and keeping up with the fallback."""
        s = self.settings
        fb = self._fallback
        self.trusted[:] = self.available
        for g in self._guarded:
            ok = self.calibrators[g].evidence >= s.guard_min_evidence
            self._short[g] = not ok
            if ok and fb is not None:
                ok = sum(self.recent[g]) >= sum(self.recent[fb]) - s.guard_margin
            self.trusted[g] = ok and self.available[g]

    # -- peek (engine hook, before plan) -------------------------------------------------------------------------
    @property
    def peek(self) -> tuple[str, ...]:
        """Drafters the engine asks for every request before `plan` (then calls `peeked`)."""
        return tuple(d for d in self.settings.peek if d in self.index)

    @property
    def peek_k(self) -> int:
        return self.settings.max_k

    def peeked(self, drafter: str, requests: Sequence[PlanRequest], drafts: Sequence[Draft]) -> None:
        """This step's proposals of a cheap drafter: once its calibration has evidence, the planner prices it per
        request from the calibrated confidence of the draft it actually has (an empty draft: nothing to gain)
        instead of from running statistics -- a domain change shows at once, not after a few drafts.

        Every request also keeps one peeked draft (while none is pending) to score against what it emits next
        (`_score_shadow`): a deterministic draft token is accepted with the target's probability of it, and the
        token the target emits there is x with that same probability, so matching the emitted tokens is an
        unbiased acceptance sample -- exact under greedy. The peeked drafter's calibration so learns from every
        request, including those the plan does not serve it to (without that, a drafter that rightly drafts
        little in one domain reaches the next with no evidence and is priced from stale averages)."""
        d = self.index.get(drafter)
        if d is None:
            return
        cal, step, D = self.calibrators[d], self.step + 1, len(self.names)
        priced = cal.evidence >= self.settings.peek_min_evidence
        for st, draft in zip(requests, drafts):
            r = self.requests.get(st.request_id)
            if r is None:
                r = self._admit(st.request_id, st.tenant)
            if draft.tokens and not any(sh.d == d for sh in r.shadow):
                r.shadow.append(_Shadow(d, list(draft.tokens), list(draft.confidence), step))
            if priced:
                if r.peek_step != step:
                    r.peek, r.peek_step = [None] * D, step
                r.peek[d] = cal.cumulative(draft.confidence) if draft.tokens else []

    def _score_shadows(self, r: _Req, rec: StepRecord) -> None:
        """Advance a request's pending shadow drafts over the tokens this step emitted; when one is decided (a
        token differs, or all matched) its outcome goes to the drafter's calibrator (and, for an exploration
        draft, to its survival curves, as a served draft's would)."""
        keep = []
        for sh in r.shadow:
            if sh.curve is None and sh.step == self.step and rec.drafter == self.names[sh.d]:
                continue  # served as peeked: the step's own feedback counts it
            if not rec.emitted_tokens:
                continue  # an engine that does not expose the emitted ids: nothing to score against
            tokens, matched, n = sh.tokens, sh.matched, len(sh.tokens)
            for tok in rec.emitted_tokens:
                if tok != tokens[matched]:
                    break
                matched += 1
                if matched == n:
                    break
            else:
                sh.matched = matched
                keep.append(sh)
                continue
            self.calibrators[sh.d].update(sh.conf, matched)
            if sh.curve is not None:
                self._learn(sh.d, sh.curve, matched, n, sh.kcap, r, r.tenant)
        r.shadow = keep

    # -- plan ------------------------------------------------------------------------------------------------------
    def plan(self, requests: Sequence[PlanRequest]) -> list[Plan]:
        B = len(requests)
        if B == 0:
            return []
        s = self.settings
        self.step += 1
        step = self.step
        K = s.max_k
        cm = self.costs
        b = cm.b
        self._update_trust()
        capped = bool(s.max_spec_batch) and B >= s.max_spec_batch
        if capped:
            cand: list[int] = []
        else:
            cand = [d for d in range(len(self.names)) if self.trusted[d]]
        cost = [b + cm.amortised_draft_cost(self.names[d], B) for d in cand]

        if len(self._choice_d) < B:
            grow = B - len(self._choice_d)
            self._choice_d.extend([-1] * grow)
            self._choice_k.extend([0] * grow)
        choice_d, choice_k = self._choice_d, self._choice_k
        curves = self._curves
        if len(curves) < B:
            curves.extend([None] * (B - len(curves)))
        rows = self._rows
        rows.clear()
        reqs = self.requests
        pending = 0
        for st in requests:
            r = reqs.get(st.request_id)
            if r is None:
                r = self._admit(st.request_id, st.tenant)
            room = st.max_new_tokens - len(st.output) - 1
            r.kcap = K if room >= K else (room if room > 0 else 0)
            if r.slack is None:
                r.slack = s.request_floor_slack * st.max_new_tokens  # inf: no floor
            r.explore = False
            r.shadowing = -1
            r.memo = None
            pending += len(st.pending)
            rows.append(r)

        base_t = cm.a + cm.overhead + b * pending + cm.c * B
        decode = pending == B
        lam = self._lam_decode if (decode and self._lam_decode > 0.0) else B / base_t
        glob = self.glob
        stale = step - s.request_stale_steps
        pairs = list(zip(cand, cost))
        # A batched drafter's per-row overhead (its catch-up) is paid once per row it drafts for.
        fixed = [cm.row_overhead(self.names[d]) for d in cand]
        for _ in range(s.plan_iters if pairs else 1):
            thr = [(d, c, lam * c, f) for (d, c), f in zip(pairs, fixed)]
            E = float(B)
            T = base_t
            for i, r in enumerate(rows):
                kc = r.kcap
                best_g, best_d, best_k, best_v, best_c, best_f, best_curve = 0.0, -1, 0, 0.0, 0.0, 0.0, None
                if kc:
                    rc, tc, rs = r.cum, r.tenant.cum, r.seen
                    pk = r.peek if r.peek_step == step else None
                    for d, c, t, f in thr:
                        curve = pk[d] if pk is not None else None
                        if curve is None:
                            curve = rc[d] if rs[d] >= stale else None
                        if curve is None:
                            curve = tc[d] or glob[d]
                        k = 0
                        v = 0.0
                        for x in curve:
                            if x <= t or k == kc:
                                break
                            v += x
                            k += 1
                        if k:
                            g = v - t * k - lam * f
                            if g > best_g:
                                best_g, best_d, best_k, best_v, best_c, best_f, best_curve = g, d, k, v, c, f, curve
                choice_d[i] = best_d
                choice_k[i] = best_k
                curves[i] = best_curve
                if best_k:
                    E += best_v
                    T += best_c * best_k + best_f
            new = E / T
            done = abs(new - lam) <= s.plan_tol * lam
            lam = new
            if done:
                break
        if cm.padded and decode and pairs:
            lam = self._plan_width(B, rows, cand, base_t, lam, choice_d, choice_k, curves)
        elif cm.s > 0.0 and pairs and any(choice_k[:B]):
            # A forward that verifies any draft costs s more: speculate this step only if the plan still wins.
            if E / (T + cm.s) <= B / base_t:
                for i in range(B):
                    choice_d[i], choice_k[i], curves[i] = -1, 0, None
                lam = B / base_t
            else:
                lam = E / (T + cm.s)
        self.lam = lam
        if decode:
            self._lam_decode = lam
        if cm.draft_step and pairs and not cm.padded:
            self._drop_unpaid_batched(B, choice_d, choice_k, curves, lam)
            self._fill_batched(B, rows, choice_d, choice_k, curves, lam)

        if cm.multiple > 1 and decode and pairs and not cm.padded and any(choice_k[:B]):
            self._fill_to_multiple(B, rows, cand, choice_d, choice_k, curves, lam)

        if s.explore_every and not capped:  # the hard cap means no drafting at all, exploration included
            self._explore(step, B, rows, choice_d, choice_k, curves, shadow=decode and not any(choice_k[:B]))
        plans = self._plans
        out: list[Plan] = []
        last = self.last_used
        for i in range(B):
            r = rows[i]
            d, k = choice_d[i], choice_k[i]
            r.plan_d, r.plan_k = d, k
            if d >= 0 and k:
                last[d] = step
                if not r.explore:
                    self._chosen[d] = True
                out.append(plans[d][k])
            else:
                out.append(self._none)
        return out

    def _plan_width(self, B: int, rows: list[_Req], cand: list[int], base_t: float, lam: float,
                    choice_d: list[int], choice_k: list[int], curves: list) -> float:
        """Right-padded verify (the reference engine): a step feeds every row as many tokens as its widest
        chain, so a token's verify cost is not its own but the width's, as the cost model measures it per
        (batch, width) live (`CostModel.width_extra`; linear b * batch * w + s before that). Choose the width w
        (0..max_k) that
        maximises the batch's expected emitted tokens per second; within it each row drafts, with the drafter
        that gains most, while a token's survival beats its own draft cost (verifying it is already paid).
        With `request_floor_slack` set, a width that would take any row past its floor is not a candidate
        (`_within_floor`), and each row's account is charged the chosen plan. Returns the chosen plan's goodput."""
        cm = self.costs
        stale = self.step - self.settings.request_stale_steps
        dcs = [(d, cm.amortised_draft_cost(self.names[d], B)) for d in cand]
        # Per row and drafter: the curve and its cumulative gains g[k] = sum_{j<k} (C[j] - lam * dc), stopping at
        # the first token that does not pay for its drafting (the planner never skips a position).
        table = []
        for r in rows:
            opts = []
            for d, dc in dcs:
                curve = self._curve(r, d, stale)
                t = lam * dc
                gains, vals, g, v = [0.0], [0.0], 0.0, 0.0
                for x in curve[: r.kcap]:
                    if x <= t:
                        break
                    g += x - t
                    v += x
                    gains.append(g)
                    vals.append(v)
                opts.append((d, dc, curve, gains, vals))
            table.append(opts)
        best_ratio, best = B / base_t, None
        floored = self.settings.request_floor_slack != float("inf")
        for w in range(1, self.settings.max_k + 1):
            E, T, W = float(B), base_t, 0
            picks = []
            for opts in table:
                bg, pick = 0.0, None
                for d, dc, curve, gains, vals in opts:
                    k = w if w < len(gains) else len(gains) - 1
                    if k and gains[k] > bg:
                        bg, pick = gains[k], (d, k, curve, vals[k], dc)
                picks.append(pick)
                if pick is not None:
                    E += pick[3]
                    T += pick[4] * pick[1]
                    if pick[1] > W:
                        W = pick[1]
            if W < w and best is not None and best[0] == W:
                continue  # the same plan as a narrower width
            T += cm.width_extra(B, W)
            if floored and not self._within_floor(rows, picks, T / base_t):
                continue
            if E / T > best_ratio:
                best_ratio, best = E / T, (W, picks, T / base_t)
        for i in range(B):
            pick = best[1][i] if best is not None else None
            if pick is None:
                choice_d[i], choice_k[i], curves[i] = -1, 0, None
            else:
                choice_d[i], choice_k[i], curves[i] = pick[0], pick[1], pick[2]
        if floored and best is not None:  # charge each row's floor account with the chosen plan
            for r, pick in zip(rows, best[1]):
                r.slack += 1.0 + (pick[3] if pick is not None else 0.0) - best[2]
        return best_ratio

    @staticmethod
    def _within_floor(rows: list[_Req], picks: list, ratio: float) -> bool:
        """The per-request floor: a step `ratio` times a plain step's cost charges each row that much, against
        the tokens it expects to emit (1 + its pick's expected accepted); no row may go past its slack. Batch
        goodput alone would widen a step for one row's long draft while the others, emitting one token each,
        pay the width: at a phase boundary, the last chat requests paid for the first code requests' drafts."""
        for r, pick in zip(rows, picks):
            emitted = 1.0 + (pick[3] if pick is not None else 0.0)
            if ratio - emitted > r.slack:
                return False
        return True

    def _drop_unpaid_batched(self, B: int, choice_d: list[int], choice_k: list[int], curves: list,
                             lam: float) -> None:
        """The per-row pass prices a batched drafter's chain positions as if the whole batch shared them; when
        only a row or two chose it, its positions (its step cost x the deepest chain) may cost more than its
        rows' tokens gain at the batch's goodput lam. Then none of its rows drafts with it this step (on this
        CPU one head position costs about as much as verifying a few tokens)."""
        cm = self.costs
        gain: dict[int, float] = {}
        depth: dict[int, int] = {}
        for i in range(B):
            d, k = choice_d[i], choice_k[i]
            if d < 0 or not k or cm.draft_step_cost(self.names[d]) <= 0.0 or curves[i] is None:
                continue
            v = sum(curves[i][:k])
            name = self.names[d]
            gain[d] = gain.get(d, 0.0) + v - lam * ((cm.b + cm.draft_cost(name)) * k + cm.row_overhead(name))
            depth[d] = max(depth.get(d, 0), k)
        for d, g in gain.items():
            if g < lam * cm.draft_step_cost(self.names[d]) * depth[d]:
                for i in range(B):
                    if choice_d[i] == d:
                        choice_d[i], choice_k[i], curves[i] = -1, 0, None

    def _fill_batched(self, B: int, rows: list[_Req], choice_d: list[int], choice_k: list[int],
                      curves: list, lam: float) -> None:
        """A batched drafter runs as many chain positions as its longest chain, for all its rows at once: up to
        that depth, a row's further token costs only its verification (and per-row draft cost), so extend each
        row while its survival probability still pays for that."""
        cm = self.costs
        depth = self._batched_depths(B, choice_d, choice_k)
        for i in range(B):
            d = choice_d[i]
            top = depth.get(d, 0)
            k = choice_k[i]
            if k >= top or curves[i] is None:
                continue
            t = lam * (cm.b + cm.draft_cost(self.names[d]))
            curve, kc = curves[i], min(top, rows[i].kcap)
            while k < kc and k < len(curve) and curve[k] > t:
                k += 1
            choice_k[i] = k

    def _batched_depths(self, B: int, choice_d: list[int], choice_k: list[int]) -> dict[int, int]:
        """The deepest chain planned for each batched drafter: the positions it runs this step anyway."""
        cm, depth = self.costs, {}
        for i in range(B):
            d = choice_d[i]
            if d >= 0 and cm.draft_step_cost(self.names[d]) > 0.0 and choice_k[i] > depth.get(d, 0):
                depth[d] = choice_k[i]
        return depth

    def _curve(self, r: _Req, d: int, stale: int) -> list[float]:
        """The survival curve the planner uses for row r and drafter d: this step's peek, else the request's
        own (while fresh), else its tenant's, else the global one."""
        if r.peek_step == self.step and r.peek is not None and r.peek[d] is not None:
            return r.peek[d]
        if r.seen[d] >= stale and r.cum[d] is not None:
            return r.cum[d]
        return r.tenant.cum[d] or self.glob[d]

    def _fill_to_multiple(self, B: int, rows: list[_Req], cand: list[int], choice_d: list[int],
                          choice_k: list[int], curves: list, lam: float) -> None:
        """A packed speculative forward computes its tokens rounded up to the engine's multiple anyway (fillers),
        so up to that round-up a further draft token costs no verification, only its drafting: spend the
        round-up on the tokens most likely to survive -- a row's next chain position, or a first token for a
        row that drafts nothing -- while a token's survival beats its draft cost at the batch's goodput. A
        batched drafter is extended only within the chain depth it runs anyway."""
        cm = self.costs
        tokens = B + sum(choice_k[:B])  # decode: one pending token per row
        room = -tokens % cm.multiple
        if not room:
            return
        stale = self.step - self.settings.request_stale_steps
        depth = self._batched_depths(B, choice_d, choice_k)

        def best_next(i: int) -> tuple[float, int, list[float] | None]:
            """(gain, drafter, curve) of row i's best next token; gain <= 0 when none pays."""
            k, kc = choice_k[i], rows[i].kcap
            if k >= kc:
                return 0.0, -1, None
            options = [choice_d[i]] if choice_d[i] >= 0 and k else cand
            best = (0.0, -1, None)
            for d in options:
                name = self.names[d]
                if cm.draft_step_cost(name) > 0.0 and k >= depth.get(d, 0):
                    continue  # a chain position the batched drafter would not run otherwise
                curve = curves[i] if choice_d[i] == d and curves[i] is not None else self._curve(rows[i], d, stale)
                if k < len(curve):
                    g = curve[k] - lam * (cm.draft_cost(name) + (0.0 if k else cm.row_overhead(name)))
                    if g > best[0]:
                        best = (g, d, curve)
            return best

        nxt = [best_next(i) for i in range(B)]
        for _ in range(room):
            i = max(range(B), key=lambda j: nxt[j][0])
            g, d, curve = nxt[i]
            if g <= 0.0:
                return
            choice_d[i], choice_k[i], curves[i] = d, choice_k[i] + 1, curve
            nxt[i] = best_next(i)

    def _could_pay(self, d: int, batch: int) -> bool:
        """Whether a token of drafter d could pay if it were always accepted: the batch's time per emitted token
        (1 / lam) covers its marginal cost, verify + draft (the test `_extend` applies to every planned token)."""
        cm = self.costs
        return self.lam * (cm.b + cm.amortised_draft_cost(self.names[d], batch)) < 1.0

    def _explore(self, step: int, B: int, rows: list[_Req], choice_d: list[int], choice_k: list[int],
                 curves: list, shadow: bool = False) -> None:
        """Each drafter unused for `explore_every` steps (a guarded one short of evidence: a quarter of that)
        drafts `explore_k` tokens for `explore_fraction` of the batch (at least one request), on a deterministic
        rotation, so its calibration and curves keep learning.

        Exploration is priced like any draft. A drafter none of whose tokens could pay even if every one were
        accepted (the batch's time per emitted token times its marginal cost, verify + draft, is >= 1: the test
        `_extend` applies to each planned token) is not explored: no evidence could ever make the planner pick
        it at these costs. With padded verify every row pays the batch's widest chain: exploration rides along
        within the planned width, taken by every row that drafts nothing (the width is paid once, whatever the
        number of rows using it; when every row has a plan, `explore_fraction` of them as usual). Ragged, a probe
        goes to rows that draft nothing first (in rotation), then to the planned rows that expect least: a probe
        displaces the row's own draft, which in a code phase was the suffix tree's ~1.3 expected tokens.

        `shadow` (a decode step with nothing planned): verifying an exploration draft would turn a plain forward
        into a speculative one (on this CPU ~30% dearer), so the draft is made but not verified: `trim` keeps it
        as a shadow scored against the tokens the request emits next (`_score_shadows`), which teaches the
        calibration and the curves the same outcome at the price of drafting alone. A guarded drafter short of
        evidence gets no more probes than the others then.

        Backoff: a probe costs drafting (and a drafter's catch-up over the positions since it last ran: a head
        pass over them), so a drafter whose probes keep finding nothing is probed half as often each time, down
        to once every `_EXPLORE_BACKOFF` x explore_every steps; once the planner chooses it, the period is back
        to explore_every. On a weight swap of the online-learned drafter the period resets too (`feedback`)."""
        s = self.settings
        n = max(1, int(B * s.explore_fraction))
        explore_k = s.explore_k
        padded = self.costs.padded
        width = max(choice_k[:B], default=0)
        if padded and not shadow:
            explore_k = max(1, min(explore_k, width))
        for d in range(len(self.names)):
            if not self.available[d]:
                continue
            boost = self._short[d] and not shadow and (not padded or width > 0)
            period = max(1, s.explore_every // 4) if boost else self.explore_period[d]
            if step - self.last_used[d] < period:
                continue
            if not self._could_pay(d, B):
                continue  # cannot pay at any acceptance: its evidence would never be used
            if self._chosen[d]:
                self.explore_period[d] = s.explore_every
            elif not boost:
                self.explore_period[d] = min(self.explore_period[d] * 2, s.explore_every * _EXPLORE_BACKOFF)
            self._chosen[d] = False
            idle = padded and not shadow and any(
                rows[i].kcap and not rows[i].explore and not choice_k[i] for i in range(B))
            start = (self._explore_seed + step + 7919 * d) % B
            left = B if idle else n
            order = [(start + o) % B for o in range(B)]
            if not padded and not shadow:  # idle rows first, then the planned rows that expect least
                order.sort(key=lambda i: sum(curves[i][:choice_k[i]]) if choice_k[i] and curves[i] else 0.0)
            for i in order:
                r = rows[i]
                if r.kcap and not r.explore and not (idle and choice_k[i]):
                    r.explore = True
                    if shadow:
                        r.shadowing = d
                    choice_d[i] = d
                    choice_k[i] = min(explore_k, r.kcap)
                    left -= 1
                    if not left:
                        break

    # -- trim (engine hook, after propose) ---------------------------------------------------------------------------
    def trim(self, request: DraftRequest, drafter: str, draft: Draft) -> int:
        """How many leading tokens of `draft` to verify: stop where the next token's calibrated survival
        probability times the batch's time per emitted token no longer covers its marginal cost (all of
        them with `settings.trim` off).

        Engine hook, called once per request right after `propose` (before verification), with the drafter
        the plan named; only `request.request_id` is read, so a drafter-side wrapper can call it too."""
        n = len(draft.tokens)
        d = self.index.get(drafter)
        if d is None or n == 0 or not self.settings.trim:
            return n
        cal = self.calibrators[d]
        curve = cal.cumulative(draft.confidence)
        r = self.requests.get(request.request_id)
        if r is not None:
            r.memo, r.memo_d = curve, d
            if r.shadowing == d:  # an exploration draft kept out of a plain forward: scored, not verified
                r.shadow = [sh for sh in r.shadow if sh.d != d]
                r.shadow.append(_Shadow(d, list(draft.tokens), list(draft.confidence), self.step, curve,
                                        min(r.plan_k, r.kcap)))
                return 0
            if r.explore:
                return n
        if cal.evidence < self.settings.trim_min_evidence:
            return n
        cost = self.costs.b
        if self.settings.trim_counts_draft_cost:
            cost += self.costs.draft_cost(drafter)
        t = self.lam * cost
        k = 0
        for x in curve:
            if x <= t:
                break
            k += 1
        return k

    # -- feedback ---------------------------------------------------------------------------------------------------
    def feedback(self, records: Sequence[StepRecord]) -> None:
        self.costs.observe(records)
        index, reqs, cals = self.index, self.requests, self.calibrators
        for rec in records:
            r = reqs.get(rec.request_id)
            if r is not None and r.shadow and not rec.prefill:
                self._score_shadows(r, rec)
            name = rec.drafter
            if name is None:
                continue
            d = index.get(name)
            if d is None:
                continue
            if rec.weight_version != self._versions[d]:  # new weights: probe them as a new drafter
                self._versions[d] = rec.weight_version
                self.explore_period[d] = self.settings.explore_every
            conf = rec.confidence
            kcap = rec.k
            curve = None
            if r is not None:
                if r.shadowing == d:  # its draft became a shadow (`trim`): learned once it is decided
                    r.shadowing = -1
                    r.memo = None
                    continue
                if r.memo_d == d and r.memo is not None:
                    curve = r.memo
                r.memo = None
                if r.kcap < kcap:
                    kcap = r.kcap
                tenant = r.tenant
            else:
                tenant = self._tenant(rec.tenant)
            cal = cals[d]
            cal.update(conf, rec.accepted)
            if curve is None:
                curve = cal.cumulative(conf)
            self._learn(d, curve, rec.accepted, rec.drafted, kcap, r, tenant)

    def _learn(self, d: int, curve: list[float], a: int, n: int, kcap: int, r: _Req | None, tenant: _Group) -> None:
        """One draft's outcome (a of its n tokens accepted, k = kcap asked; `curve` its calibrated survival) into
        drafter d's global, guard, tenant and request survival curves."""
        s = self.settings
        K = s.max_k
        w = s.ema_outcome_weight
        w1 = 1.0 - w
        ar, at, ag, af = s.ema_request_alpha, s.ema_tenant_alpha, s.ema_global_alpha, s.guard_alpha
        tgt = self._tgt
        m = len(curve)
        L = kcap if kcap > m else m
        if L > K:
            L = K
        rejected = a < n
        for j in range(L):
            cj = curve[j] if j < m else 0.0
            if j < a:
                tgt[j] = w + w1 * cj
            elif rejected:
                tgt[j] = w1 * cj
            else:
                tgt[j] = cj
        if m >= kcap and 0 < L < K:
            # The chain stopped because we asked for no more: extend the target with the last token's
            # conditional rate, so later positions are learned too and k can grow when it pays.
            rho = curve[m - 1] / curve[m - 2] if m >= 2 and curve[m - 2] > 0.0 else curve[0]
            x = tgt[L - 1]
            for j in range(L, K):
                x *= rho
                tgt[j] = x
            L = K
        g = self.glob[d]
        gn = self.glob_n[d] = self.glob_n[d] + 1
        alpha = 1.0 / gn if gn * ag < 1.0 else ag
        for j in range(L):
            g[j] += alpha * (tgt[j] - g[j])
        fast = self.recent[d]
        alpha = 1.0 / gn if gn * af < 1.0 else af
        for j in range(L):
            fast[j] += alpha * (tgt[j] - fast[j])
        tc = tenant.cum[d]
        if tc is None:
            tc = tenant.cum[d] = list(g)
            tenant.n[d] = gn if gn < _TENANT_PRIOR_DRAFTS else _TENANT_PRIOR_DRAFTS
        else:
            tn = tenant.n[d] = tenant.n[d] + 1
            alpha = 1.0 / tn if tn * at < 1.0 else at
            for j in range(L):
                tc[j] += alpha * (tgt[j] - tc[j])
        if r is not None:
            rc = r.cum[d]
            if rc is None or self.step - r.seen[d] > s.request_stale_steps:
                rc = r.cum[d] = list(tc)
            r.seen[d] = self.step
            for j in range(L):
                rc[j] += ar * (tgt[j] - rc[j])

"""ATLAS inside one SGLang scheduler process, without SGLang: plan, chain drafts, records, logs, weights.

`AtlasRuntime` is what the worker calls at each point of a decode step; it only sees plain request views
and lists/tensors, so all of its logic runs (and is tested) on CPU with fakes:

1. `begin_batch()` -- first thing of every batch: staged weight updates are copied in place (the adaptive
   head's `WeightStager`), so a whole step drafts with one complete version and CUDA graphs stay valid
   (`safe_begin_batch`: a failure there is counted and logged, never raised into the scheduler).
2. `plan(rows)` -- drafters learn about new requests and drop departed ones; the controller
   (`AtlasPolicy`) picks drafter and lookahead per request; the CPU drafters (suffix, adaptive) propose and
   the controller trims; the batch's step count is the smallest pre-captured one covering the longest chain,
   with hysteresis (`StickySteps`: a runtime-state switch is not free).
3. `complete(plan, accept_lens, tokens, verified)` -- after verify, on the CPU copy of the results: one
   `StepRecord` per request, controller feedback, drafter observations, metrics, and the records queued for
   the sidecar (`BackgroundSender`: never blocks). A chain row records what its drafter proposed (as the
   reference engine does), not the padded width SGLang verified.

Nothing here walks a request's whole context per step: a request's tokens are a `JoinedTokens` view over
SGLang's own arrays.
"""

from __future__ import annotations

import logging
import random
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from adaspec.core.drafters.base import Draft, Drafter, DraftRequest, JoinedTokens, Observation
from adaspec.core.step import Plan, PolicyBase, StepRecord, peek_drafts, propose_chains
from adaspec.core.online.sender import DeviceBudget, StepLogs
from adaspec.sglang_ext.states import StickySteps

STATIC = "static"
log = logging.getLogger(__name__)


@dataclass
class ReqView:
    """One request as the plugin sees it (token sequences are live references, e.g. SGLang's arrays)."""

    request_id: str
    tenant: str
    prompt: Sequence[int]
    output: Sequence[int]
    max_new_tokens: int

    def tokens(self) -> JoinedTokens:
        """prompt + output, as a view (no copy of either)."""
        return JoinedTokens(self.prompt, self.output)

    def draft_request(self) -> DraftRequest:
        return DraftRequest(self.request_id, self.tokens(), len(self.prompt), self.tenant)

    @property
    def last_token(self) -> int:
        return int(self.output[-1]) if len(self.output) else int(self.prompt[-1])

    @property
    def pending(self) -> tuple[int]:
        """A decode step feeds one token before the draft: the last one (the draft root). With
        `request_id`, `tenant`, `max_new_tokens` and `output` this is what a policy plans from
        (`adaspec.core.step.PlanRequest`)."""
        return (self.last_token,)


@dataclass
class StepPlan:
    """One decode step's decisions: per request the drafter verified (None = none) and its chain."""

    step: int
    rows: list[ReqView]
    drafters: list[str | None]
    ks: list[int]
    #: Chain rows (suffix/adaptive; empty Draft = nothing to verify); None = the row takes EAGLE's draft.
    chains: list[Draft | None]
    steps: int
    draft_s: float
    started: float = field(default_factory=time.perf_counter)

    @property
    def uses_static(self) -> bool:
        """Whether SGLang's EAGLE-3 draft forward has to run this step."""
        return self.steps > 0 and any(c is None for c in self.chains)

    def chain_tokens(self) -> list[list[int] | None]:
        return [None if c is None else list(c.tokens) for c in self.chains]

    def pads(self) -> list[int]:
        """What pads each chain row to the batch's width: the request's last token (the draft root), so an
        empty row repeats the context rather than verifying an arbitrary id."""
        return [r.last_token for r in self.rows]


class AtlasRuntime:
    """Controller + CPU drafters + logs + weight swaps for one worker; SGLang-free."""

    def __init__(
        self,
        policy: PolicyBase,
        drafters: Mapping[str, Drafter],
        candidate_steps: Sequence[int],
        *,
        static: bool = True,
        stagers: Sequence[Any] = (),
        sender: Any = None,
        listeners: Sequence[Callable[[list[StepRecord]], Any]] = (),
        adaptive: str | None = "adaptive",
        feature_sample_rate: float = 0.0,
        feature_budget: DeviceBudget | None = None,
        downshift_after: int = 0,
        metrics: Any = None,
        seed: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.policy = policy
        self.drafters = dict(drafters)
        self.steps_chooser = StickySteps(candidate_steps, downshift_after)
        self.static = static
        self.stagers = list(stagers)
        self.sender = sender
        self.listeners = list(listeners)
        self.adaptive = adaptive if adaptive in self.drafters else None
        self.feature_sample_rate = feature_sample_rate
        #: Bounds the device memory of hidden-state copies waiting in the log queue (None: unbounded).
        self.feature_budget = feature_budget
        self.features_skipped = 0
        self.metrics = metrics  # PluginMetrics (batch steps, skipped EAGLE forwards, goodput) or None
        self.seed = seed
        self.clock = clock
        self.step = 0
        self.live: dict[str, ReqView] = {}
        self.swaps: list[tuple[int, float]] = []  # (step before which it happened, pause s)
        self._prefills: list[tuple[list[ReqView], Tensor | None, Any]] = []
        #: Called by `close()` (weight subscriber stop, log sender/publisher close), in order.
        self.closers: list[Callable[[], Any]] = []
        #: Sidecar liveness (`core.link_guard.LinkGuard`, attached to the policy), checked at batch start.
        self.link: Any = None
        #: Failures the glue caught and served past, by where (batch start, planning, prefill, ...).
        self.failures: dict[str, int] = {}

    def failed(self, where: str, then: str = "serving continues") -> int:
        """Count a failure caught inside the glue (and its metric, by `where`) and log it with its traceback,
        the first time and every 1000th: the one rule for everything that must never stop serving."""
        n = self.failures[where] = self.failures.get(where, 0) + 1
        if self.metrics is not None:
            self.metrics.glue_errors.labels(where).inc()
        if n == 1 or n % 1000 == 0:
            log.exception("adaspec ATLAS: %s failed (%d so far); %s", where, n, then)
        return n

    @property
    def plan_errors(self) -> int:
        return self.failures.get("planning", 0)

    @property
    def begin_errors(self) -> int:
        return self.failures.get("batch start", 0)

    @property
    def candidates(self) -> list[int]:
        """Step counts with a pre-captured runtime state, ascending."""
        return self.steps_chooser.candidates

    @candidates.setter
    def candidates(self, steps: Sequence[int]) -> None:
        self.steps_chooser = StickySteps(steps, self.steps_chooser.downshift_after)

    def warm_up(self) -> None:
        """Each drafter compiles/allocates now (server start-up) rather than on its first request."""
        for d in self.drafters.values():
            d.warm_up()

    def close(self) -> None:
        """Stop background threads and sockets (scheduler shutdown, tests)."""
        for fn in self.closers:
            try:
                fn()
            except Exception:
                pass
        self.closers = []

    # -- 1. batch start --------------------------------------------------------------------------------------
    def begin_batch(self) -> float:
        """Apply staged weight updates in place (before anything of this batch drafts); total pause in s.
        First, if the sidecar has gone silent, the policy stops using the learned drafters (static takes over)."""
        if self.link is not None:
            self.link.check()
        pause = 0.0
        for s in self.stagers:
            p = s.apply_if_staged()
            if p > 0.0:
                self.swaps.append((self.step, p))
                pause += p
        return pause

    def safe_begin_batch(self) -> float:
        """`begin_batch`, but a bad staged tensor or a link-guard bug never stops serving: counted, logged
        (first and every 1000th), and the batch runs with the weights already in place."""
        try:
            return self.begin_batch()
        except Exception:
            self.failed("batch start")
            return 0.0

    # -- 2. plan ------------------------------------------------------------------------------------------------
    def sync(self, rows: Sequence[ReqView]) -> None:
        """Start drafters on requests seen for the first time; finish those gone from the batch."""
        now = {r.request_id: r for r in rows}
        for rid, gone in list(self.live.items()):
            if rid not in now:
                self._finish(gone)
        for rid, r in now.items():
            if rid not in self.live:
                req = r.draft_request()
                for d in self.drafters.values():
                    d.start(req)
        self.live = now

    def finish_all(self) -> None:
        for r in list(self.live.values()):
            self._finish(r)
        self.live = {}

    def _finish(self, row: ReqView) -> None:
        req = row.draft_request()
        for d in self.drafters.values():
            d.finish(req)
        self.policy.finish(row.request_id)

    def prefilled(self, rows: Sequence[ReqView], last_hidden: Tensor | None, next_tokens: Any) -> None:
        """Requests whose prefill completed: `last_hidden` [n, d] at their last prompt position, `next_tokens`
        the first generated token of each (a device tensor is fine: it is read at the next `plan`, once the
        scheduler has synchronised)."""
        if rows:
            self._prefills.append((list(rows), last_hidden, next_tokens))

    def _flush_prefills(self) -> None:
        pending, self._prefills = self._prefills, []
        for rows, hidden, nxt in pending:
            nxt = nxt.tolist() if hasattr(nxt, "tolist") else list(nxt)
            for r in rows:
                if r.request_id not in self.live:
                    req = r.draft_request()
                    for d in self.drafters.values():
                        d.start(req)
                    self.live[r.request_id] = r
            if hidden is not None and self.adaptive is not None:
                obs = [Observation(r.request_id, list(r.prompt), None, int(nxt[i])) for i, r in enumerate(rows)]
                self.observe_hidden(obs, hidden)

    def plan(self, rows: Sequence[ReqView]) -> StepPlan:
        """Decide this decode step: drafter/k per request, the CPU chains, the batch's step count."""
        rows = list(rows)
        self._flush_prefills()
        self.sync(rows)
        self.step += 1
        t0 = self.clock()
        max_steps = self.candidates[-1]
        reqs = [r.draft_request() for r in rows]
        peek_k = max(0, min(self.policy.peek_k, max_steps))
        peeked = peek_drafts(self.policy, self.drafters, rows, reqs, [peek_k] * len(reqs)) if self.policy.peek else {}
        plans: list[Plan] = list(self.policy.plan(rows))
        names: list[str | None] = [None] * len(rows)
        ks = [min(int(p.k), max_steps) if p.drafter else 0 for p in plans]
        for i, p in enumerate(plans):
            if ks[i] > 0 and (p.drafter in self.drafters or (p.drafter == STATIC and self.static)):
                names[i] = p.drafter
            else:
                ks[i] = 0
        # SGLang's EAGLE-3 forward drafts the static rows; the CPU drafters draft the rest (one loop, core's).
        cpu = [None if n == STATIC else n for n in names]
        drafts = propose_chains(self.policy, self.drafters, cpu, [0 if n is None else k for n, k in zip(cpu, ks)],
                                reqs, peeked)
        chains: list[Draft | None] = [None if n == STATIC else d for n, d in zip(names, drafts)]
        want = [ks[i] if c is None else len(c.tokens) for i, c in enumerate(chains)]
        steps = self.steps_chooser.choose(want)
        if steps == 0:  # no drafting at all this step: SGLang's trivial one-node verify
            names = [None] * len(rows)
            chains = [Draft() for _ in rows]
        elif any(c is None for c in chains):
            # EAGLE runs for some rows anyway: rows with nothing to verify take its (free) chain too.
            for i, c in enumerate(chains):
                if c is not None and not c.tokens:
                    names[i], chains[i] = STATIC, None
        plan = StepPlan(self.step, rows, names, ks, chains, steps, self.clock() - t0)
        if self.metrics is not None:
            self.metrics.batch_steps.observe(steps)
            if steps and not plan.uses_static:
                self.metrics.static_skipped.inc()
            self.metrics.goodput.set(float(self.policy.lam))
        return plan

    def safe_plan(self, rows: Sequence[ReqView]) -> StepPlan:
        """`plan`, but a failure in the controller or a drafter never stops serving: the step falls back to
        SGLang's EAGLE-3 chain for every request at the largest step count (or no drafting without it)."""
        try:
            return self.plan(rows)
        except Exception:
            self.failed("planning", "EAGLE-3 fallback")
            rows = list(rows)
            steps = self.candidates[-1] if self.static else 0
            self.steps_chooser.force(steps)
            name = STATIC if steps else None
            return StepPlan(self.step, rows, [name] * len(rows), [steps] * len(rows),
                            [None if steps else Draft() for _ in rows], steps, 0.0)

    # -- 3. verify complete ---------------------------------------------------------------------------------------
    def complete(
        self,
        plan: StepPlan,
        accept_lens: Sequence[int],
        tokens: Sequence[int],
        verified: Sequence[int],
        hidden: Tensor | None = None,
    ) -> list[StepRecord]:
        """Records of a verified step. `accept_lens[i]` = accepted drafts + 1 (SGLang's), `tokens` the flat
        [bs * (S+1)] predictions (request i's committed tokens start at i*(S+1)), `verified` the flat verify
        input (root then the S drafts per request), `hidden` the target's final hidden states [bs*(S+1), d]
        (optional: the adaptive drafter's input and the sidecar's features).

        A static row records S drafted (EAGLE drafted S). A chain row records what its drafter proposed --
        k as planned, its chain's tokens and confidences -- as the reference engine does; when the target also
        accepted some of the padding (the chain's last token repeated), those tokens are drafted and accepted
        too (they were verified and are emitted), so `emitted <= accepted + 1` holds as on every path."""
        S = plan.steps
        stride = S + 1
        bs = len(plan.rows)
        if len(accept_lens) != bs or len(tokens) < bs * stride or len(verified) < bs * stride:
            raise ValueError(f"verify results do not match the plan ({bs} rows, stride {stride})")
        verify_s = self.clock() - plan.started
        versions = {s.drafter: s.version for s in self.stagers}  # what this step drafted with
        records: list[StepRecord] = []
        obs: list[Observation] = []
        for i, row in enumerate(plan.rows):
            a = int(accept_lens[i]) - 1
            if not 0 <= a <= S:
                raise ValueError(f"accept length {a + 1} outside [1, {stride}]")
            base = i * stride
            name = plan.drafters[i]
            chain = plan.chains[i]
            if chain is None:  # EAGLE's chain: topk-1 SGLang exposes no per-token probabilities
                k, drafted, conf = S, S, [1.0] * S
            else:  # a CPU drafter's chain (or nothing, name None), padded to S with its last token
                n = min(len(chain.tokens), S)
                drafted = max(n, a)  # accepted padding counts as drafted: it was verified and is emitted
                conf = [float(c) for c in chain.confidence[:n]]
                conf += [conf[-1] if conf else 0.0] * (drafted - n)
                k = max(min(int(plan.ks[i]), S) if name else 0, drafted)
            emitted = [int(t) for t in tokens[base : base + a + 1]]
            rec = StepRecord(
                step=plan.step, request_id=row.request_id, tenant=row.tenant, drafter=name, k=k,
                drafted=drafted, accepted=a, emitted=a + 1, confidence=conf,
                batch_size=bs, chunk_tokens=stride, draft_s=plan.draft_s, verify_s=verify_s, prefill=False,
                draft_tokens=[int(t) for t in verified[base + 1 : base + 1 + drafted]], emitted_tokens=emitted,
                weight_version=versions.get(name, 0) if name else 0,
            )
            records.append(rec)
            kept = [int(verified[base])] + emitted[:-1]
            obs.append(Observation(row.request_id, kept, None, emitted[-1]))
        feature_bytes = 0 if hidden is None else self._attach_features(records, accept_lens, stride, hidden)
        self.policy.feedback(records)
        for name, d in self.drafters.items():
            if name == self.adaptive:
                if hidden is not None:
                    idx = torch.tensor([i * stride + int(accept_lens[i]) - 1 for i in range(bs)],
                                       device=hidden.device)
                    self.observe_hidden(obs, hidden.index_select(0, idx))
            else:
                d.observe(obs)
        for listener in self.listeners:
            listener(records)
        if self.sender is not None:
            ready = None
            if hidden is not None and hidden.is_cuda:  # features are queued device copies: mark when done
                ready = torch.cuda.Event()
                ready.record()
            item = StepLogs(records, ready, feature_bytes, self.feature_budget)
            if not self.sender.submit(item):
                item.release()
        elif self.feature_budget is not None:
            self.feature_budget.give(feature_bytes)
        return records

    def _attach_features(self, records: list[StepRecord], accept_lens: Sequence[int], stride: int,
                         hidden: Tensor) -> int:
        """The kept positions' hidden states of the sampled requests, copied out of the reused tap buffer with
        one gather (record i's features are a view into it), within the log queue's device-memory budget;
        returns the bytes taken from the budget."""
        sampled = [i for i, r in enumerate(records) if self._sampled(r.request_id)]
        if not sampled:
            return 0
        spans = [(i * stride, int(accept_lens[i])) for i in sampled]
        rows = sum(n for _, n in spans)
        nbytes = rows * hidden.shape[-1] * 4  # float32 copies
        if self.feature_budget is not None and not self.feature_budget.take(nbytes):
            self.features_skipped += len(sampled)
            if self.metrics is not None:
                self.metrics.features_skipped.inc(len(sampled))
            return 0
        idx = torch.tensor([b + j for b, n in spans for j in range(n)], device=hidden.device)
        gathered = hidden.detach().index_select(0, idx).float()  # [rows, d], a copy: the tap buffer is reused
        off = 0
        for i, (_, n) in zip(sampled, spans):
            records[i].features = gathered[off : off + n]
            off += n
        return nbytes if self.feature_budget is not None else 0

    def observe_hidden(self, obs: Sequence[Observation], last_hidden: Tensor) -> None:
        """Hand the adaptive drafter each request's final hidden state at its last committed position
        (row i of `last_hidden` [n, d]) with the tokens written and the target's next token."""
        if self.adaptive is None:
            return
        self.drafters[self.adaptive].observe(
            [Observation(o.request_id, o.tokens, last_hidden[i].view(1, 1, -1), o.next_token)
             for i, o in enumerate(obs)]
        )

    def _sampled(self, request_id: str) -> bool:
        """Per-request (not per-step) sampling: the sidecar stitches a request's steps into one stream."""
        r = self.feature_sample_rate
        if r >= 1.0:
            return True
        if r <= 0.0:
            return False
        return random.Random(zlib.crc32(request_id.encode()) ^ self.seed).random() < r

"""The reference speculative-decoding engine: drafters + policy driving a transformers causal LM.

One step for the running batch reads as its four stages: `_draft` (the policy picks (drafter, k) per request,
drafters propose chains, the policy trims them), `_forward` (the target runs every chain in ONE forward,
chains of different lengths packed into one row for the linear layers -- `ragged` -- or right-padded),
`_verify` (greedy or exact rejection sampling decides how much of each chain survives; the KV cache keeps
exactly the surviving positions) and `_commit` (tokens emitted, one `StepRecord` per request, every drafter
observes what was accepted, the policy and the listeners get the records). The trace engine
(`adaspec.core.drift.replay_engine`) replaces `_forward` and `_verify` only. New requests are admitted by a
prefill forward (which may already carry a draft) and merged into the running batch (continuous batching).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from adaspec.kernels import dispatch
from adaspec.core.drafters.base import Draft, Drafter, DraftRequest, Observation
from adaspec.core.engine import ragged
from adaspec.core.engine.kv import BatchKV
from adaspec.core.engine.profile import StepProfile
from adaspec.core.engine.sampling import SamplingParams, target_probs
from adaspec.core.errors import RequestError
from adaspec.core.step import Plan, PolicyBase, StepRecord, peek_drafts, propose_chains
from adaspec.core.target import Target


@dataclass
class RequestSpec:
    """A request to generate for: prompt token ids, an id, and the tenant it belongs to."""

    prompt: list[int]
    request_id: str = ""
    tenant: str = "default"


@dataclass
class RequestState:
    """A live request inside the engine (its own sampling parameters and random stream)."""

    spec: RequestSpec
    index: int
    params: SamplingParams
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    forwards: int = 0
    records: list[StepRecord] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens

    @property
    def tenant(self) -> str:
        return self.spec.tenant

    @property
    def tokens(self) -> list[int]:
        return self.spec.prompt + self.output

    def view(self) -> DraftRequest:
        return DraftRequest(self.spec.request_id, self.tokens, len(self.spec.prompt), self.spec.tenant)


@dataclass
class GenerationResult:
    request_id: str
    tenant: str
    prompt_tokens: list[int]
    output_tokens: list[int]
    finish_reason: str
    target_forwards: int
    records: list[StepRecord]
    wall_s: float

    @property
    def tau(self) -> float:
        """Tokens per target forward (the prefill that produced the first token counts as one)."""
        return len(self.output_tokens) / max(1, self.target_forwards)


@dataclass
class Forward:
    """What one target forward produced for the batch (the trace engine models it instead)."""

    chunks: list[list[int]]  # per request: the tokens fed (pending + draft)
    pend: torch.Tensor  # [B] pending tokens per request
    dlen: torch.Tensor  # [B] draft tokens per request
    width: int  # C: the chunk width the KV cache appended (right-padded, or the packed chunk's)
    logits: torch.Tensor | None  # [B, K+1, V] from each row's last pending token to its last draft token
    out: Any  # the model output (hidden states are read from it after acceptance)
    started: float  # perf_counter() when the forward started
    packed: ragged.RaggedChunk | None = None  # set when the chunks ran packed (the outputs are [1, T, ...])


@dataclass
class Verdict:
    """The target's verdict on one step's drafts, per request."""

    accepted: list[int]  # [B] accepted draft tokens
    next_tokens: list[int]  # [B] the token emitted after them (the bonus or the correction)
    kept: list[list[int]]  # per request: the tokens the KV cache keeps (pending + accepted drafts)
    hidden: list[torch.Tensor | None]  # per request [len(kept), L, d] hidden states of the kept positions
    verify_s: float


class SpecEngine:
    """Batched speculative decoding over one target model with a set of named drafters."""

    def __init__(
        self,
        target: Target,
        drafters: Mapping[str, Drafter] | Iterable[Drafter] = (),
        batch_size: int = 4,
        compact_holes_ratio: float = 0.25,
        ragged_verify: bool = True,
    ) -> None:
        if isinstance(drafters, Mapping):
            self.drafters = dict(drafters)
        else:
            self.drafters = {d.name: d for d in drafters}
        self.target = target
        #: Chunks of different lengths run packed (`ragged`: a step costs its real tokens) where the model's
        #: attention allows it; otherwise right-padded (a step costs batch x its widest chunk).
        self.ragged_verify = bool(ragged_verify) and ragged.enable(target.model)
        self.padded_verify = not self.ragged_verify
        #: A packed forward is filled up to this many tokens (`step.forward_tokens` counts what it computes).
        self.verify_multiple = ragged.PACK_MULTIPLE if self.ragged_verify else 1
        self.batch_size = batch_size
        self.compact_holes_ratio = compact_holes_ratio
        self.step_count = 0
        #: Called with the records of every step (log publishers, metrics); must not block.
        self.step_listeners: list = []
        #: Called between steps, before planning (weight swaps happen here, never mid-forward).
        self.between_steps: list = []
        #: Attach target hidden states of kept positions to StepRecord.features (for log sampling).
        self.record_features = False
        #: Wall seconds per stage of every step (`adaspec bench drift --live --profile` prints it).
        self.profile = StepProfile()
        self._overhead_s = 0.0  # the last decode step's wall time outside draft and verify
        self._step_draft_verify_s = 0.0
        layers: set[int] = set()
        for d in self.drafters.values():
            layers.update(d.hidden_layers)
        self.hidden_layers = tuple(sorted(layers))
        self.pad_id = next(iter(sorted(target.eos_token_ids)), 0)

    # -- public API -----------------------------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[RequestSpec | list[int]],
        params: SamplingParams,
        policy: PolicyBase,
    ) -> list[GenerationResult]:
        """Run `requests` to completion with continuous batching (request i's random stream: seed, i)."""
        session = self.session(policy)
        states = [session.add(r if isinstance(r, RequestSpec) else RequestSpec(list(r)), params, index=i)
                  for i, r in enumerate(requests)]
        while session.step():
            pass
        return [self._result(st) for st in states]

    def session(self, policy: PolicyBase) -> "Session":
        """A live batch under `policy` that requests can join and leave between steps (a server's engine)."""
        return Session(self, policy)

    def result(self, st: RequestState) -> GenerationResult:
        return self._result(st)

    # -- internals ------------------------------------------------------------------------------------------
    def _new_kv(self) -> BatchKV:
        """The batch's KV cache (a trace replay, which runs no model, swaps in a bookkeeping-free one)."""
        return BatchKV(self.target.device)

    def _new_state(self, index: int, spec: RequestSpec, params: SamplingParams) -> RequestState:
        if not spec.prompt:
            raise RequestError("empty prompt")
        if len(spec.prompt) >= self.target.context_len:
            raise RequestError(
                f"prompt is {len(spec.prompt)} tokens; the model's context is {self.target.context_len}"
            )
        if not spec.request_id:
            spec.request_id = f"req-{index}"
        gen = None
        if not params.greedy:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(params.seed * 1_000_003 + index)
        st = RequestState(spec, index, params, gen)
        st.pending = list(spec.prompt)
        return st

    def _retire(
        self, running: list[RequestState], kv: BatchKV, policy: PolicyBase
    ) -> tuple[list[RequestState], BatchKV]:
        keep = [i for i, st in enumerate(running) if st.finish_reason is None]
        if len(keep) == len(running):
            return running, kv
        for st in running:
            if st.finish_reason is not None:
                st.finished = time.perf_counter()
                for d in self.drafters.values():
                    d.finish(st.view())
                policy.finish(st.request_id)
        kv.select(torch.tensor(keep, dtype=torch.long, device=kv.device))
        return [running[i] for i in keep], kv

    def _clip_k(self, st: RequestState, k: int, kv_len: int) -> int:
        """No draft beyond the token budget or the context window."""
        budget = st.max_new_tokens - len(st.output) - 1
        room = self.target.context_len - kv_len - len(st.pending)
        return max(0, min(k, budget, room))

    def _draft(
        self, states: Sequence[RequestState], kv_lens: Sequence[int], policy: PolicyBase, prefill: bool,
    ) -> tuple[list[Plan], list[str | None], list[Draft], float]:
        """Plan and draft: for a decode step, the drafters the policy peeks propose first for every request
        (so the plan reads this step's actual draft confidence, and a plan that picks one of them reuses its
        proposal); then each planned drafter proposes, clipped to the budget and the context, and the policy
        trims. Returns (plans, drafter per request, drafts, peek + draft seconds: planning is not drafting)."""
        prof = None if prefill else self.profile
        t0 = time.perf_counter()
        views = [st.view() for st in states]
        peeked: dict[str, list[Draft]] = {}
        if policy.peek and not prefill:
            ks = [self._clip_k(st, policy.peek_k, kv_lens[i]) for i, st in enumerate(states)]
            peeked = peek_drafts(policy, self.drafters, states, views, ks, prof)
        t1 = time.perf_counter()
        plans = policy.plan(states)
        t2 = time.perf_counter()
        ks = [self._clip_k(st, p.k, kv_lens[i]) if p.drafter else 0 for i, (st, p) in enumerate(zip(states, plans))]
        drafts = propose_chains(policy, self.drafters, [p.drafter for p in plans], ks, views, peeked, prof)
        names = [p.drafter if ks[i] > 0 else None for i, p in enumerate(plans)]
        if prof is not None:
            prof.add("plan", t2 - t1)
        return plans, names, drafts, (t1 - t0) + time.perf_counter() - t2

    def _step(self, states: list[RequestState], kv: BatchKV, policy: PolicyBase, prefill: bool) -> None:
        """One target forward for `states` (a prefill of new requests or a decode step of the running batch):
        plan and draft, forward, verify, commit."""
        # The KV cache holds everything but the pending tokens (which the next forward feeds).
        kv_lens = [len(st.spec.prompt) + len(st.output) - len(st.pending) for st in states]
        plans, names, drafts, draft_s = self._draft(states, kv_lens, policy, prefill)
        t0 = time.perf_counter()
        fwd = self._forward(states, drafts, kv)
        t1 = time.perf_counter()
        verdict = self._verify(states, drafts, fwd, kv)
        if not prefill:
            self.profile.add("forward", t1 - t0)
            self.profile.add("accept", time.perf_counter() - t1)
            self.profile.fed_tokens += sum(len(c) for c in fwd.chunks)
            self.profile.rows += len(states)
        self._step_draft_verify_s = draft_s + verdict.verify_s
        self._commit(states, kv_lens, plans, names, drafts, verdict, draft_s, prefill, policy)

    def _forward(self, states: Sequence[RequestState], drafts: Sequence[Draft], kv: BatchKV) -> Forward:
        """One target forward over every request's pending tokens + draft: packed when the engine verifies
        ragged and the chunks differ in length (or a speculative step's token count is off the packing
        multiple), else right-padded into one chunk (the two share the cache)."""
        device = self.target.device
        B = len(states)
        chunks = [st.pending + d.tokens for st, d in zip(states, drafts)]
        pend = torch.tensor([len(st.pending) for st in states], dtype=torch.long)  # [B]
        dlen = torch.tensor([len(d.tokens) for d in drafts], dtype=torch.long)  # [B]
        lens = pend + dlen  # [B]
        width = max(len(c) for c in chunks)
        K = int(dlen.max())
        if kv.batch_size == 0:
            kv.valid = torch.zeros(B, 0, dtype=torch.bool, device=device)
            kv.lengths = torch.zeros(B, dtype=torch.long, device=device)

        # Logits are needed only from each row's last pending token to its last draft token.
        offs = (pend - 1).unsqueeze(1) + torch.arange(K + 1).unsqueeze(0)  # [B, K+1]
        offs = torch.minimum(offs, (lens - 1).unsqueeze(1))  # clamp padding to the row's last slot
        hidden = bool(self.hidden_layers)
        t0 = time.perf_counter()
        tokens = int(lens.sum())
        # Packed when the chunks differ in length, or when a speculative step's token count is off the GEMM
        # kernels' multiple (the fillers round it: `ragged`); a plain step stays on transformers' own path.
        if self.ragged_verify and (tokens < B * width or (K and tokens % ragged.PACK_MULTIPLE)):
            packed = ragged.RaggedChunk.build(lens, kv.valid, kv.cache)
            starts = torch.cumsum(lens, 0) - lens  # [B]
            cols, inverse = torch.unique(starts.unsqueeze(1) + offs, return_inverse=True)
            flat = [t for c in chunks for t in c] + [self.pad_id] * packed.fillers
            input_ids = torch.tensor(flat, dtype=torch.long).unsqueeze(0)  # [1, T + fillers]
            positions = (kv.lengths[packed.rows] + packed.offs).unsqueeze(0)  # [1, T + fillers]
            out = self.target.model(input_ids=input_ids.to(device), position_ids=positions, use_cache=False,
                                    logits_to_keep=cols.to(device), output_hidden_states=hidden,
                                    **{ragged.KWARG: packed})
            logits = out.logits[0, inverse.to(device)]  # [B, K+1, V]
            return Forward(chunks, pend, dlen, packed.width, logits, out, t0, packed)  # fillers may widen it

        input_ids = torch.full((B, width), self.pad_id, dtype=torch.long)  # [B, C]
        for i, c in enumerate(chunks):
            input_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask, positions = kv.step_inputs(lens.to(device), width)
        cols, inverse = torch.unique(offs, return_inverse=True)
        out = self.target.model(
            input_ids=input_ids.to(device),
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.target.cache_kwarg: kv.cache},
            logits_to_keep=cols.to(device),
            output_hidden_states=hidden,
        )
        rows = torch.arange(B).unsqueeze(1)
        logits = out.logits[rows.to(device), inverse.to(device)]  # [B, K+1, V]
        return Forward(chunks, pend, dlen, width, logits, out, t0)

    def _verify(self, states: Sequence[RequestState], drafts: Sequence[Draft], fwd: Forward, kv: BatchKV) -> Verdict:
        """Greedy or exact rejection-sampling acceptance of each draft, each request under its own sampling
        parameters; the KV cache keeps what survived."""
        device = self.target.device
        B, K = len(states), int(fwd.dlen.max())
        draft_pad = torch.zeros(B, K, dtype=torch.long)  # [B, K]
        for i, d in enumerate(drafts):
            draft_pad[i, : len(d.tokens)] = torch.tensor(d.tokens, dtype=torch.long)
        draft_pad, dlen_dev = draft_pad.to(device), fwd.dlen.to(device)
        if all(st.params.greedy for st in states):
            accepted, next_tok, _ = dispatch.greedy_verify(draft_pad, dlen_dev, fwd.logits.argmax(dim=-1))
        else:
            probs = self._target_probs(states, fwd.logits)  # [B, K+1, V]
            q = self._draft_q(drafts, K, probs.shape[-1], device)
            u = torch.zeros(B, K)
            ru = torch.zeros(B)
            for i, st in enumerate(states):  # per-request streams: results do not depend on batching
                if st.generator is None:
                    continue  # greedy row: its one-hot target makes acceptance deterministic
                draws = torch.rand(int(fwd.dlen[i]) + 1, generator=st.generator)
                u[i, : int(fwd.dlen[i])] = draws[:-1]
                ru[i] = draws[-1]
            accepted, next_tok, _ = dispatch.rejection_verify(
                draft_pad, dlen_dev, probs, q, u.to(device), ru.to(device)
            )
        accepted_l = accepted.cpu().tolist()
        next_l = next_tok.cpu().tolist()
        keep = fwd.pend + torch.tensor(accepted_l, dtype=torch.long)  # [B] kept positions per row
        kv.commit(keep.to(device), fwd.width)
        verify_s = time.perf_counter() - fwd.started
        hidden = self._hidden(fwd) if self.hidden_layers else None  # [B, C, L, d]
        kept = [fwd.chunks[i][: int(keep[i])] for i in range(B)]
        rows = [None if hidden is None else hidden[i, : len(kept[i])] for i in range(B)]
        return Verdict(accepted_l, next_l, kept, rows, verify_s)

    def _commit(
        self, states: Sequence[RequestState], kv_lens: Sequence[int], plans: Sequence[Plan],
        names: Sequence[str | None], drafts: Sequence[Draft], verdict: Verdict, draft_s: float, prefill: bool,
        policy: PolicyBase,
    ) -> None:
        """Emit the verified tokens, record the step, and tell drafters, policy and listeners what happened."""
        t_commit = time.perf_counter()
        B = len(states)
        observations = []
        records = []
        self.step_count += 1
        for i, st in enumerate(states):
            a, nxt, d = verdict.accepted[i], verdict.next_tokens[i], drafts[i]
            emitted = d.tokens[:a] + [nxt]
            n_emitted = self._emit(st, emitted, kv_len=kv_lens[i] + len(st.pending) + a)
            st.forwards += 1
            name = names[i]
            rec = StepRecord(
                step=self.step_count, request_id=st.request_id, tenant=st.tenant, drafter=name,
                k=plans[i].k, drafted=len(d.tokens), accepted=a, emitted=n_emitted,
                confidence=list(d.confidence), batch_size=B, chunk_tokens=len(st.pending) + len(d.tokens),
                draft_s=draft_s, verify_s=verdict.verify_s, prefill=prefill, overhead_s=self._overhead_s,
                draft_tokens=list(d.tokens), emitted_tokens=list(emitted[:n_emitted]),
                weight_version=self.drafters[name].weight_version if name else 0,
                proposed=max(len(d.tokens), d.proposed),
            )
            h = verdict.hidden[i]
            if self.record_features and h is not None:
                rec.features = h
            st.records.append(rec)
            records.append(rec)
            observations.append(Observation(st.request_id, verdict.kept[i], h, nxt))
            st.pending = [nxt]
        if not prefill:
            self.profile.add("commit", time.perf_counter() - t_commit)
        prof = None if prefill else self.profile
        t0 = time.perf_counter()
        for drafter in self.drafters.values():
            drafter.observe(self._own_layers(drafter, observations))
            if prof is not None:
                t1 = time.perf_counter()
                prof.add(f"observe:{drafter.name}", t1 - t0)
                t0 = t1
        policy.feedback(records)
        if prof is not None:
            t1 = time.perf_counter()
            prof.add("feedback", t1 - t0)
            t0 = t1
        for listener in self.step_listeners:
            listener(records)
            if prof is not None:
                t1 = time.perf_counter()
                prof.add(f"listeners:{_hook_name(listener)}", t1 - t0)
                t0 = t1

    def _own_layers(self, drafter: Drafter, observations: list[Observation]) -> list[Observation]:
        """Observations carrying exactly the drafter's own `hidden_layers`, in its order (or no hidden)."""
        want = tuple(drafter.hidden_layers)
        if want == self.hidden_layers:
            return observations
        idx = [self.hidden_layers.index(layer) for layer in want]
        return [Observation(o.request_id, o.tokens, o.hidden[:, idx] if idx and o.hidden is not None else None,
                            o.next_token) for o in observations]

    def _emit(self, st: RequestState, tokens: list[int], kv_len: int) -> int:
        """Append verified tokens, stopping at EOS, the token budget or the context window."""
        n = 0
        for t in tokens:
            st.output.append(t)
            n += 1
            if t in self.target.eos_token_ids:
                st.finish_reason = "stop"
            elif len(st.output) >= st.max_new_tokens:
                st.finish_reason = "length"
            elif kv_len + 1 >= self.target.context_len:
                st.finish_reason = "context"
            if st.finish_reason:
                break
        return n

    @staticmethod
    def _target_probs(states: Sequence[RequestState], logits: torch.Tensor) -> torch.Tensor:
        """Each row's target distribution [B, K+1, V] under its own (temperature, top-p); a greedy row's is
        one-hot on the argmax, so exact rejection sampling accepts exactly what greedy verification would."""
        probs = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, st in enumerate(states):
            groups.setdefault((st.params.temperature, st.params.top_p), []).append(i)
        for (temperature, top_p), rows in groups.items():
            idx = torch.tensor(rows, device=logits.device)
            if temperature == 0.0:
                p = torch.zeros_like(probs[idx]).scatter_(-1, logits[idx].argmax(-1, keepdim=True), 1.0)
            else:
                p = target_probs(logits[idx], temperature, top_p)
            probs[idx] = p
        return probs

    def _draft_q(self, drafts: Sequence[Draft], K: int, vocab: int, device: torch.device) -> torch.Tensor | None:
        """Draft distributions [B, K, V]; point-mass rows become one-hot (None if every row is point-mass)."""
        if all(d.q is None for d in drafts) or K == 0:
            return None
        q = torch.zeros(len(drafts), K, vocab, device=device)
        for i, d in enumerate(drafts):
            n = len(d.tokens)
            if n == 0:
                continue
            if d.q is not None:
                q[i, :n] = d.q.to(device=device, dtype=torch.float32)
            else:
                q[i, torch.arange(n), torch.tensor(d.tokens)] = 1.0
        return q

    def _hidden(self, fwd: Forward) -> torch.Tensor:
        """[B, C, len(hidden_layers), d] hidden states of the requested target layers (-1 = final normed)."""
        # transformers 5: (embeddings, layer 0 output, ..., layer L-2 output, final *normed* hidden state)
        hs = fwd.out.hidden_states
        picked = [hs[-1] if layer == -1 else hs[min(layer + 1, len(hs) - 1)] for layer in self.hidden_layers]
        stacked = torch.stack(picked, dim=2)  # [B, C, L, d], or [1, T, L, d] packed
        return stacked if fwd.packed is None else fwd.packed.unpack(stacked[0])

    def _result(self, st: RequestState) -> GenerationResult:
        return GenerationResult(
            request_id=st.request_id,
            tenant=st.spec.tenant,
            prompt_tokens=list(st.spec.prompt),
            output_tokens=list(st.output),
            finish_reason=st.finish_reason or "length",
            target_forwards=st.forwards,
            records=st.records,
            wall_s=max(0.0, st.finished - st.started),
        )


class Session:
    """The live batch of one engine under one policy: requests join (`add`) and leave (finished, or `cancel`)
    between steps, and each `step()` is one engine iteration -- a prefill of newly admitted requests (which
    may already carry a draft) or a decode step of the running batch. `SpecEngine.generate` runs one to
    completion; a server calls `step()` from its engine thread while requests come and go."""

    def __init__(self, engine: SpecEngine, policy: PolicyBase) -> None:
        self.engine, self.policy = engine, policy
        policy.set_padded_verify(engine.padded_verify, engine.verify_multiple)
        self.queue: list[RequestState] = []
        self.running: list[RequestState] = []
        self.kv = engine._new_kv()
        self._next_index = 0

    def add(self, spec: RequestSpec, params: SamplingParams, index: int | None = None) -> RequestState:
        """Queue a request (RequestError for an empty or too long prompt). `index` seeds its random stream
        with `params.seed` (default: the order of arrival)."""
        if index is None:
            index = self._next_index
        self._next_index = max(self._next_index, index + 1)
        st = self.engine._new_state(index, spec, params)
        self.queue.append(st)
        return st

    def cancel(self, request_id: str) -> RequestState | None:
        """Stop a request: a queued one leaves at once, a running one at the end of the current step."""
        for st in self.queue:
            if st.request_id == request_id:
                self.queue.remove(st)
                st.finish_reason = "cancelled"
                return st
        for st in self.running:
            if st.request_id == request_id and st.finish_reason is None:
                st.finish_reason = "cancelled"
                return st
        return None

    @property
    def idle(self) -> bool:
        return not self.queue and not self.running

    def step(self) -> bool:
        """One engine iteration; False (and nothing done) when there is no request."""
        e = self.engine
        if self.idle:
            return False
        prof = e.profile
        with torch.inference_mode():
            t_start = t0 = time.perf_counter()
            for hook in e.between_steps:
                hook()
                t1 = time.perf_counter()
                prof.add(f"between_steps:{_hook_name(hook)}", t1 - t0)
                t0 = t1
            self.running, self.kv = e._retire(self.running, self.kv, self.policy)  # cancelled since the last
            free = e.batch_size - len(self.running)
            if self.queue and free > 0:
                admitted, self.queue = self.queue[:free], self.queue[free:]
                new_kv = e._new_kv()
                for st in admitted:
                    st.started = time.perf_counter()
                    for d in e.drafters.values():
                        d.start(st.view())
                e._step(admitted, new_kv, self.policy, prefill=True)
                self.kv.merge(new_kv)
                self.running += admitted
                self.running, self.kv = e._retire(self.running, self.kv, self.policy)
                prof.add("prefill", time.perf_counter() - t0)
                prof.prefills += 1
                return True  # the newly admitted requests take part in the next decode step
            if self.running:
                prof.add("retire", time.perf_counter() - t0)
                e._step(self.running, self.kv, self.policy, prefill=False)
                t0 = time.perf_counter()
                self.running, self.kv = e._retire(self.running, self.kv, self.policy)
                self.kv.maybe_compact(e.compact_holes_ratio)
                t1 = time.perf_counter()
                prof.add("kv_compact", t1 - t0)
                prof.steps += 1
                prof.wall_s += t1 - t_start
                e._overhead_s = max(0.0, t1 - t_start - e._step_draft_verify_s)
        return True


def _hook_name(hook: object) -> str:
    """A short label for a step hook in the profile (the bound method's owner class, or the callable's)."""
    owner = getattr(hook, "__self__", hook)
    return type(owner).__name__ if not isinstance(owner, type) else owner.__name__

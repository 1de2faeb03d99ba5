"""The reference speculative-decoding engine: drafters + policy driving a transformers causal LM.

One step for the running batch: the policy picks (drafter, k) per request, drafters propose chains, the
target verifies every chain in ONE forward (chains of different lengths right-padded into one chunk), greedy
or exact rejection sampling decides how much of each chain survives, the KV cache keeps exactly the
surviving positions, and every drafter observes what was accepted. New requests are admitted by a prefill
forward (which may already carry a draft) and merged into the running batch (continuous batching).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence

import torch

from adaspec import kernels
from adaspec.core.drafters.base import Draft, Drafter, DraftRequest, Observation
from adaspec.core.engine.kv import BatchKV
from adaspec.core.engine.sampling import SamplingParams, target_probs
from adaspec.core.errors import RequestError
from adaspec.core.target import Target


@dataclass(frozen=True)
class Plan:
    """What the policy decided for one request this step: which drafter, how many tokens (0 = none)."""

    drafter: str | None
    k: int


@dataclass
class StepRecord:
    """One request's part of one target forward: the unit every policy, log and benchmark is built on."""

    step: int
    request_id: str
    tenant: str
    drafter: str | None
    k: int
    drafted: int
    accepted: int
    emitted: int
    confidence: list[float]
    batch_size: int
    chunk_tokens: int
    draft_s: float
    verify_s: float
    prefill: bool
    #: Token ids behind the counts (what the sidecar trains on).
    draft_tokens: list[int] = field(default_factory=list)
    emitted_tokens: list[int] = field(default_factory=list)
    #: Target hidden states of the kept positions, only when the engine records features (log sampling).
    features: torch.Tensor | None = field(default=None, repr=False, compare=False)


class Policy(Protocol):
    """Decides drafter and lookahead per request and step; learns from the records of each step.

    Optional hooks: `finish(request_id)`, called when a request leaves the batch; and
    `trim(request, drafter_name, draft) -> int`, called once per drafted request right after `propose`,
    before verification: the engine verifies only the first n tokens (n clipped to [0, len(draft.tokens)]).
    """

    def plan(self, requests: Sequence["RequestState"]) -> list[Plan]: ...

    def feedback(self, records: Sequence[StepRecord]) -> None: ...


class FixedPolicy:
    """Always the same drafter and k (the baseline; k is clipped per request by the engine)."""

    def __init__(self, drafter: str | None, k: int) -> None:
        self.drafter = None if drafter in (None, "none") or k == 0 else drafter
        self.k = k if self.drafter else 0

    def plan(self, requests: Sequence["RequestState"]) -> list[Plan]:
        return [Plan(self.drafter, self.k) for _ in requests]

    def feedback(self, records: Sequence[StepRecord]) -> None:
        return None


@dataclass
class RequestSpec:
    """A request to generate for: prompt token ids, an id, and the tenant it belongs to."""

    prompt: list[int]
    request_id: str = ""
    tenant: str = "default"


@dataclass
class RequestState:
    """A live request inside the engine."""

    spec: RequestSpec
    index: int
    max_new_tokens: int
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


def peek_drafts(
    policy: Any, drafters: Mapping[str, Drafter], rows: Sequence[Any], requests: Sequence[DraftRequest],
    ks: Sequence[int],
) -> dict[str, list[Draft]]:
    """Each drafter the policy peeks (`policy.peek`) proposes up to ks[i] tokens for every row; the policy sees
    them (`policy.peeked(name, rows, drafts)`) before it plans. Shared by this engine and the SGLang runtime."""
    out: dict[str, list[Draft]] = {}
    if not any(ks):
        return out
    for name in getattr(policy, "peek", None) or ():
        drafter = drafters.get(name)
        if drafter is None:
            continue
        drafts = [d.truncated(ks[i]) if len(d.tokens) > ks[i] else d
                  for i, d in enumerate(drafter.propose(requests, ks))]
        out[name] = drafts
        policy.peeked(name, rows, drafts)
    return out


class SpecEngine:
    """Batched speculative decoding over one target model with a set of named drafters."""

    def __init__(
        self,
        target: Target,
        drafters: Mapping[str, Drafter] | Iterable[Drafter] = (),
        batch_size: int = 4,
        compact_holes_ratio: float = 0.25,
    ) -> None:
        if isinstance(drafters, Mapping):
            self.drafters = dict(drafters)
        else:
            self.drafters = {d.name: d for d in drafters}
        self.target = target
        self.batch_size = batch_size
        self.compact_holes_ratio = compact_holes_ratio
        self.step_count = 0
        #: Called with the records of every step (log publishers, metrics); must not block.
        self.step_listeners: list = []
        #: Called between steps, before planning (weight swaps happen here, never mid-forward).
        self.between_steps: list = []
        #: Attach target hidden states of kept positions to StepRecord.features (for log sampling).
        self.record_features = False
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
        policy: Policy,
    ) -> list[GenerationResult]:
        specs = [r if isinstance(r, RequestSpec) else RequestSpec(list(r)) for r in requests]
        states = [self._new_state(i, s, params) for i, s in enumerate(specs)]
        queue = list(states)
        running: list[RequestState] = []
        kv = self._new_kv()
        with torch.inference_mode():
            while queue or running:
                for hook in self.between_steps:
                    hook()
                free = self.batch_size - len(running)
                if queue and free > 0:
                    admitted, queue = queue[:free], queue[free:]
                    new_kv = self._new_kv()
                    for st in admitted:
                        st.started = time.perf_counter()
                        for d in self.drafters.values():
                            d.start(st.view())
                    self._step(admitted, new_kv, params, policy, prefill=True)
                    kv.merge(new_kv)
                    running += admitted
                    running, kv = self._retire(running, kv, policy)
                    continue  # the newly admitted requests take part in the next decode step
                self._step(running, kv, params, policy, prefill=False)
                running, kv = self._retire(running, kv, policy)
                kv.maybe_compact(self.compact_holes_ratio)
        return [self._result(st) for st in states]

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
        st = RequestState(spec, index, params.max_new_tokens, gen)
        st.pending = list(spec.prompt)
        return st

    def _retire(
        self, running: list[RequestState], kv: BatchKV, policy: Policy
    ) -> tuple[list[RequestState], BatchKV]:
        keep = [i for i, st in enumerate(running) if st.finish_reason is None]
        if len(keep) == len(running):
            return running, kv
        for st in running:
            if st.finish_reason is not None:
                st.finished = time.perf_counter()
                for d in self.drafters.values():
                    d.finish(st.view())
                policy_finish = getattr(policy, "finish", None)  # optional: drop per-request policy state
                if policy_finish is not None:
                    policy_finish(st.request_id)
        kv.select(torch.tensor(keep, dtype=torch.long, device=kv.device))
        return [running[i] for i in keep], kv

    def _clip_k(self, st: RequestState, k: int, kv_len: int) -> int:
        """No draft beyond the token budget or the context window."""
        budget = st.max_new_tokens - len(st.output) - 1
        room = self.target.context_len - kv_len - len(st.pending)
        return max(0, min(k, budget, room))

    def _plan(
        self, states: Sequence[RequestState], kv_lens: Sequence[int], policy: Policy, prefill: bool
    ) -> tuple[list[Plan], dict[str, list[Draft]], float]:
        """The policy's plans; first, for a policy that peeks, the cheap drafters' proposals for every request.

        A policy may name drafters in `peek` (cheap ones: a suffix-tree lookup) and implement
        `peeked(drafter, states, drafts)`: those drafters then propose `peek_k` tokens for every request before
        planning, so the choice can read this step's actual draft confidence; a plan that picks one of them
        reuses its proposal (no second lookup). Returns (plans, peeked drafts by drafter, peek seconds).
        """
        peeked: dict[str, list[Draft]] = {}
        t0 = time.perf_counter()
        if getattr(policy, "peek", None) and not prefill:
            k = int(getattr(policy, "peek_k", 0))
            ks = [self._clip_k(st, k, kv_lens[i]) for i, st in enumerate(states)]
            peeked = peek_drafts(policy, self.drafters, states, [st.view() for st in states], ks)
        peek_s = time.perf_counter() - t0
        return policy.plan(states), peeked, peek_s

    def _draft(
        self,
        states: Sequence[RequestState],
        plans: Sequence[Plan],
        kv_lens: Sequence[int],
        policy: Policy | None = None,
        peeked: dict[str, list[Draft]] | None = None,
    ) -> tuple[list[Draft], list[str | None], float]:
        """Ask each drafter, batched, for the requests assigned to it; returns drafts in request order.

        A policy with a `trim` hook may shorten each proposal before it is verified (early stop). Drafters
        already asked this step (`peeked`) are not asked again.
        """
        t0 = time.perf_counter()
        trim = getattr(policy, "trim", None)
        drafts = [Draft() for _ in states]
        names: list[str | None] = [None] * len(states)
        groups: dict[str, list[int]] = {}
        ks = [0] * len(states)
        for i, (st, plan) in enumerate(zip(states, plans)):
            ks[i] = self._clip_k(st, plan.k, kv_lens[i]) if plan.drafter else 0
            if ks[i] > 0:
                if plan.drafter not in self.drafters:
                    raise RequestError(f"policy chose unknown drafter {plan.drafter!r}")
                groups.setdefault(plan.drafter, []).append(i)
        for name, idx in groups.items():
            if peeked and name in peeked:
                proposals = [peeked[name][i] for i in idx]
            else:
                proposals = self.drafters[name].propose([states[i].view() for i in idx], [ks[i] for i in idx])
            for i, d in zip(idx, proposals):
                if len(d.tokens) > ks[i]:
                    d = d.truncated(ks[i])
                if trim is not None and d.tokens:
                    n = int(trim(states[i], name, d))
                    if n < len(d.tokens):
                        d = d.truncated(max(0, n))
                drafts[i] = d
                names[i] = name
        return drafts, names, time.perf_counter() - t0

    def _step(
        self,
        states: list[RequestState],
        kv: BatchKV,
        params: SamplingParams,
        policy: Policy,
        prefill: bool,
    ) -> None:
        """One target forward for `states` (a prefill of new requests or a decode step of the running batch)."""
        device = self.target.device
        kv_lens = kv.lengths.tolist() if kv.batch_size else [0] * len(states)
        plans, peeked, peek_s = self._plan(states, kv_lens, policy, prefill)
        drafts, names, draft_s = self._draft(states, plans, kv_lens, policy, peeked)
        draft_s += peek_s

        B = len(states)
        chunks = [st.pending + d.tokens for st, d in zip(states, drafts)]
        pend = torch.tensor([len(st.pending) for st in states], dtype=torch.long)
        dlen = torch.tensor([len(d.tokens) for d in drafts], dtype=torch.long)
        width = max(len(c) for c in chunks)
        K = int(dlen.max())
        input_ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        for i, c in enumerate(chunks):
            input_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        if kv.batch_size == 0:
            kv.valid = torch.zeros(B, 0, dtype=torch.bool, device=device)
            kv.lengths = torch.zeros(B, dtype=torch.long, device=device)
        mask, positions = kv.step_inputs((pend + dlen).to(device), width)

        # Logits are needed only from each row's last pending token to its last draft token.
        rows = torch.arange(B).unsqueeze(1)
        offs = (pend - 1).unsqueeze(1) + torch.arange(K + 1).unsqueeze(0)  # [B, K+1]
        offs = torch.minimum(offs, (pend + dlen - 1).unsqueeze(1))  # clamp padding to the row's last slot
        cols, inverse = torch.unique(offs, return_inverse=True)

        t0 = time.perf_counter()
        out = self.target.model(
            input_ids=input_ids.to(device),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=kv.cache,
            use_cache=True,
            logits_to_keep=cols.to(device),
            output_hidden_states=bool(self.hidden_layers),
        )
        logits = out.logits[rows.to(device), inverse.to(device)]  # [B, K+1, V]
        draft_pad = torch.zeros(B, K, dtype=torch.long)
        for i, d in enumerate(drafts):
            draft_pad[i, : len(d.tokens)] = torch.tensor(d.tokens, dtype=torch.long)
        draft_pad, dlen_dev = draft_pad.to(device), dlen.to(device)
        if params.greedy:
            accepted, next_tok, _ = kernels.greedy_verify(draft_pad, dlen_dev, logits.argmax(dim=-1))
        else:
            probs = target_probs(logits, params.temperature, params.top_p)
            q = self._draft_q(drafts, K, probs.shape[-1], device)
            u = torch.zeros(B, K)
            ru = torch.zeros(B)
            for i, st in enumerate(states):  # per-request streams: results do not depend on batching
                draws = torch.rand(int(dlen[i]) + 1, generator=st.generator)
                u[i, : int(dlen[i])] = draws[:-1]
                ru[i] = draws[-1]
            accepted, next_tok, _ = kernels.rejection_verify(
                draft_pad, dlen_dev, probs, q, u.to(device), ru.to(device)
            )
        accepted_l = accepted.cpu().tolist()
        next_l = next_tok.cpu().tolist()
        keep = pend + torch.tensor(accepted_l, dtype=torch.long)
        kv.commit(keep.to(device), width)
        verify_s = time.perf_counter() - t0

        hidden = self._hidden(out) if self.hidden_layers else None
        observations = []
        records = []
        self.step_count += 1
        for i, st in enumerate(states):
            a = accepted_l[i]
            kept = chunks[i][: int(keep[i])]
            emitted = drafts[i].tokens[:a] + [next_l[i]]
            n_emitted = self._emit(st, emitted, kv_len=int(kv.lengths[i]))
            st.forwards += 1
            rec = StepRecord(
                step=self.step_count, request_id=st.request_id, tenant=st.spec.tenant, drafter=names[i],
                k=plans[i].k, drafted=len(drafts[i].tokens), accepted=a, emitted=n_emitted,
                confidence=list(drafts[i].confidence), batch_size=B, chunk_tokens=int(pend[i] + dlen[i]),
                draft_s=draft_s, verify_s=verify_s, prefill=prefill,
                draft_tokens=list(drafts[i].tokens), emitted_tokens=list(emitted[:n_emitted]),
            )
            if self.record_features and hidden is not None:
                rec.features = hidden[i, : len(kept)]
            st.records.append(rec)
            records.append(rec)
            h = None if hidden is None else hidden[i, : len(kept)]
            observations.append(Observation(st.request_id, kept, h, next_l[i]))
            st.pending = [next_l[i]]
        for d in self.drafters.values():
            d.observe(self._own_layers(d, observations))
        policy.feedback(records)
        for listener in self.step_listeners:
            listener(records)

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

    def _hidden(self, out) -> torch.Tensor:
        """[B, C, len(hidden_layers), d] hidden states of the requested target layers (-1 = final normed)."""
        # transformers 5: (embeddings, layer 0 output, ..., layer L-2 output, final *normed* hidden state)
        hs = out.hidden_states
        picked = [hs[-1] if layer == -1 else hs[min(layer + 1, len(hs) - 1)] for layer in self.hidden_layers]
        return torch.stack(picked, dim=2)

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

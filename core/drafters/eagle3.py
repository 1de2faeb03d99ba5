"""The `static` drafter: an EAGLE-3 head drafting greedy chains from the target's low/mid/high features.

Per request it keeps the head's own KV cache over the target positions the target has committed: position
t holds the pair (target features at t, token t+1), exactly SGLang's draft-extend layout. Only verified
pairs ever enter that cache, so rejection needs no rollback: the chain's own positions live in a scratch
copy for the duration of one `propose`. `observe` only queues the newly committed positions (a backlog);
the next `propose` for the request extends the cache with its whole backlog in one batched head pass and
computes the first draft token from it, then pays k-1 head steps. So a step in which the controller does
not pick this drafter costs it nothing (on a CPU an eager extend was ~7-10 ms of every step), and catching
up after many steps is one forward, not one per step. A backlog longer than `max_backlog` positions is
folded in at `observe` (bounded memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from adaspec.kernels import dispatch
from adaspec.core.drafters.base import Draft, DraftRequest, DrafterBase, Observation
from adaspec.core.heads.eagle3 import Eagle3Head

if TYPE_CHECKING:
    from adaspec.core.heads.static_adapter import StaticAdapter


def default_head_dir(cache_dir: Path | str, model: str) -> Path:
    """Where `adaspec train-static` writes a model's head by default (the drafter loads `<dir>/final`)."""
    return Path(cache_dir) / "heads" / Path(model).name / "eagle3"


#: Heads shipped in the package, per pinned model name (SGLang EAGLE-3 format + MODEL_CARD.md).
SHIPPED_HEADS_DIR = Path(__file__).resolve().parent.parent / "heads" / "pretrained"


def shipped_head_dir(model: str) -> Path:
    return SHIPPED_HEADS_DIR / f"{Path(model).name}-eagle3"


def resolve_static_head(head_path: Path | str | None, cache_dir: Path | str, model: str) -> Path:
    """The static head to load: an explicit path, else the shipped head, else the locally trained one."""
    if head_path is not None:
        candidates = [Path(head_path)]
    else:
        candidates = [shipped_head_dir(model), default_head_dir(cache_dir, model) / "final"]
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"no static EAGLE-3 head for model {model!r} (looked in {tried}); train one with `adaspec train-static` "
        "or set ADASPEC_STATIC_HEAD_PATH"
    )


@dataclass
class _HeadState:
    """One request's head cache: keys/values [Hkv, S, hd] of its S committed pairs, and the next draft root."""

    k: Tensor
    v: Tensor
    pre: Tensor | None = None  # pre-norm head output at the last committed position (fed back as hidden)
    first_id: int = -1
    first_p: float = 0.0
    #: The last committed position's input pair (its token, its fused target features [d]): an adapted head
    #: recomputes that one position's output with its own deltas against this shared cache.
    last_token: int = -1
    last_hidden: Tensor | None = None
    #: Committed positions not yet in the cache: ([n, width] fused-input features, the n pair tokens) chunks.
    backlog: list[tuple[Tensor, list[int]]] = field(default_factory=list)
    backlog_len: int = 0

    @property
    def length(self) -> int:
        return int(self.k.shape[1])


def pad_past(states: Sequence[_HeadState], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad per-request caches into [B, Hkv, S_max, hd] k/v and a [B, S_max] validity mask."""
    H, hd = states[0].k.shape[0], states[0].k.shape[2]
    S = max(s.length for s in states)
    dtype = states[0].k.dtype
    k = torch.zeros(len(states), H, S, hd, dtype=dtype, device=device)
    v = torch.zeros_like(k)
    valid = torch.zeros(len(states), S, dtype=torch.bool, device=device)
    for i, s in enumerate(states):
        k[i, :, : s.length] = s.k
        v[i, :, : s.length] = s.v
        valid[i, : s.length] = True
    return k, v, valid


class Eagle3Drafter(DrafterBase):
    """Drafter protocol over an `Eagle3Head`; greedy chains, confidence = the head's softmax probability."""

    chain_forwards = True

    def __init__(self, head: Eagle3Head, name: str = "static", max_backlog: int = 256) -> None:
        self.name = name
        self.head = head.eval()
        self.hidden_layers: tuple[int, ...] = tuple(head.cfg.aux_layers)
        self.states: dict[str, _HeadState] = {}
        self.max_backlog = max_backlog

    @classmethod
    def from_path(cls, path: Path | str, target: Any, name: str = "static") -> "Eagle3Drafter":
        from adaspec.core.heads.export_sglang import load_sglang

        return cls(load_sglang(path, target), name)


    @property
    def device(self) -> torch.device:
        return self.head.fc.weight.device

    def start(self, request: DraftRequest) -> None:
        c = self.head.cfg
        empty = torch.zeros(c.num_kv_heads, 0, c.head_dim, dtype=self.head.dtype, device=self.device)
        self.states[request.request_id] = _HeadState(empty, empty.clone())

    def finish(self, request: DraftRequest) -> None:
        self.states.pop(request.request_id, None)

    @torch.inference_mode()
    def observe(self, observations: Sequence[Observation]) -> None:
        """Queue the committed positions (their features and pair tokens); nothing runs unless a backlog
        outgrows `max_backlog`."""
        width = self.head.fc.in_features
        full = []
        for o in observations:
            st = self.states.get(o.request_id)
            if st is None or o.hidden is None or not o.tokens:
                continue
            n = len(o.tokens)
            feats = o.hidden.reshape(n, width).to(self.device, self.head.dtype, copy=True)  # [n, width]
            st.backlog.append((feats, o.tokens[1:] + [o.next_token]))  # pairs (h_t, token t+1)
            st.backlog_len += n
            if st.backlog_len > self.max_backlog:
                full.append(st)
        if full:
            self._catch_up(full)

    def _catch_up(self, states: Sequence[_HeadState]) -> None:
        """Extend each state's head cache with its whole backlog in one batched head pass, and compute the
        next draft root (first token and its probability) from the last committed position."""
        states = [st for st in states if st.backlog_len]
        if not states:
            return
        head, dev = self.head, self.device
        B, C = len(states), max(st.backlog_len for st in states)
        width = head.fc.in_features
        aux = torch.zeros(B, C, width, dtype=head.dtype, device=dev)  # [B, C, width]
        tokens = torch.zeros(B, C, dtype=torch.long, device=dev)  # [B, C]
        positions = torch.zeros(B, C, dtype=torch.long, device=dev)  # [B, C]
        valid = torch.zeros(B, C, dtype=torch.bool, device=dev)  # [B, C]
        for i, st in enumerate(states):
            n = st.backlog_len
            aux[i, :n] = torch.cat([f for f, _ in st.backlog]) if len(st.backlog) > 1 else st.backlog[0][0]
            tokens[i, :n] = torch.tensor([t for _, toks in st.backlog for t in toks], device=dev)
            positions[i] = st.length + torch.arange(C, device=dev).clamp(max=n - 1)
            valid[i, :n] = True
        past_k, past_v, past_valid = pad_past(states, dev)
        fused = head.fuse(aux)  # [B, C, d]
        pre, k, v = head.extend(tokens, fused, positions, past_k, past_v, past_valid, valid)
        last = torch.stack([pre[i, st.backlog_len - 1] for i, st in enumerate(states)])  # [B, d]
        ids, probs = dispatch.draft_topk(head.logits_hidden(last), head.lm_head_weight, 1)
        ids = head.to_target_ids(ids[:, 0]).tolist()
        for i, st in enumerate(states):
            n = st.backlog_len
            st.k = torch.cat([st.k, k[i, :, :n]], dim=1)
            st.v = torch.cat([st.v, v[i, :, :n]], dim=1)
            st.pre, st.first_id, st.first_p = last[i], int(ids[i]), float(probs[i, 0])
            st.last_token, st.last_hidden = int(tokens[i, n - 1]), fused[i, n - 1].clone()
            st.backlog, st.backlog_len = [], 0

    @torch.inference_mode()
    def propose(self, requests: Sequence[DraftRequest], ks: Sequence[int]) -> list[Draft]:
        return self.propose_with(requests, ks, None)

    @torch.inference_mode()
    def propose_with(self, requests: Sequence[DraftRequest], ks: Sequence[int],
                     adapter: "StaticAdapter | None") -> list[Draft]:
        """Greedy chains from this drafter's cache, by the head alone or with an adapter's deltas (the adaptive
        speculator): the cache is the same for both (the adapter leaves k/v alone); with an adapter the last
        committed position's output is recomputed with its deltas, one query row against the cache."""
        drafts = [Draft() for _ in requests]
        live = [i for i, r in enumerate(requests) if ks[i] > 0 and self._ready(r.request_id)]
        if not live:
            return drafts
        head, dev = self.head, self.device
        states = [self.states[requests[i].request_id] for i in live]
        self._catch_up(states)
        B = len(states)
        K = max(ks[i] for i in live)
        if adapter is not None or K > 1:
            past_k, past_v, past_valid = pad_past(states, dev)
        if adapter is None:
            g = torch.stack([st.pre for st in states]).unsqueeze(1)  # [B, 1, d]
            first = [st.first_id for st in states]
            toks = [[st.first_id] for st in states]
            confs = [[st.first_p] for st in states]
        else:
            from adaspec.core.heads.eagle3 import masked_attention

            h = torch.stack([st.last_hidden for st in states]).unsqueeze(1)  # [B, 1, d]
            t = torch.tensor([st.last_token for st in states], device=dev).unsqueeze(1)  # [B, 1]
            p = torch.tensor([st.length - 1 for st in states], device=dev).unsqueeze(1)  # [B, 1]
            q, _, _ = adapter.qkv(head.embed(t), h, p)
            g = adapter.finish(masked_attention(q, past_k, past_v, past_valid.unsqueeze(1)), h)  # [B, 1, d]
            ids, probs = dispatch.draft_topk(head.logits_hidden(g[:, 0]), head.lm_head_weight, 1)
            first = head.to_target_ids(ids[:, 0]).tolist()
            toks = [[int(x)] for x in first]
            confs = [[float(x)] for x in probs[:, 0].tolist()]
        if K > 1:
            tok = torch.tensor(first, device=dev).unsqueeze(1)
            pos = torch.tensor([st.length for st in states], device=dev).unsqueeze(1)
            one = torch.ones(B, 1, dtype=torch.bool, device=dev)
            for _ in range(K - 1):
                pre, k, v = head.extend(tok, g, pos, past_k, past_v, past_valid, one, layer=adapter)
                past_k, past_v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
                past_valid = torch.cat([past_valid, one], 1)
                ids, probs = dispatch.draft_topk(head.logits_hidden(pre[:, 0]), head.lm_head_weight, 1)
                tok = head.to_target_ids(ids)
                g, pos = pre, pos + 1
                for j, (t, p) in enumerate(zip(tok[:, 0].tolist(), probs[:, 0].tolist())):
                    toks[j].append(int(t))
                    confs[j].append(float(p))
        for j, i in enumerate(live):
            drafts[i] = Draft(toks[j][: ks[i]], confs[j][: ks[i]])
        return drafts

    def _ready(self, request_id: str) -> bool:
        st = self.states.get(request_id)
        return st is not None and (st.pre is not None or st.backlog_len > 0)

"""Log entries -> training samples: per-request streams stitched from consecutive steps.

An entry of one engine step carries the target's hidden states at the positions it kept (the pending token,
then the accepted drafts) and the tokens the target emitted there. The last `accepted + 1` rows pair with
the emitted tokens: row j's next token is emitted[j]. That is exactly the adaptive head's input (h_t, token
t+1); its targets are the following tokens, which for the last rows arrive with the request's *next* step.
So entries of one request are stitched into a stream while they are provably consecutive -- same server, no
batch lost in between (the per-server `seq` has no gap), every step sampled with features -- and a sample is
emitted once its `width` successors are known (or, with the rest padded IGNORE, when the stream ends).

Entries are hostile input: features with the wrong dtype/shape, non-finite values or out-of-vocab tokens are
rejected (counted by reason) and break the stream; nothing of them reaches the buffer.
"""

from __future__ import annotations

import collections
import time
import zlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from adaspec.core.heads.adaptive import IGNORE
from adaspec.core.online.wire import LogBatch, StepEntry, blob_to_tensor

# Rejection reasons (label values of adaspec_sidecar_entries_rejected_total).
FEATURES_DTYPE = "features_dtype"
FEATURES_SHAPE = "features_shape"
FEATURES_NONFINITE = "features_nonfinite"
TOKEN_RANGE = "token_range"


#: A seq jump larger than this is a server restart (or a hostile peer), not lost batches: the lost-batch
#: counters stay bounded whatever `seq` a peer sends (they are summed into admin `status`).
MAX_SEQ_GAP = 1 << 20


@dataclass
class Samples:
    """Training samples of one tenant: hidden [N, d] (float32), tokens [N], targets [N, width] (IGNORE = none)."""

    tenant: str
    heldout: bool
    hidden: Tensor
    tokens: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class _Stream:
    tenant: str
    heldout: bool
    rows: list[Tensor] = field(default_factory=list)  # hidden rows not yet emitted as samples
    toks: list[int] = field(default_factory=list)  # toks[j] = the token the target emitted after rows[j]
    touched: float = 0.0


def is_heldout(source: str, request_id: str, fraction: float) -> bool:
    """A stable per-request split (crc32 of the ids), so one request never feeds both sides: the held-out rule
    of every learner (the sidecar's assembler, the in-process ones)."""
    if fraction <= 0.0:
        return False
    return zlib.crc32(f"{source}\0{request_id}".encode()) / 2**32 < fraction


class StreamAssembler:
    """Stitches validated entries into per-request streams and cuts them into samples."""

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        width: int,
        holdout_fraction: float = 0.0,
        max_streams: int = 4096,
        idle_s: float = 5.0,
    ) -> None:
        self.hidden_size, self.vocab_size, self.width = hidden_size, vocab_size, width
        self.holdout_fraction = holdout_fraction
        self.max_streams, self.idle_s = max_streams, idle_s
        self.streams: collections.OrderedDict[tuple[str, str], _Stream] = collections.OrderedDict()
        self.last_seq: dict[str, int] = {}
        self.rejected: collections.Counter[str] = collections.Counter()
        self.gaps: collections.Counter[str] = collections.Counter()  # batches lost per server (seq gaps)
        self.restarts: collections.Counter[str] = collections.Counter()  # seq went backwards (server restarted)
        self._out: list[Samples] = []

    # -- public ---------------------------------------------------------------------------------------------
    def add_batch(self, batch: LogBatch) -> list[Samples]:
        """Ingest one decoded batch; returns the samples it completed (grouped by tenant and split)."""
        self._check_seq(batch.server_id, batch.seq)
        now = time.monotonic()
        for entry in batch.entries:
            self._add_entry(batch.server_id, entry, now)
        return self._take()

    def expire(self, now: float | None = None) -> list[Samples]:
        """Close streams idle for `idle_s` (their requests have most likely finished)."""
        now = time.monotonic() if now is None else now
        for key in [k for k, s in self.streams.items() if now - s.touched >= self.idle_s]:
            self._close(key)
        return self._take()

    def flush_all(self) -> list[Samples]:
        for key in list(self.streams):
            self._close(key)
        return self._take()

    def is_heldout(self, server_id: str, request_id: str) -> bool:
        return is_heldout(server_id, request_id, self.holdout_fraction)

    # -- internals ------------------------------------------------------------------------------------------
    def forget_server(self, server: str) -> None:
        """Drop everything kept for `server` (its open streams close; a later batch starts it afresh)."""
        for key in [k for k in self.streams if k[0] == server]:
            self._close(key)
        self.last_seq.pop(server, None)
        self.gaps.pop(server, None)
        self.restarts.pop(server, None)

    def _check_seq(self, server: str, seq: int) -> None:
        last = self.last_seq.get(server)
        if last is not None and seq != last + 1:
            if last + 1 < seq <= last + 1 + MAX_SEQ_GAP:
                self.gaps[server] += seq - last - 1
            else:
                self.restarts[server] += 1
            for key in [k for k in self.streams if k[0] == server]:
                self._close(key)
        self.last_seq[server] = seq

    def _add_entry(self, server: str, e: StepEntry, now: float) -> None:
        key = (server, e.request_id)
        if e.prefill and key in self.streams:
            self._close(key)  # a prefill always starts a request afresh
        rows = self._rows(e)
        if rows is None:
            self._close(key)
            return
        st = self.streams.get(key)
        if st is None:
            st = _Stream(e.tenant, self.is_heldout(server, e.request_id))
            self.streams[key] = st
            while len(self.streams) > self.max_streams:
                self._close(next(iter(self.streams)))
        self.streams.move_to_end(key)
        st.touched = now
        st.rows.append(rows)
        st.toks.extend(e.emitted_tokens)
        if e.emitted < e.accepted + 1:  # stopped inside the chain (EOS, budget): the request is over
            self._close(key)
        else:
            self._cut(st, final=False)

    def _rows(self, e: StepEntry) -> Tensor | None:
        """The hidden rows pairing with e's emitted tokens, or None (counted when it is a rejection)."""
        if e.features is None or e.emitted == 0 or len(e.emitted_tokens) != e.emitted:
            return None  # not sampled / no ids: unusable but not hostile
        blob = e.features
        if blob.dtype not in ("float32", "float16", "bfloat16"):
            self.rejected[FEATURES_DTYPE] += 1
            return None
        need = e.accepted + 1
        shape = blob.shape
        if (len(shape) != 2 or shape[1] != self.hidden_size or shape[0] < need
                or (not e.prefill and shape[0] != need)):
            self.rejected[FEATURES_SHAPE] += 1
            return None
        if any(t >= self.vocab_size for t in e.emitted_tokens):
            self.rejected[TOKEN_RANGE] += 1
            return None
        start = shape[0] - need
        # Only the rows that pair with emitted tokens, copied: a view would pin the whole decoded message (a
        # prefill's features can be the whole prompt -- D17: 12 such entries pinned +550 MB).
        feats = blob_to_tensor(blob)[start: start + e.emitted].to(torch.float32, copy=True)  # [emitted, d]
        if not bool(torch.isfinite(feats).all()):
            self.rejected[FEATURES_NONFINITE] += 1
            return None
        return feats

    def _close(self, key: tuple[str, str]) -> None:
        st = self.streams.pop(key, None)
        if st is not None:
            self._cut(st, final=True)

    def _cut(self, st: _Stream, final: bool) -> None:
        """Emit every sample whose targets are known (all of them, IGNORE-padded, when `final`)."""
        n_rows = sum(int(r.shape[0]) for r in st.rows)
        n = n_rows if final else max(0, n_rows - self.width)
        # A final stream's last row has no successor at all: it can never be a sample.
        n = min(n, len(st.toks) - 1)
        if n <= 0:
            if final:
                st.rows, st.toks = [], []
            return
        rows = torch.cat(st.rows) if len(st.rows) > 1 else st.rows[0]
        toks = torch.tensor(st.toks + [IGNORE] * self.width, dtype=torch.long)
        idx = torch.arange(n)
        targets = toks[idx.unsqueeze(1) + 1 + torch.arange(self.width).unsqueeze(0)]
        self._out.append(Samples(st.tenant, st.heldout, rows[:n].clone(), toks[:n].clone(), targets))
        st.rows, st.toks = ([rows[n:]], st.toks[n:]) if not final else ([], [])

    def _take(self) -> list[Samples]:
        out, self._out = self._out, []
        if len(out) <= 1:
            return out
        groups: dict[tuple[str, bool], list[Samples]] = {}
        for s in out:
            groups.setdefault((s.tenant, s.heldout), []).append(s)
        return [
            Samples(t, h, torch.cat([s.hidden for s in g]), torch.cat([s.tokens for s in g]),
                    torch.cat([s.targets for s in g]))
            for (t, h), g in groups.items()
        ]

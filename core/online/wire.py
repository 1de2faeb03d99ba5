"""The serving <-> sidecar wire protocol: versioned msgpack messages, schema-checked on decode.

Every message is one msgpack map carrying `schema_version` and `kind`. Decoding treats the bytes as hostile:
the size is bounded before msgpack sees them, msgpack's own length limits bound every string, array, map and
bin, and a strict pydantic schema plus explicit limit checks decide the rest. Whatever the input, `decode`
either returns a validated message or raises `WireError` with a reason code -- never anything else -- so a
malformed or malicious peer can at worst get its message dropped and counted.

Tensors travel as (dtype, shape, raw little-endian bytes); only the dtypes below are accepted.
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
from dataclasses import dataclass
from typing import Annotated, Any, Iterable, Literal, Sequence, TypeVar, Union

import msgpack
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Bumped on any incompatible change; peers with another version are refused (no silent coercion).
SCHEMA_VERSION = 2  # 2: StepEntry.draft_tokens (was drafted_tokens), the name StepRecord uses

# Reason codes carried by WireError (stable strings: they label metrics).
NOT_BYTES = "not_bytes"
TOO_LARGE = "too_large"
MALFORMED = "malformed"
SCHEMA_MISSING = "schema_missing"
SCHEMA_OLD = "schema_old"
SCHEMA_NEW = "schema_new"
UNKNOWN_KIND = "unknown_kind"
UNEXPECTED_KIND = "unexpected_kind"
INVALID = "invalid"
LIMIT = "limit"


class WireError(Exception):
    """A message could not be encoded or decoded; `reason` is one of the codes above."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class WireLimits:
    """Upper bounds applied to every decode (and encode, so a sender learns of a violation at once)."""

    max_message_bytes: int = 512 * 1024 * 1024
    max_entries: int = 4096
    max_tokens_per_entry: int = 4096
    max_tensor_bytes: int = 256 * 1024 * 1024
    max_tensors: int = 1024
    max_str_bytes: int = 64 * 1024
    max_map_len: int = 1024
    #: Arrays + maps in one message. Nested empty arrays cost ~60 bytes of Python each for 1 byte of input
    #: (D6: 16 MB of them took +980 MB and a 15 s stall); a log batch needs a few per entry.
    max_containers: int = 65536

    @property
    def container_budget(self) -> int:
        return max(self.max_containers, 8 * self.max_entries + self.max_tensors + 64)


DEFAULT_LIMITS = WireLimits()


class _ContainerBudget:
    """msgpack's list/map hooks, counting containers as they are built: decoding stops at the budget, so a
    message can cost at most that many containers however it nests (the length limits bound each one)."""

    __slots__ = ("left",)

    def __init__(self, budget: int) -> None:
        self.left = budget

    def _spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise WireError(LIMIT, "too many arrays/maps in one message (max_containers)")

    def on_list(self, value: list) -> list:
        self._spend()
        return value

    def on_map(self, value: dict) -> dict:
        self._spend()
        return value

# -- tensors --------------------------------------------------------------------------------------------------

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}
DTypeName = Literal["float32", "float16", "bfloat16", "int64", "int32"]

_Dim = Annotated[int, Field(ge=0, lt=2**31)]
_Name = Annotated[str, Field(min_length=1, max_length=512)]
_Id = Annotated[str, Field(max_length=512)]
_Token = Annotated[int, Field(ge=0, lt=2**31)]
_Count = Annotated[int, Field(ge=0, lt=2**31)]
_Version = Annotated[int, Field(ge=0, lt=2**63)]
_Conf = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
_Scalar = Union[bool, int, float, str, None]
_Value = Union[_Scalar, list[_Scalar], dict[str, _Scalar]]

_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


class TensorBlob(BaseModel):
    """A tensor as (dtype, shape, little-endian bytes); the byte count must match dtype x shape."""

    model_config = _STRICT

    dtype: DTypeName
    shape: list[_Dim] = Field(max_length=8)
    data: bytes

    @model_validator(mode="after")
    def _size_matches(self) -> "TensorBlob":
        want = math.prod(self.shape) * ITEMSIZE[self.dtype]
        if want != len(self.data):
            raise ValueError(f"{self.dtype}{self.shape} needs {want} bytes, got {len(self.data)}")
        return self


class NamedTensor(TensorBlob):
    """One tensor of a weight update, named as in the module's state_dict."""

    name: _Name


def tensor_to_blob(t: torch.Tensor) -> TensorBlob:
    """Serialise a tensor (any device, any layout) to little-endian bytes."""
    return TensorBlob(**_tensor_fields(t))


def named_tensor(name: str, t: torch.Tensor) -> NamedTensor:
    return NamedTensor(name=name, **_tensor_fields(t))


def _tensor_fields(t: torch.Tensor) -> dict[str, Any]:
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise WireError(INVALID, f"dtype {t.dtype} is not sent on the wire (allowed: {sorted(DTYPES)})")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8)
    if sys.byteorder == "big" and ITEMSIZE[name] > 1:
        raw = raw.reshape(-1, ITEMSIZE[name]).flip(-1).reshape(-1)
    return {"dtype": name, "shape": list(t.shape), "data": raw.numpy().tobytes()}


def blob_to_tensor(blob: TensorBlob) -> torch.Tensor:
    """A fresh, writable CPU tensor holding the blob's values."""
    dtype = DTYPES[blob.dtype]
    if not blob.data:
        return torch.empty(blob.shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(blob.data), dtype=torch.uint8)
    if sys.byteorder == "big" and ITEMSIZE[blob.dtype] > 1:
        raw = raw.reshape(-1, ITEMSIZE[blob.dtype]).flip(-1).reshape(-1).clone()
    return raw.view(dtype).reshape(blob.shape)


def weights_checksum(tensors: Iterable[NamedTensor]) -> str:
    """sha256 over the tensors sorted by name, each as length-prefixed name, dtype, shape and data."""
    h = hashlib.sha256()
    for t in sorted(tensors, key=lambda x: x.name):
        for part in (t.name.encode(), t.dtype.encode()):
            h.update(struct.pack("<Q", len(part)))
            h.update(part)
        h.update(struct.pack(f"<Q{len(t.shape)}Q", len(t.shape), *t.shape))
        h.update(struct.pack("<Q", len(t.data)))
        h.update(t.data)
    return h.hexdigest()


# -- messages -------------------------------------------------------------------------------------------------


class StepEntry(BaseModel):
    """One request's part of one engine step, as the sidecar trainer needs it.

    Token lists are either exact (len == the count) or empty when the engine did not expose the ids.
    `features` holds target hidden states at the accepted positions, present only for sampled entries.
    """

    model_config = _STRICT

    step: _Count
    request_id: _Id
    tenant: _Id
    drafter: _Id | None
    k: _Count
    drafted: _Count
    accepted: _Count
    emitted: _Count
    draft_tokens: list[_Token]
    emitted_tokens: list[_Token]
    confidence: list[_Conf]
    weight_version: _Version
    prefill: bool = False
    features: TensorBlob | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "StepEntry":
        if not self.accepted <= self.drafted <= self.k:
            raise ValueError(f"need accepted <= drafted <= k, got {self.accepted}/{self.drafted}/{self.k}")
        if self.emitted > self.accepted + 1:
            raise ValueError(f"emitted {self.emitted} > accepted + 1")
        if len(self.draft_tokens) not in (0, self.drafted):
            raise ValueError("draft_tokens must be empty or exactly `drafted` long")
        if len(self.emitted_tokens) not in (0, self.emitted):
            raise ValueError("emitted_tokens must be empty or exactly `emitted` long")
        if len(self.confidence) not in (0, self.drafted):
            raise ValueError("confidence must be empty or one per drafted token")
        # D18: the counts must agree with the tokens -- an accepted draft token is the token emitted there
        n = min(self.accepted, self.emitted)
        if self.draft_tokens and self.emitted_tokens and self.draft_tokens[:n] != self.emitted_tokens[:n]:
            raise ValueError(f"accepted {self.accepted} but the emitted tokens differ from the draft within them")
        return self


class _Message(BaseModel):
    model_config = _STRICT

    schema_version: int = SCHEMA_VERSION


class LogBatch(_Message):
    """Server -> sidecar: a batch of step entries. `seq` counts batches per server, so gaps reveal drops."""

    kind: Literal["log_batch"] = "log_batch"
    server_id: _Id
    seq: _Version
    entries: list[StepEntry]


class WeightUpdate(_Message):
    """Sidecar -> servers: a complete set of drafter tensors at `version` (never a partial update)."""

    kind: Literal["weight_update"] = "weight_update"
    version: Annotated[int, Field(ge=1, lt=2**63)]
    drafter: _Name
    tensors: list[NamedTensor]
    checksum: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

    @model_validator(mode="after")
    def _unique_names(self) -> "WeightUpdate":
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names")
        return self

    @classmethod
    def build(cls, drafter: str, version: int, tensors: dict[str, torch.Tensor]) -> "WeightUpdate":
        """An update from named tensors (e.g. a state_dict), with its checksum computed."""
        named = [named_tensor(n, t) for n, t in sorted(tensors.items())]
        return cls(version=version, drafter=drafter, tensors=named, checksum=weights_checksum(named))

    def checksum_ok(self) -> bool:
        return weights_checksum(self.tensors) == self.checksum


class Hello(_Message):
    """Server -> sidecar (request path): who I am, which drafters I run, which versions I hold."""

    kind: Literal["hello"] = "hello"
    server_id: _Id
    drafters: list[_Name]
    have: dict[str, _Version] = Field(default_factory=dict)


class Ack(_Message):
    """Sidecar -> server: current versions, plus every update newer than what the Hello said it has."""

    kind: Literal["ack"] = "ack"
    versions: dict[str, _Version]
    updates: list[WeightUpdate] = Field(default_factory=list)


class AdminRequest(_Message):
    """Operator -> sidecar: a command (e.g. 'status', 'pause', 'rollback') with flat arguments."""

    kind: Literal["admin_request"] = "admin_request"
    command: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]
    args: dict[str, _Value] = Field(default_factory=dict)


class AdminReply(_Message):
    """Sidecar -> operator: ok flag, a status payload, and an error message when not ok."""

    kind: Literal["admin_reply"] = "admin_reply"
    ok: bool
    status: dict[str, _Value] = Field(default_factory=dict)
    error: str | None = None


Message = Union[LogBatch, WeightUpdate, Hello, Ack, AdminRequest, AdminReply]
KINDS: dict[str, type[_Message]] = {
    "log_batch": LogBatch,
    "weight_update": WeightUpdate,
    "hello": Hello,
    "ack": Ack,
    "admin_request": AdminRequest,
    "admin_reply": AdminReply,
}
M = TypeVar("M", bound=_Message)


# -- encode / decode ------------------------------------------------------------------------------------------


def encode(msg: _Message, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    """msgpack bytes for `msg`; raises WireError if the receiver's limits would refuse it."""
    if msg.schema_version != SCHEMA_VERSION:
        raise WireError(SCHEMA_NEW if msg.schema_version > SCHEMA_VERSION else SCHEMA_OLD,
                        f"cannot send schema_version {msg.schema_version}")
    _check_limits(msg, limits)
    data = msgpack.packb(msg.model_dump(mode="python"), use_bin_type=True)
    if len(data) > limits.max_message_bytes:
        raise WireError(TOO_LARGE, f"{len(data)} bytes > max_message_bytes {limits.max_message_bytes}")
    return data


def decode(data: Any, limits: WireLimits = DEFAULT_LIMITS, expect: type[M] | None = None) -> M:
    """Validate and decode one message; any problem raises WireError, nothing else."""
    try:
        return _decode(data, limits, expect)  # type: ignore[return-value]
    except WireError:
        raise
    except Exception as exc:  # anything msgpack/pydantic/our checks did not classify: still a bad message
        raise WireError(MALFORMED, f"{type(exc).__name__}: {exc}"[:300]) from None


def _decode(data: Any, limits: WireLimits, expect: type[_Message] | None) -> _Message:
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray)):
        raise WireError(NOT_BYTES, f"expected bytes, got {type(data).__name__}")
    if len(data) > limits.max_message_bytes:
        raise WireError(TOO_LARGE, f"{len(data)} bytes > max_message_bytes {limits.max_message_bytes}")
    budget = _ContainerBudget(limits.container_budget)
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            list_hook=budget.on_list,
            object_hook=budget.on_map,
            strict_map_key=True,
            max_bin_len=limits.max_tensor_bytes,
            max_str_len=limits.max_str_bytes,
            max_array_len=max(limits.max_entries, limits.max_tokens_per_entry, limits.max_tensors, 64),
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except ValueError as exc:
        # msgpack reports exceeded length limits as ValueError; ExtraData/FormatError/StackError subclass it.
        text = str(exc)
        reason = LIMIT if "exceeds max" in text else MALFORMED
        raise WireError(reason, f"msgpack: {text}"[:300]) from None
    if not isinstance(obj, dict):
        raise WireError(MALFORMED, f"top level is {type(obj).__name__}, not a map")
    version = obj.get("schema_version")
    if type(version) is not int:
        raise WireError(SCHEMA_MISSING, f"schema_version missing or not an int: {version!r}"[:200])
    if version < SCHEMA_VERSION:
        raise WireError(SCHEMA_OLD, f"peer speaks schema {version}, this side {SCHEMA_VERSION}")
    if version > SCHEMA_VERSION:
        raise WireError(SCHEMA_NEW, f"peer speaks schema {version}, this side {SCHEMA_VERSION}")
    kind = obj.get("kind")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise WireError(UNKNOWN_KIND, f"unknown message kind {kind!r}"[:200])
    if expect is not None and cls is not expect:
        raise WireError(UNEXPECTED_KIND, f"expected {expect.__name__}, got {cls.__name__}")
    try:
        msg = cls.model_validate(obj, strict=True)
    except Exception as exc:  # pydantic.ValidationError, or a validator's ValueError
        raise WireError(INVALID, f"{cls.__name__}: {exc}"[:500]) from None
    _check_limits(msg, limits)
    return msg


def _check_limits(msg: _Message, limits: WireLimits) -> None:
    if isinstance(msg, LogBatch):
        if len(msg.entries) > limits.max_entries:
            raise WireError(LIMIT, f"{len(msg.entries)} entries > max_entries {limits.max_entries}")
        for e in msg.entries:
            n = max(len(e.draft_tokens), len(e.emitted_tokens), len(e.confidence))
            if n > limits.max_tokens_per_entry:
                raise WireError(LIMIT, f"{n} tokens in an entry > max_tokens_per_entry")
            if e.features is not None and len(e.features.data) > limits.max_tensor_bytes:
                raise WireError(LIMIT, "features > max_tensor_bytes")
    elif isinstance(msg, WeightUpdate):
        _check_update(msg, limits)
    elif isinstance(msg, Ack):
        for u in msg.updates:
            _check_update(u, limits)


def _check_update(u: WeightUpdate, limits: WireLimits) -> None:
    if len(u.tensors) > limits.max_tensors:
        raise WireError(LIMIT, f"{len(u.tensors)} tensors > max_tensors {limits.max_tensors}")
    for t in u.tensors:
        if len(t.data) > limits.max_tensor_bytes:
            raise WireError(LIMIT, f"tensor {t.name!r}: {len(t.data)} bytes > max_tensor_bytes")


# -- engine records -> entries --------------------------------------------------------------------------------


def entry_from_record(
    record: Any,
    features: torch.Tensor | None = None,
    draft_tokens: Sequence[int] | None = None,
    emitted_tokens: Sequence[int] | None = None,
) -> StepEntry:
    """A StepEntry from an engine `StepRecord` (the same field names; token ids from the explicit arguments,
    else the record's own)."""
    if draft_tokens is None:
        draft_tokens = record.draft_tokens
    if emitted_tokens is None:
        emitted_tokens = record.emitted_tokens
    conf = [min(1.0, max(0.0, float(c))) for c in record.confidence]  # NaN clamps to 0.0
    return StepEntry(
        step=int(record.step),
        request_id=str(record.request_id),
        tenant=str(record.tenant),
        drafter=record.drafter,
        k=int(record.k),
        drafted=int(record.drafted),
        accepted=int(record.accepted),
        emitted=int(record.emitted),
        draft_tokens=[int(t) for t in draft_tokens],
        emitted_tokens=[int(t) for t in emitted_tokens],
        confidence=conf,
        weight_version=int(record.weight_version),
        prefill=bool(record.prefill),
        features=None if features is None else tensor_to_blob(features),
    )

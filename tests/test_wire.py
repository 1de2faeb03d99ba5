"""Wire protocol: round-trips, tensor codec, checksums, schema versions, limits, and fuzzing (only WireError)."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaspec.core.online import wire
from adaspec.core.step import StepRecord
from adaspec.core.online.wire import (
    Ack,
    AdminReply,
    AdminRequest,
    Hello,
    LogBatch,
    StepEntry,
    WeightUpdate,
    WireError,
    WireLimits,
    decode,
    encode,
)

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def _entry(**kw) -> StepEntry:
    base = dict(
        step=3, request_id="r1", tenant="t", drafter="suffix", k=4, drafted=3, accepted=2, emitted=3,
        draft_tokens=[5, 6, 7], emitted_tokens=[5, 6, 9], confidence=[0.9, 0.5, 0.1], weight_version=2,
        prefill=False, features=wire.tensor_to_blob(torch.randn(3, 2, 8)),
    )
    base.update(kw)
    return StepEntry(**base)


def _update(version: int = 1) -> WeightUpdate:
    g = torch.Generator().manual_seed(version)
    return WeightUpdate.build("eagle", version, {
        "fc.weight": torch.randn(3, 4, generator=g),
        "fc.bias": torch.randn(3, generator=g).half(),
        "norm.weight": torch.randn(3, generator=g).bfloat16(),
        "pos": torch.arange(5, dtype=torch.int64),
        "idx": torch.arange(2, dtype=torch.int32),
    })


MESSAGES = [
    LogBatch(server_id="srv-a", seq=7, entries=[_entry(), _entry(drafter=None, k=0, drafted=0, accepted=0,
                                                                    emitted=1, draft_tokens=[],
                                                                    emitted_tokens=[], confidence=[],
                                                                    features=None)]),
    _update(),
    Hello(server_id="srv-a", drafters=["eagle", "adaptive"], have={"eagle": 3}),
    Ack(versions={"eagle": 4}, updates=[_update(4)]),
    AdminRequest(command="status", args={"verbose": True, "n": 3, "names": ["a", "b"], "opt": {"x": 1.5}}),
    AdminReply(ok=False, status={"step": 10, "loss": 0.25}, error="paused"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    data = encode(msg)
    back = decode(data)
    assert back == msg and type(back) is type(msg)
    assert decode(data, expect=type(msg)) == msg
    assert decode(bytearray(data)) == msg and decode(memoryview(data)) == msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4)])
def test_tensor_codec_round_trip(dtype, shape):
    t = (torch.randn(shape) * 100).to(dtype)
    blob = wire.tensor_to_blob(t)
    back = wire.blob_to_tensor(wire.TensorBlob.model_validate(blob.model_dump()))
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)
    back.add_(1)  # writable, and not aliasing the original
    assert not torch.equal(back, t) or t.numel() == 0


def test_tensor_codec_is_little_endian_and_handles_views():
    t = torch.tensor([1, 256], dtype=torch.int32)
    assert wire.tensor_to_blob(t).data == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    m = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # non-contiguous
    assert torch.equal(wire.blob_to_tensor(wire.tensor_to_blob(m)), m)
    with pytest.raises(WireError):
        wire.tensor_to_blob(torch.zeros(2, dtype=torch.float64))


def test_checksum_is_canonical_and_sensitive():
    u = _update()
    shuffled = list(reversed(u.tensors))
    assert wire.weights_checksum(shuffled) == u.checksum and u.checksum_ok()
    bad = u.tensors[0].model_copy(update={"data": bytes(len(u.tensors[0].data))})
    assert wire.weights_checksum([bad, *u.tensors[1:]]) != u.checksum
    renamed = u.tensors[0].model_copy(update={"name": "other"})
    assert wire.weights_checksum([renamed, *u.tensors[1:]]) != u.checksum


def test_entry_from_step_record():
    rec = StepRecord(step=2, request_id="q", tenant="acme", drafter="suffix", k=4, drafted=3, accepted=1,
                     emitted=2, confidence=[0.5, float("nan"), 1.0000001], batch_size=2, chunk_tokens=4,
                     draft_s=0.0, verify_s=0.0, prefill=False, weight_version=5)
    e = wire.entry_from_record(rec, features=torch.ones(2, 1, 4))
    assert (e.request_id, e.tenant, e.drafter, e.k, e.accepted, e.weight_version) == ("q", "acme", "suffix", 4, 1, 5)
    assert e.draft_tokens == [] and e.confidence == [0.5, 0.0, 1.0]
    assert torch.equal(wire.blob_to_tensor(e.features), torch.ones(2, 1, 4))
    e2 = wire.entry_from_record(rec, draft_tokens=[1, 2, 3], emitted_tokens=[1, 4])
    assert e2.draft_tokens == [1, 2, 3] and e2.emitted_tokens == [1, 4]
    with pytest.raises(Exception):
        wire.entry_from_record(rec, draft_tokens=[1, 2])  # must match the count


def _raw(msg) -> dict:
    return msgpack.unpackb(encode(msg), raw=False)


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize("version,reason", [(wire.SCHEMA_VERSION - 1, wire.SCHEMA_OLD),
                                            (wire.SCHEMA_VERSION + 1, wire.SCHEMA_NEW), (None, wire.SCHEMA_MISSING),
                                            ("1", wire.SCHEMA_MISSING), (True, wire.SCHEMA_MISSING)])
def test_schema_version_is_checked(version, reason):
    obj = _raw(Hello(server_id="s", drafters=[]))
    if version is None:
        del obj["schema_version"]
    else:
        obj["schema_version"] = version
    with pytest.raises(WireError) as exc:
        decode(_pack(obj))
    assert exc.value.reason == reason
    with pytest.raises(WireError) as exc:
        encode(Hello(server_id="s", drafters=[], schema_version=wire.SCHEMA_VERSION + 1))
    assert exc.value.reason == wire.SCHEMA_NEW


@pytest.mark.parametrize("mutate", [
    lambda o: o.update(kind="nope"),
    lambda o: o.update(kind=3),
])
def test_unknown_kind(mutate):
    obj = _raw(Hello(server_id="s", drafters=[]))
    mutate(obj)
    with pytest.raises(WireError) as exc:
        decode(_pack(obj))
    assert exc.value.reason == wire.UNKNOWN_KIND


def test_unexpected_kind():
    with pytest.raises(WireError) as exc:
        decode(encode(Hello(server_id="s", drafters=[])), expect=LogBatch)
    assert exc.value.reason == wire.UNEXPECTED_KIND


@pytest.mark.parametrize("mutate", [
    lambda o: o.update(seq="7"),                                           # str for int
    lambda o: o.update(seq=True),                                          # bool for int
    lambda o: o.update(seq=-1),                                            # out of range
    lambda o: o.update(extra=1),                                           # unknown field
    lambda o: o["entries"][0].update(draft_tokens=[1.5, 2, 3]),          # float token
    lambda o: o["entries"][0].update(draft_tokens=[-1, 2, 3]),           # negative token
    lambda o: o["entries"][0].update(accepted=4),                          # accepted > drafted
    lambda o: o["entries"][0].update(confidence=[2.0, 0.1, 0.1]),          # confidence > 1
    lambda o: o["entries"][0]["features"].update(shape=[3, 2, 9]),         # bytes != dtype x shape
    lambda o: o["entries"][0]["features"].update(dtype="float64"),         # dtype not allowed
    lambda o: o["entries"][0]["features"].update(data="text"),             # str for bytes
    lambda o: o.update(entries={"a": 1}),                                  # map for list
    lambda o: o.pop("server_id"),                                          # missing field
])
def test_wrong_types_are_invalid(mutate):
    obj = _raw(MESSAGES[0])
    mutate(obj)
    with pytest.raises(WireError) as exc:
        decode(_pack(obj))
    assert exc.value.reason == wire.INVALID


def test_weight_update_structure_checks():
    obj = _raw(_update())
    obj["tensors"].append(obj["tensors"][0])
    with pytest.raises(WireError, match="duplicate"):
        decode(_pack(obj))
    obj = _raw(_update())
    obj["checksum"] = "xyz"
    with pytest.raises(WireError):
        decode(_pack(obj))


def test_limits():
    small = WireLimits(max_message_bytes=4096, max_entries=2, max_tokens_per_entry=2, max_tensor_bytes=64,
                       max_tensors=2)
    with pytest.raises(WireError) as exc:
        decode(b"\x00" * 5000, small)
    assert exc.value.reason == wire.TOO_LARGE
    three = LogBatch(server_id="s", seq=0, entries=[_entry(features=None)] * 3)
    for fn in (lambda: encode(three, small), lambda: decode(encode(three), small)):
        with pytest.raises(WireError) as exc:
            fn()
        assert exc.value.reason == wire.LIMIT
    one = LogBatch(server_id="s", seq=0, entries=[_entry(features=None)])  # 3 tokens > 2
    with pytest.raises(WireError) as exc:
        decode(encode(one), small)
    assert exc.value.reason == wire.LIMIT
    big = WeightUpdate.build("eagle", 1, {"w": torch.zeros(100)})
    with pytest.raises(WireError) as exc:
        decode(encode(big), small)  # refused by msgpack's max_bin_len before any copy
    assert exc.value.reason == wire.LIMIT
    many = WeightUpdate.build("eagle", 1, {f"w{i}": torch.zeros(1) for i in range(3)})
    with pytest.raises(WireError):
        decode(encode(many), small)
    assert decode(encode(WeightUpdate.build("eagle", 1, {"w": torch.zeros(4)})), small).version == 1


def test_msgpack_ext_and_non_str_keys_refused():
    for data in (
        msgpack.packb({"schema_version": 1, "kind": "hello", "x": msgpack.ExtType(1, b"abc")}),
        msgpack.packb({1: 2}),
        b"\x91" * 100_000,  # deep nesting
        msgpack.packb({"schema_version": 1}) + b"\x00",  # trailing data
    ):
        with pytest.raises(WireError):
            decode(data)


def test_non_bytes_inputs():
    for data in (None, 5, "str", [1], object()):
        with pytest.raises(WireError) as exc:
            decode(data)
        assert exc.value.reason == wire.NOT_BYTES


def _decode_or_wire_error(data: bytes) -> None:
    try:
        msg = decode(data)
    except WireError as exc:
        assert exc.reason
        return
    assert type(msg) in wire.KINDS.values()


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    _decode_or_wire_error(data)


ENCODED = [encode(m) for m in MESSAGES]


@FUZZ
@given(st.sampled_from(ENCODED), st.data())
def test_fuzz_truncated(data, draw):
    cut = draw.draw(st.integers(0, len(data) - 1))
    with pytest.raises(WireError):
        decode(data[:cut])


@FUZZ
@given(st.sampled_from(ENCODED), st.data())
def test_fuzz_mutated_bytes(data, draw):
    buf = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        buf[draw.draw(st.integers(0, len(buf) - 1))] = draw.draw(st.integers(0, 255))
    _decode_or_wire_error(bytes(buf))


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8),
                  st.binary(max_size=8))
_any = st.recursive(_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                    max_leaves=20)


@FUZZ
@given(st.sampled_from(MESSAGES), st.data())
def test_fuzz_wrong_field_values(msg, draw):
    """Replace one (possibly nested) field of a valid message by an arbitrary msgpack value."""
    obj = _raw(msg)
    node = obj
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = draw.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw.draw(st.booleans()):
            node = child
            continue
        node[key] = draw.draw(_any)
        break
    _decode_or_wire_error(_pack(obj))


@FUZZ
@given(_any)
def test_fuzz_arbitrary_msgpack(obj):
    _decode_or_wire_error(_pack(obj))


@FUZZ
@given(st.integers(1, 5), st.integers(0, 3))
def test_fuzz_oversized_declared_lengths(hdr_kind, pad):
    """Headers claiming huge bins/strings/arrays are refused without allocating them."""
    headers = [b"\xc6\x7f\xff\xff\xff", b"\xdb\x7f\xff\xff\xff", b"\xdd\x7f\xff\xff\xff",
               b"\xdf\x7f\xff\xff\xff", b"\xc9\x7f\xff\xff\xff\x01"]
    with pytest.raises(WireError):
        decode(headers[hdr_kind - 1] + b"\x00" * pad, WireLimits(max_message_bytes=1 << 20))


def test_nested_empty_arrays_are_refused_before_they_cost_memory():
    """D6: 16 MB of nested empty arrays once decoded to +980 MB and a 15 s stall (each costs ~60 bytes of
    Python for 1 byte of input); decoding now stops at the container budget, fast and small."""
    import time
    import tracemalloc

    from adaspec.core.online.wire import LIMIT, WireError, decode

    inner = b"\xdc" + (4096).to_bytes(2, "big") + b"\x90" * 4096  # array16 of 4096 empty arrays
    pad = b"\xdc" + (1024).to_bytes(2, "big") + inner * 1024  # 4M empty arrays in 4 MB, built as bytes
    data = (b"\x83" + msgpack.packb("schema_version") + msgpack.packb(2) + msgpack.packb("kind")
            + msgpack.packb("log_batch") + msgpack.packb("pad") + pad)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(WireError) as exc:
            decode(data)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert exc.value.reason == LIMIT and "max_containers" in str(exc.value)
    assert elapsed < 1.0 and peak < 32 * 2**20  # without the budget: ~250 MB of lists

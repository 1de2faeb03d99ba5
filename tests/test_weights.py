"""WeightStager: every bad update is refused and counted with the module untouched; good ones swap in place."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry

from adaspec.core.online import weights as W
from adaspec.core.online.wire import WeightUpdate, named_tensor, weights_checksum


class Head(torch.nn.Module):
    """A tiny drafter-like module: a linear layer, a norm, a persistent buffer and a non-persistent one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def _snapshot(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(m: torch.nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())


def _new_values(m: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in m.state_dict().items()}


def _rebuild(update: WeightUpdate, tensors, checksum: str | None = None) -> WeightUpdate:
    return WeightUpdate(version=update.version, drafter=update.drafter, tensors=tensors,
                        checksum=checksum or weights_checksum(tensors))


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def head() -> Head:
    torch.manual_seed(0)
    return Head()


def _rejected(registry, reason: str, drafter: str = "eagle") -> float:
    return registry.get_sample_value("adaspec_weight_updates_rejected_total",
                                     {"drafter": drafter, "reason": reason}) or 0.0


def test_valid_update_applies_in_place(head, registry):
    stager = W.WeightStager(head, "eagle", registry=registry)
    ptrs = {k: v.data_ptr() for k, v in head.state_dict().items()}
    new = _new_values(head, 1)
    assert stager.offer(WeightUpdate.build("eagle", 1, new))
    assert stager.staged_version == 1 and stager.version == 0
    assert not torch.equal(head.fc.weight, new["fc.weight"])  # staging touches nothing
    with torch.inference_mode():  # the engine runs between_steps hooks inside inference mode
        pause = stager()
    assert pause > 0.0 and stager.version == 1 and stager.staged_version is None
    for k, v in head.state_dict().items():
        assert v.data_ptr() == ptrs[k]
        assert torch.equal(v, new[k])
    assert head.fc.weight.requires_grad  # still a trainable Parameter, not replaced
    assert stager.apply_if_staged() == 0.0  # nothing staged any more
    assert registry.get_sample_value("adaspec_weight_updates_applied_total", {"drafter": "eagle"}) == 1.0
    assert registry.get_sample_value("adaspec_drafter_weights_version", {"drafter": "eagle"}) == 1.0


def _bad_updates(head: Head):
    good = WeightUpdate.build("eagle", 5, _new_values(head, 2))
    ts = list(good.tensors)
    idx = [t.name for t in ts].index("fc.weight")
    w = _new_values(head, 2)["fc.weight"]

    def swap(t):
        out = list(ts)
        out[idx] = t
        return _rebuild(good, out)

    yield "nan", swap(named_tensor("fc.weight", w.index_put((torch.tensor([0]), torch.tensor([0])),
                                                             torch.tensor(float("nan"))))), W.NONFINITE
    yield "inf", swap(named_tensor("fc.weight", torch.full_like(w, float("-inf")))), W.NONFINITE
    yield "shape", swap(named_tensor("fc.weight", torch.zeros(4, 3))), W.SHAPE
    yield "dtype", swap(named_tensor("fc.weight", w.half())), W.DTYPE
    yield "missing", _rebuild(good, [t for t in ts if t.name != "fc.bias"]), W.MISSING
    yield "extra", _rebuild(good, ts + [named_tensor("scratch", torch.zeros(2))]), W.EXTRA
    yield "checksum", _rebuild(good, ts, checksum="0" * 64), W.CHECKSUM
    yield "checksum_data", _rebuild(good, [ts[0].model_copy(update={"data": bytes(len(ts[0].data))}), *ts[1:]],
                                    checksum=good.checksum), W.CHECKSUM
    yield "older", good.model_copy(update={"version": 2}), W.STALE
    yield "equal", good.model_copy(update={"version": 3}), W.STALE
    yield "drafter", WeightUpdate.build("other", 9, _new_values(head, 2)), W.WRONG_DRAFTER


@pytest.mark.parametrize("case", [c[0] for c in _bad_updates(Head())])
def test_bad_update_rejected_and_counted(head, registry, case):
    stager = W.WeightStager(head, "eagle", registry=registry, version=3)
    _, update, reason = next(c for c in _bad_updates(head) if c[0] == case)
    snap = _snapshot(head)
    assert stager.offer(update) is False
    assert stager.last_reject == reason
    assert _rejected(registry, reason) == 1.0
    assert stager.staged_version is None
    assert stager.apply_if_staged() == 0.0
    assert stager.version == 3 and _same(head, snap)


def test_rejection_keeps_earlier_staged_update_whole(head, registry):
    stager = W.WeightStager(head, "eagle", registry=registry)
    v1 = _new_values(head, 1)
    assert stager.offer(WeightUpdate.build("eagle", 1, v1))
    v2 = _new_values(head, 2)
    v2["norm.bias"] = torch.full((3,), float("nan"))
    assert not stager.offer(WeightUpdate.build("eagle", 2, v2))
    assert stager.offer(WeightUpdate.build("eagle", 1, v1)) is False  # equal to staged: stale
    stager.apply_if_staged()
    assert stager.version == 1 and all(torch.equal(v, v1[k]) for k, v in head.state_dict().items())


def test_newer_staged_update_replaces_older(head, registry):
    stager = W.WeightStager(head, "eagle", registry=registry)
    assert stager.offer(WeightUpdate.build("eagle", 1, _new_values(head, 1)))
    v3 = _new_values(head, 3)
    assert stager.offer(WeightUpdate.build("eagle", 3, v3))
    assert stager.newest_version() == 3
    stager.apply_if_staged()
    assert stager.version == 3 and all(torch.equal(v, v3[k]) for k, v in head.state_dict().items())


def test_garbage_offer_never_raises(head, registry):
    stager = W.WeightStager(head, "eagle", registry=registry)
    assert stager.offer(None) is False  # type: ignore[arg-type]
    assert _rejected(registry, W.INTERNAL) == 1.0


def test_published_subset_and_unknown_names(head, registry):
    with pytest.raises(ValueError):
        W.WeightStager(head, "eagle", names=["fc.weight", "nope"], registry=registry)
    stager = W.WeightStager(head, "eagle", names=["fc.weight"], registry=registry)
    snap = _snapshot(head)
    w = torch.randn(3, 4)
    assert stager.offer(WeightUpdate.build("eagle", 1, {"fc.weight": w}))
    stager.apply_if_staged()
    assert torch.equal(head.fc.weight, w) and torch.equal(head.fc.bias, snap["fc.bias"])


def test_tied_weights_must_agree(registry):
    emb = torch.nn.Embedding(5, 3)
    lm = torch.nn.Linear(3, 5, bias=False)
    lm.weight = emb.weight
    m = torch.nn.ModuleDict({"emb": emb, "lm": lm})
    stager = W.WeightStager(m, "eagle", registry=registry)
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    assert not stager.offer(WeightUpdate.build("eagle", 1, {"emb.weight": a, "lm.weight": b}))
    assert stager.last_reject == W.TIED_MISMATCH
    assert stager.offer(WeightUpdate.build("eagle", 1, {"emb.weight": a, "lm.weight": a}))
    stager.apply_if_staged()
    assert torch.equal(m["lm"].weight, a) and m["lm"].weight is m["emb"].weight


def test_metrics_shared_per_registry(head, registry):
    a = W.WeightStager(head, "eagle", registry=registry)
    b = W.WeightStager(Head(), "adaptive", registry=registry)  # same registry: no duplicate-metric error
    assert a.metrics is b.metrics


def test_stager_as_engine_between_steps_hook(head, registry):
    """Fits SpecEngine.between_steps: the engine calls it with no arguments before each step."""
    from adaspec.core.drafters.base import Draft
    from adaspec.core.engine.engine import SpecEngine
    from adaspec.core.step import FixedPolicy
    from adaspec.core.engine.sampling import SamplingParams

    from tiny_models import make_tiny_target

    from adaspec.core.drafters.base import DrafterBase

    class Echo(DrafterBase):
        name = "echo"

        def propose(self, rs, ks):
            return [Draft([1] * k, [0.5] * k) for k in ks]

    stager = W.WeightStager(head, "eagle", registry=registry)
    engine = SpecEngine(make_tiny_target(context=64), [Echo()], batch_size=2)
    seen = []
    engine.between_steps.append(stager)
    engine.between_steps.append(lambda: seen.append(stager.version))
    assert stager.offer(WeightUpdate.build("eagle", 1, _new_values(head, 1)))
    engine.generate([[3, 4, 5]], SamplingParams(max_new_tokens=4), FixedPolicy("echo", 2))
    assert seen and seen[0] == 1

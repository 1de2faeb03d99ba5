"""`assembly.build_runtime` -- the wiring a worker gets -- with a fake SGLang target worker and real sockets:
the adaptive head from the sidecar's base over the target's tensors, logs out to a real PULL socket, a weight
update from a real publisher staged off the hot path and applied in place at the next batch start."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry

from adaspec.core.step import Plan
from adaspec.core.errors import ConfigError
from adaspec.core.heads.adaptive import AdaptiveConfig, AdaptiveHead
from adaspec.core.online.transport import Transport
from adaspec.core.online.settings import TransportSettings
from adaspec.core.online.wire import WeightUpdate
from adaspec.sglang_ext.assembly import adaptive_head, build_runtime
from adaspec.sglang_ext.runtime import STATIC, ReqView
from adaspec.sglang_ext.settings import load_plugin_settings
from adaspec.core.heads.adaptive_base import write_base

V, D = 40, 8


def fake_target_worker(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    embed, head = torch.randn(V, D, generator=g), torch.randn(V, D, generator=g)
    model = SimpleNamespace(get_embed_and_head=lambda: (embed, head))
    return SimpleNamespace(model_runner=SimpleNamespace(model=model)), embed, head


def base_file(tmp_path, embed, head, vocab=V):
    cfg = AdaptiveConfig(hidden_size=D, vocab_size=vocab, inner_size=16)
    e = embed if vocab == V else torch.randn(vocab, D)
    h = head if vocab == V else torch.randn(vocab, D)
    return write_base(AdaptiveHead(cfg, e, h), tmp_path / "base.safetensors")


def settings(tmp_path, **kw):
    kw.setdefault("adaptive_base", tmp_path / "base.safetensors")
    kw.setdefault("sidecar", False)
    return load_plugin_settings(candidate_steps="0,1,2,4", **kw)


def test_runtime_with_base_has_all_drafters_sharing_target_tensors(tmp_path):
    worker, embed, head = fake_target_worker()
    base_file(tmp_path, embed, head)
    rt = build_runtime(settings(tmp_path), "srv", worker, "cpu", registry=CollectorRegistry())
    assert set(rt.drafters) == {"suffix", "adaptive"} and rt.static
    ad = rt.drafters["adaptive"].head
    assert ad.embed_weight.data_ptr() == embed.data_ptr() and ad.lm_head_weight.data_ptr() == head.data_ptr()
    assert rt.policy.names == [STATIC, "suffix", "adaptive"] and rt.policy.settings.max_k == 4
    assert len(rt.stagers) == 1 and rt.stagers[0].drafter == "adaptive" and rt.sender is None


def test_the_served_head_drafts_over_the_bases_draft_vocabulary(tmp_path):
    """The sidecar trains and gates the head over the base's draft ids: the plugin's head drafts over the same."""
    worker, embed, head = fake_target_worker()
    cfg = AdaptiveConfig(hidden_size=D, vocab_size=V, inner_size=16)
    trained = AdaptiveHead(cfg, embed, head)
    trained.set_draft_vocab(torch.arange(5, 25))
    write_base(trained, tmp_path / "base.safetensors")
    served = adaptive_head(tmp_path / "base.safetensors", embed, head)
    assert torch.equal(served.draft_ids, torch.arange(5, 25))
    assert torch.equal(served.draft_lm_head, head[5:25])
    base_file(tmp_path, embed, head)  # a full-vocabulary base: the whole LM head
    assert adaptive_head(tmp_path / "base.safetensors", embed, head).draft_ids is None


def test_runtime_without_base_runs_without_adaptive(tmp_path, caplog):
    worker, _, _ = fake_target_worker()
    rt = build_runtime(settings(tmp_path, drafters="static,adaptive"), "srv", worker, "cpu",
                       registry=CollectorRegistry())
    assert rt.drafters == {} and rt.policy.names == [STATIC] and "adaptive drafter off" in caplog.text


def test_base_for_another_model_turns_the_adaptive_drafter_off_and_serving_goes_on(tmp_path, caplog):
    worker, embed, head = fake_target_worker()
    base_file(tmp_path, embed, head, vocab=V + 1)  # a base for a bigger vocabulary than the served model's
    with pytest.raises(ConfigError, match="served model's embedding is"):
        adaptive_head(tmp_path / "base.safetensors", embed, head)
    rt = build_runtime(settings(tmp_path), "srv", worker, "cpu", registry=CollectorRegistry())
    assert set(rt.drafters) == {"suffix"} and rt.policy.names == [STATIC, "suffix"]
    assert "adaptive drafter off" in caplog.text and "served model's embedding is" in caplog.text


def test_padded_vocabulary_of_the_served_model_is_accepted(tmp_path):
    """SGLang pads embedding/LM head rows to a multiple of 64: the head uses the first vocab_size rows."""
    worker, embed, head = fake_target_worker()
    base_file(tmp_path, embed, head)
    padded_e, padded_h = torch.cat([embed, torch.zeros(24, D)]), torch.cat([head, torch.zeros(24, D)])
    ad = adaptive_head(tmp_path / "base.safetensors", padded_e, padded_h)
    assert ad.embed_weight.shape == (V, D) and ad.embed_weight.data_ptr() == padded_e.data_ptr()
    ref = adaptive_head(tmp_path / "base.safetensors", embed, head)
    h, tok = torch.randn(3, D), torch.tensor([1, 5, V - 1])
    assert torch.equal(ad.draft(h, tok, 3)[0], ref.draft(h, tok, 3)[0])  # padding rows never take part


def test_logs_reach_the_sidecar_socket_and_weights_swap_in_at_batch_start(tmp_path):
    worker, embed, head = fake_target_worker()
    base_file(tmp_path, embed, head)
    ts = TransportSettings(run_dir=tmp_path / "run")
    sidecar = Transport(ts)
    puller = sidecar.log_puller()
    publisher = sidecar.weight_publisher()
    server = Transport(ts)
    rt = None
    try:
        rt = build_runtime(settings(tmp_path, sidecar=True, feature_sample_rate=1.0), "srv-1", worker, "cpu",
                           registry=CollectorRegistry(), transport=server)
        head_mod = rt.drafters["adaptive"].head
        ptr = head_mod.up.weight.data_ptr()
        new = {n: torch.full_like(t, 0.5) for n, t in head_mod.state_dict().items()}
        publisher.publish(WeightUpdate.build("adaptive", 7, new))
        deadline = time.monotonic() + 20
        while rt.stagers[0].staged_version != 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rt.stagers[0].staged_version == 7
        assert float(head_mod.up.weight.detach()[0, 0]) != 0.5  # staged only: nothing changes mid-step
        assert rt.begin_batch() > 0.0
        assert float(head_mod.up.weight.detach()[0, 0]) == 0.5 and head_mod.up.weight.data_ptr() == ptr
        # the update was word from the sidecar: the link guard (checked at batch start) keeps adaptive available
        assert rt.link is not None and rt.link.up and rt.policy.available[rt.policy.index["adaptive"]]
        rt.link.subscriber.last_contact -= 3600  # an hour of silence: the controller falls back to static
        rt.begin_batch()
        assert not rt.link.up and not rt.policy.available[rt.policy.index["adaptive"]]
        rt.policy.plan = lambda rows: [Plan(STATIC, 2) for _ in rows]
        plan = rt.plan([ReqView("r1", "acme", [1, 2, 3], [4], 50)])
        hidden = torch.randn(3, D)
        rt.complete(plan, [2], [11, 12, 0], [4, 11, 13], hidden)
        assert rt.sender.drain(10)
        assert rt.feature_budget.held == 0  # the features' device bytes came back once they were sent
        batch = None
        for _ in range(40):
            batch = puller.recv(250)
            if batch is not None:
                break
        assert batch is not None and batch.server_id == "srv-1"
        e = batch.entries[0]
        assert (e.request_id, e.tenant, e.drafter, e.accepted, e.emitted_tokens) == ("r1", "acme", STATIC, 1, [11, 12])
        assert e.features is not None and e.features.shape == [2, D]  # what the sidecar stitches and trains on
        assert e.weight_version == 0  # static drafter: no online weights
    finally:
        if rt is not None:
            rt.close()
        publisher.close()
        puller.close()
        server.close()
        sidecar.close()

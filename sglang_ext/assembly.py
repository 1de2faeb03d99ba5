"""Build a worker's `AtlasRuntime` from settings and the target model (SGLang-free: the target worker is read
duck-typed -- `model_runner.model.get_embed_and_head()`), so the wiring is testable on CPU.

The adaptive head starts from the head base (`adaptive_base`: the same file format both servers read) (the same version-0 weights the sidecar trains from)
and shares the target's embedding and LM head tensors; without a base file it is left out (logged) and the
controller runs with the other drafters. With `ADASPEC_SGLANG_SIDECAR` on, logs go out through a
`BackgroundSender` -> `LogPublisher` and weight updates come in through a `WeightSubscriber` thread into a
`WeightStager` (validated off the hot path, copied in place at the next batch start).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from adaspec.core.config import Settings
from adaspec.core.controller import AtlasPolicy, load_controller_settings
from adaspec.core.drafters.adaptive import AdaptiveDrafter
from adaspec.core.drafters.registry import make_drafter
from adaspec.core.errors import ConfigError
from adaspec.core.heads.adaptive import AdaptiveHead
from adaspec.core.heads.adaptive_base import read_base
from adaspec.core.online.sender import BackgroundSender, DeviceBudget, PublisherSink
from adaspec.sglang_ext.metrics import plugin_metrics
from adaspec.sglang_ext.runtime import STATIC, AtlasRuntime
from adaspec.sglang_ext.settings import PluginSettings

log = logging.getLogger(__name__)


def adaptive_head(base_path: Path, embed: torch.Tensor, lm_head: torch.Tensor) -> AdaptiveHead | None:
    """The adaptive head at the base's version 0 over the target's own embedding/LM head, drafting over the
    base's draft vocabulary when it has one; None without a base.

    SGLang pads the vocabulary of its embedding and LM head (`VocabParallelEmbedding` rounds it up to a
    multiple of 64), so the served tensors may have more rows than the base's HF vocabulary: the head uses
    their first `vocab_size` rows (views, no copy). A base made for another model (fewer rows, other width)
    is a ConfigError."""
    if not base_path.is_file():
        log.warning("adaspec: no adaptive head base at %s (the sidecar writes it); adaptive drafter off", base_path)
        return None
    base = read_base(base_path)
    cfg = base.config
    rows, width = cfg.vocab_size, cfg.hidden_size
    for name, t in (("embedding", embed), ("LM head", lm_head)):
        if t.dim() != 2 or t.shape[0] < rows or t.shape[1] != width:
            raise ConfigError(f"head base {base_path} is for vocab x hidden {(rows, width)}; the served model's "
                              f"{name} is {tuple(t.shape)}")
    return base.build(embed=embed[:rows], lm_head=lm_head[:rows]).to(embed.device)


def build_runtime(settings: PluginSettings, server_id: str, target_worker: Any, device: Any,
                  registry: CollectorRegistry | None = None, transport: Any = None) -> AtlasRuntime:
    """Controller, drafters, metrics, and (with the sidecar on) the log sender and weight subscriber."""
    pm, engine_metrics = plugin_metrics(registry)
    drafters: dict[str, Any] = {}
    if "suffix" in settings.drafters:
        drafters["suffix"] = make_drafter("suffix", Settings(), None)
    stagers = []
    if "adaptive" in settings.drafters:
        embed, head_w = target_worker.model_runner.model.get_embed_and_head()
        try:
            head = adaptive_head(settings.base_path(), embed, head_w)
        except ConfigError as exc:  # serve with the other drafters rather than not at all
            log.error("adaspec: %s; adaptive drafter off", exc)
            head = None
        if head is not None:
            from adaspec.core.online.weights import WeightStager

            drafters["adaptive"] = AdaptiveDrafter(head, collect=0)
            stagers.append(WeightStager(head, "adaptive", registry=registry))
    static = STATIC in settings.drafters
    cs = load_controller_settings()
    if cs.max_k > settings.max_steps:
        cs = load_controller_settings(max_k=settings.max_steps, explore_k=min(cs.explore_k, settings.max_steps))
    policy = AtlasPolicy(([STATIC] if static else []) + list(drafters), cs)
    sender = None
    link = None
    closers: list[Any] = []
    if settings.sidecar:
        from adaspec.core.online.logs import LogPublisher
        from adaspec.core.online.transport import Transport
        from adaspec.core.online.guard import LinkGuard
        from adaspec.core.online.weights import WeightSubscriber

        transport = transport if transport is not None else Transport()
        publisher = LogPublisher.from_transport(transport, server_id, feature_sample_rate=1.0, registry=registry)
        sender = BackgroundSender(PublisherSink(publisher), settings.log_queue,
                                  on_drop=lambda n: pm.logs_dropped.inc(), flush=publisher.flush)
        if stagers:
            subscriber = WeightSubscriber(transport, stagers, server_id).start()
            link = LinkGuard(subscriber, [s.drafter for s in stagers], transport.settings.link_timeout_s,
                             server_id, registry).attach(policy)
            closers.append(subscriber.stop)
        closers += [sender.close, publisher.close]
    runtime = AtlasRuntime(
        policy, drafters, settings.candidate_steps, static=static, stagers=stagers, sender=sender,
        listeners=[engine_metrics], feature_sample_rate=settings.feature_sample_rate if sender else 0.0,
        feature_budget=DeviceBudget(int(settings.log_feature_mib * 2**20)) if sender else None,
        downshift_after=settings.downshift_after, metrics=pm, seed=settings.seed,
    )
    runtime.closers = closers
    runtime.link = link
    return runtime

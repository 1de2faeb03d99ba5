"""adaspec series in SGLang's own /metrics.

SGLang serves /metrics from the HTTP process with prometheus_client's `MultiProcessCollector` over
`PROMETHEUS_MULTIPROC_DIR` (sglang 0.5.17 `srt/utils/common.py` `add_prometheus_middleware`; the directory is
set before the scheduler processes are spawned). In that mode every Counter/Gauge/Histogram created in a
scheduler process writes its values to that directory, whatever registry it is registered in -- so the
plugin only has to create its series inside the scheduler process (lazily, never at import) and they appear
next to SGLang's. The per-drafter series are the engine's own (`EngineMetrics`, fed the same StepRecords),
so one dashboard reads the reference engine and SGLang alike; the weight path adds `WeightMetrics`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from adaspec.core.metrics import K_BUCKETS, EngineMetrics, per_registry


class PluginMetrics:
    """What only the SGLang worker knows: batch step counts, state switches, skipped EAGLE forwards, glue
    errors, dropped log steps and features."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch_steps = Histogram("adaspec_sglang_batch_steps",
                                     "Step count (verify width - 1) of each decode batch.", buckets=K_BUCKETS,
                                     registry=registry)
        self.static_skipped = Counter("adaspec_sglang_static_draft_skipped",
                                      "Decode batches where no request used the EAGLE-3 draft forward.",
                                      registry=registry)
        self.logs_dropped = Counter("adaspec_sglang_log_steps_dropped",
                                    "Steps of acceptance logs dropped because the sender queue was full.",
                                    registry=registry)
        self.state_switches = Counter("adaspec_sglang_state_switches",
                                      "Runtime-state (step count) switches of the worker.", registry=registry)
        self.glue_errors = Counter("adaspec_sglang_glue_errors",
                                   "Failures inside the plugin's glue (batch start, planning, prefill, verify "
                                   "complete), each caught and served past.", ["where"], registry=registry)
        self.features_skipped = Counter("adaspec_sglang_log_features_skipped",
                                        "Sampled requests logged without hidden states because the log queue "
                                        "held its device-memory budget.", registry=registry)
        self.goodput = Gauge("adaspec_sglang_controller_goodput", "Controller's planned batch goodput (tokens/s).",
                             multiprocess_mode="mostrecent", registry=registry)


def plugin_metrics(registry: CollectorRegistry | None = None) -> tuple[PluginMetrics, EngineMetrics]:
    """The plugin's and the engine's series on `registry` (a fresh private one by default; under SGLang's
    multiprocess mode the values reach /metrics either way)."""
    registry = registry if registry is not None else _REGISTRY
    return per_registry(PluginMetrics, registry), per_registry(EngineMetrics, registry)


_REGISTRY = CollectorRegistry(auto_describe=True)

"""Sidecar Prometheus series (one instance per registry, so tests never collide on metric names)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class SidecarMetrics:
    """Ingest, trainer, gate, publish, rollback and buffer series of one sidecar."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.batches = Counter("adaspec_sidecar_log_batches_received", "Log batches accepted, by server.",
                               ["server"], registry=r)
        self.entries = Counter("adaspec_sidecar_log_entries_received", "Step entries accepted, by server.",
                               ["server"], registry=r)
        self.batches_lost = Counter("adaspec_sidecar_log_batches_lost",
                                    "Batches a server sent that never arrived (seq gaps: its queue was full).",
                                    ["server"], registry=r)
        self.messages_rejected = Counter("adaspec_sidecar_messages_rejected",
                                         "Messages refused by the wire decoder, by channel and reason.",
                                         ["channel", "reason"], registry=r)
        self.log_disconnects = Counter("adaspec_sidecar_log_disconnects",
                                       "Log peer connections that ended: a frame over max_message_bytes is dropped "
                                       "by libzmq with its connection (and servers that stop show here).",
                                       registry=r)
        self.entries_rejected = Counter("adaspec_sidecar_entries_rejected",
                                        "Log entries refused (bad features or tokens), by reason.", ["reason"],
                                        registry=r)
        self.samples = Counter("adaspec_sidecar_samples", "Training samples made from logs, by split.", ["split"],
                               registry=r)
        self.updates = Counter("adaspec_sidecar_trainer_updates", "Trainer updates (AdamW steps).", registry=r)
        self.trained_tokens = Counter("adaspec_sidecar_trained_tokens", "Target tokens trained on.", registry=r)
        self.loss = Gauge("adaspec_sidecar_trainer_loss", "Loss of the last trainer update.", registry=r)
        self.tokens_per_s = Gauge("adaspec_sidecar_trainer_tokens_per_second",
                                  "Trainer throughput (smoothed), target tokens per second.", registry=r)
        self.gate = Counter("adaspec_sidecar_gate_decisions", "Evaluation gate outcomes.", ["decision"], registry=r)
        self.gate_tau = Gauge("adaspec_sidecar_gate_tau", "Estimated tau at the last gate, by head.", ["head"],
                              registry=r)
        self.version = Gauge("adaspec_sidecar_published_version", "Weight version currently published.", registry=r)
        self.publishes = Counter("adaspec_sidecar_publishes", "Versions published, by source.", ["source"],
                                 registry=r)
        self.rollbacks = Counter("adaspec_sidecar_rollbacks", "Rollbacks, automatic or by the operator.", ["kind"],
                                 registry=r)
        self.served_acceptance = Gauge("adaspec_sidecar_served_acceptance",
                                       "Acceptance the servers report, serving vs previous version.", ["which"],
                                       registry=r)
        self.buffer_samples = Gauge("adaspec_sidecar_buffer_samples", "Training samples buffered, by tenant.",
                                    ["tenant"], registry=r)
        self.buffer_fill = Gauge("adaspec_sidecar_buffer_fill_ratio", "Replay buffer fill (0..1).", registry=r)
        self.holdout_samples = Gauge("adaspec_sidecar_holdout_samples", "Held-out samples buffered.", registry=r)
        self.cpu_share = Gauge("adaspec_sidecar_cpu_share_cores",
                               "Cores the learner may use now (co-located: what its drafter's earnings pay for).",
                               registry=r)
        self.earned_fraction = Gauge("adaspec_sidecar_earned_fraction",
                                     "Share of the servers' emitted decode tokens the drafter's accepted drafts "
                                     "supplied (recent window).", registry=r)
        self.paused = Gauge("adaspec_sidecar_paused", "1 while training/publishing is paused.", registry=r)
        self.checkpoints = Counter("adaspec_sidecar_checkpoints", "Checkpoints written.", registry=r)
        self.loop_errors = Counter("adaspec_sidecar_loop_errors",
                                   "Service loop turns that failed (e.g. disk errors); the loop goes on.", registry=r)

"""The sidecar: the online trainer process that learns the adaptive drafter from what the servers log.

Modules, one job each: `settings` (ADASPEC_SIDECAR_* knobs), `samples`
(log entries -> per-request streams -> training samples), `buffer` (bounded per-tenant replay buffer),
`trainer` (AdamW updates), `gate` (held-out chain replay -> publish or not), `served` (acceptance the
servers report, rollback rule), `checkpoint` (atomic versions/checkpoints, resume), `metrics`,
`service` (the loop), `admin` (commands and status), `cli` (`adaspec sidecar ...`), `inprocess` (the same
pipeline driven synchronously, for the drift benchmark), `process` (spawning a sidecar as a child process that
dies with its parent), `bench`. The serving side of the link is `adaspec.core.online`; the head base file
both sides read is `adaspec.core.heads.adaptive_base`.
"""

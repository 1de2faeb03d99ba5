"""The sidecar: the online trainer process that learns the adaptive drafter from what the servers log.

Modules, one job each: `settings` (ADASPEC_SIDECAR_* knobs), `base` (the head base file), `samples`
(log entries -> per-request streams -> training samples), `replay` (bounded per-tenant replay buffer),
`trainer` (AdamW updates), `gate` (held-out chain replay -> publish or not), `served` (acceptance the
servers report, rollback rule), `checkpoint` (atomic versions/checkpoints, resume), `metrics`,
`service` (the loop), `admin` (commands and status), `cli` (`adaspec sidecar ...`), `bench`.
The engine side lives in `adaspec.core.online`.
"""

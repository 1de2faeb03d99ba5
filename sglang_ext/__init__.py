"""adaspec inside SGLang 0.5.17: `--speculative-algorithm ATLAS`, loaded through the `sglang.srt.plugins`
entry point (`plugin.load`).

SGLang-facing modules: `plugin` (entry point), `spec` (registration, server-args rules), `hooks` (every
SGLang function hooked or overridden, and the check that they still match), `worker` (`AtlasWorkerV2`, on
`EAGLEWorkerV2`). SGLang-free glue, unit-tested with fakes: `runtime` (controller, CPU drafters, records,
weights at batch start), `chain` (chain drafts -> verify-input tokens), `states` (pre-captured runtime states
per step count), `hidden_tap` (the target's final hidden states), `logs` (non-blocking log sender),
`metrics` (series in SGLang's /metrics), `settings` (`ADASPEC_SGLANG_*`), `version`.
"""

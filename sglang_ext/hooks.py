"""The SGLang 0.5.17 functions the plugin hooks or overrides, registered and checked in one place.

* `LogitsProcessor.forward` (`srt/layers/logits_processor.py`): AROUND hook via SGLang's `HookRegistry`,
  taps the target's final hidden states for the adaptive drafter (`hidden_tap`).
* `EAGLEWorkerV2` (`srt/speculative/eagle_worker_v2.py`): subclassed by `AtlasWorkerV2`, which overrides
  `forward_batch_generation` (weights at batch start, plan, chain drafts), `on_verify_complete_cpu` (the
  verify-complete hook: `SchedulerBatchResultProcessor._resolve_spec_v2_tokens` calls it once accept lengths are on
  the host), `init_cuda_graphs` / `alloc_memory_pool`, and reuses `build_adaptive_runtime_state`,
  `apply_runtime_state`, `verify`, `_build_trivial_verify_input` and `EagleDraftWorker.draft` /
  `_draft_extend_for_decode` unchanged.
* `build_eagle_verify_input` (`srt/speculative/eagle_worker_common.py`): builds the chain verify input when
  no request of a batch uses EAGLE's draft.

`check_hook_points()` resolves every one of them against the installed SGLang and checks the signatures
the plugin relies on, raising `SGLangUnavailable` (naming the version) when anything moved.
"""

from __future__ import annotations

import inspect
import pkgutil

from adaspec.sglang_ext.version import SGLANG_VERSION, SGLangUnavailable, import_failure

LOGITS_FORWARD = "sglang.srt.layers.logits_processor.LogitsProcessor.forward"

#: target -> parameter names (in order, after self) the plugin relies on.
SIGNATURES: dict[str, tuple[str, ...]] = {
    LOGITS_FORWARD: ("input_ids", "hidden_states", "lm_head", "logits_metadata"),
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.__init__":
        ("server_args", "gpu_id", "ps", "nccl_port", "target_worker"),
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.forward_batch_generation":
        ("batch", "on_publish", "grammar_barrier"),
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.on_verify_complete_cpu":
        ("num_correct_drafts_per_req", "batch_size"),
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.build_adaptive_runtime_state":
        ("speculative_num_steps", "speculative_num_draft_tokens", "cuda_graph_bs"),
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.apply_runtime_state": ("state",),
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.verify": ("batch", "grammar_barrier"),
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2._build_trivial_verify_input": ("batch",),
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.alloc_memory_pool":
        ("memory_pool_config", "req_to_token_pool", "token_to_kv_pool_allocator"),
    "sglang.srt.speculative.eagle_worker_v2.EagleDraftWorker.draft": ("batch",),
    "sglang.srt.speculative.eagle_worker_v2.EagleDraftWorker._draft_extend_for_decode": ("batch", "batch_result"),
    "sglang.srt.speculative.eagle_worker_common.build_eagle_verify_input":
        ("batch", "draft_input", "parent_list", "top_scores_index", "draft_tokens", "draft_probs"),
}

#: (function, source text it must contain): the call sites the plugin depends on being made.
CALL_SITES: tuple[tuple[str, str], ...] = (
    ("sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor._resolve_spec_v2_tokens",
     "self.model_worker.on_verify_complete_cpu("),
    ("sglang.srt.managers.scheduler.Scheduler.init_overlap", "self.spec_algorithm.create_future_map("),
    ("sglang.srt.arg_groups.speculative_hook.handle_speculative_decoding", "algo.validate_server_args(server_args)"),
    # prefill_done: a prefill batch carries the still-chunked request (worker.prefill_done)
    ("sglang.srt.managers.scheduler.Scheduler._get_new_batch_prefill_raw", "chunked_req=self.chunked_req"),
    # StepStates: the switch logs the line worker.quiet_state_switches filters and records the override that
    # states.compact_overrides trims from the context's log
    ("sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.apply_runtime_state", '"Switch adaptive runtime state: "'),
    ("sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.apply_runtime_state", '"adaptive_spec.restore"'),
    ("sglang.srt.runtime_context.RuntimeContext.override", "self._overrides_log.append((source, dict(fields)))"),
)


def register_hooks() -> None:
    """Register the AROUND hook with SGLang's HookRegistry (applied by `load_plugins` after all plugins ran)."""
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except Exception as exc:
        raise import_failure("sglang.srt.plugins.hook_registry", exc) from exc
    from adaspec.sglang_ext.hidden_tap import logits_forward_hook

    if not any(h is logits_forward_hook for _, h, _ in HookRegistry._hooks.get(LOGITS_FORWARD, [])):
        HookRegistry.register(LOGITS_FORWARD, logits_forward_hook, HookType.AROUND)


def _resolve(target: str):
    try:
        return pkgutil.resolve_name(target)
    except Exception as exc:
        raise import_failure(target, exc) from exc


def check_hook_points() -> list[str]:
    """Resolve every hooked/overridden SGLang function and check its signature and call sites; returns the
    targets checked. Raises SGLangUnavailable naming the first mismatch."""
    checked = []
    for target, want in SIGNATURES.items():
        fn = inspect.unwrap(_resolve(target))
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        if params[: len(want)] != list(want):
            raise SGLangUnavailable(
                f"adaspec's SGLang plugin expects {target}{tuple(want)} (sglang=={SGLANG_VERSION}); "
                f"found parameters {tuple(params)}"
            )
        checked.append(target)
    for target, needle in CALL_SITES:
        src = inspect.getsource(inspect.unwrap(_resolve(target)))
        if needle not in src:
            raise SGLangUnavailable(
                f"adaspec's SGLang plugin relies on {target} calling `{needle}` (sglang=={SGLANG_VERSION})"
            )
        checked.append(target)
    return checked

"""`--speculative-algorithm ATLAS`: its registration with SGLang and its server-args rules.

Registered through `SpeculativeAlgorithm.register` (sglang 0.5.17 `srt/speculative/spec_info.py`, storage in
`spec_registry.py`) with `AtlasSpecAlgo`, a `CustomSpecAlgo` that answers like EAGLE3 (`is_eagle()`,
`is_eagle3()` True) so every `if spec_algorithm.is_eagle()` branch of the scheduler, model runner and
memory sizing applies: the target captures EAGLE-3 aux hidden states, the draft model gets its own KV pool,
`--speculative-draft-model-path` loads our exported head as `LlamaForCausalLMEagle3`. It also carries the
enum-only methods the 0.5.17 scheduler calls on every algorithm (`create_future_map`, `need_topk`,
`carries_draft_hidden_states`, ...), which a bare `CustomSpecAlgo` lacks.

`validate_atlas_args` runs inside `handle_speculative_decoding` (`srt/arg_groups/speculative_hook.py`) before
`AtlasSpecAlgo.handle_server_args`, which then applies SGLang's own `_handle_eagle_family`.
"""

from __future__ import annotations

import logging
from typing import Any

from adaspec.sglang_ext.settings import load_plugin_settings
from adaspec.sglang_ext.version import SGLANG_VERSION, import_failure

log = logging.getLogger(__name__)

NAME = "ATLAS"


def validate_atlas_args(server_args: Any) -> None:
    """Check and complete server args for ATLAS; ValueError with the fix on anything it cannot serve."""
    settings = load_plugin_settings()
    sa = server_args
    if sa.speculative_draft_model_path is None:
        raise ValueError(
            "--speculative-algorithm ATLAS needs --speculative-draft-model-path: the static EAGLE-3 head in "
            f"SGLang {SGLANG_VERSION}'s format (written by `adaspec train-static`)"
        )
    if sa.speculative_eagle_topk not in (None, 1):
        raise ValueError(f"ATLAS verifies one chain per request: --speculative-eagle-topk must be 1, "
                         f"got {sa.speculative_eagle_topk}")
    steps = settings.max_steps
    if sa.speculative_num_steps not in (None, steps):
        raise ValueError(
            f"ATLAS sizes SGLang's buffers for its largest candidate step count ({steps}); drop "
            f"--speculative-num-steps {sa.speculative_num_steps} or set ADASPEC_SGLANG_CANDIDATE_STEPS"
        )
    if sa.speculative_num_draft_tokens not in (None, steps + 1):
        raise ValueError(f"ATLAS needs --speculative-num-draft-tokens {steps + 1} (= steps + 1) or unset, "
                         f"got {sa.speculative_num_draft_tokens}")
    if sa.speculative_adaptive:
        raise ValueError("--speculative-adaptive is SGLang's own step controller; ATLAS replaces it: drop the flag")
    for flag in ("speculative_accept_threshold_single", "speculative_accept_threshold_acc"):
        value = getattr(sa, flag, 1.0)
        if value != 1.0:
            # eagle_utils.py:819-820 hands both to the sampling verify kernel; below 1.0 it accepts drafts the
            # target would not have sampled, so outputs would no longer follow the target's distribution.
            raise ValueError(f"ATLAS is lossless only with --{flag.replace('_', '-')} 1.0 (got {value}): drop it")
    if sa.speculative_use_rejection_sampling:
        raise ValueError("--speculative-use-rejection-sampling needs EAGLE's draft probabilities on every row; "
                         "ATLAS verifies deterministic chains with SGLang's target-only rule instead: drop it")
    for flag, why in (
        ("enable_dp_attention", "plans are per rank"),
        ("enable_multi_layer_eagle", "MultiLayerEagleWorkerV2 is not ATLAS's worker"),
        ("enable_two_batch_overlap", "runtime-state swaps drop the TBO backend wrapper"),
        ("enable_pdmux", "runtime-state swaps do not update the PD-mux backends"),
    ):
        if getattr(sa, flag, False):
            raise ValueError(f"ATLAS does not support --{flag.replace('_', '-')} ({why})")
    if getattr(sa, "tp_size", 1) != 1 or getattr(sa, "pp_size", 1) != 1:
        raise ValueError("ATLAS plans on each rank from timings it measures itself, so ranks could disagree: "
                         "tp_size and pp_size must be 1")
    sa.speculative_eagle_topk = 1
    sa.speculative_num_steps = steps
    sa.speculative_num_draft_tokens = steps + 1
    if not sa.disable_overlap_schedule:
        # The suffix and adaptive drafters draft on the host from the tokens committed by the previous step;
        # overlap scheduling would hand them the batch before those are known (NGRAM is synchronous too).
        sa.disable_overlap_schedule = True
        log.info("ATLAS: overlap scheduling disabled (CPU drafters need the previous step's tokens)")


def _spec_class() -> type:
    try:
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
        from sglang.srt.speculative.spec_registry import CustomSpecAlgo
    except Exception as exc:  # pragma: no cover - exercised by the probe when SGLang is broken
        raise import_failure("sglang.srt.speculative.spec_info", exc) from exc

    eagle3 = SpeculativeAlgorithm.EAGLE3

    class AtlasSpecAlgo(CustomSpecAlgo):
        """ATLAS as SGLang sees it: EAGLE-3 in every branch that dispatches on the algorithm."""

        def is_eagle(self) -> bool:
            return True

        def is_eagle3(self) -> bool:
            return True

        def supports_grammar_overlap(self) -> bool:
            return eagle3.supports_grammar_overlap()

        def has_draft_kv(self) -> bool:
            return True

        def need_topk(self) -> bool:
            return True

        def carries_draft_hidden_states(self) -> bool:
            return True

        def create_future_map(self, device, req_to_token_pool, needs_cpu_seq_lens: bool = True,
                              needs_confidence_relay: bool = False):
            from sglang.srt.managers.overlap_utils import FutureMap

            return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay)

        def build_disagg_draft_input(self, batch, server_args, last_tokens_tensor, future_map):
            return eagle3.build_disagg_draft_input(batch, server_args, last_tokens_tensor, future_map)

        def handle_server_args(self, server_args) -> None:
            from sglang.srt.arg_groups.speculative_hook import _handle_eagle_family
            from sglang.srt.speculative.ragged_verify import read_ragged_verify_mode

            read_ragged_verify_mode()
            _handle_eagle_family(server_args)

    return AtlasSpecAlgo


def _worker_factory(server_args: Any) -> type:
    """SpeculativeAlgorithm.create_worker -> this factory -> the worker class (imported only here: it needs
    SGLang's GPU-side modules, which the launcher process never has to import)."""
    from adaspec.sglang_ext.worker import AtlasWorkerV2

    return AtlasWorkerV2


def register_atlas() -> bool:
    """Register ATLAS once per process; False when it was already registered (entry points may run twice)."""
    try:
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
        from sglang.srt.speculative.spec_registry import get_spec
    except Exception as exc:
        raise import_failure("sglang.srt.speculative.spec_info", exc) from exc
    if get_spec(NAME) is not None:
        return False
    SpeculativeAlgorithm.register(
        NAME, supports_overlap=True, validate_server_args=validate_atlas_args, spec_class=_spec_class()
    )(_worker_factory)
    return True

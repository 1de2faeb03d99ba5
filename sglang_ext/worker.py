"""`AtlasWorkerV2`: SGLang 0.5.17's `EAGLEWorkerV2` with the ATLAS controller choosing the drafts.

Per decode batch (`forward_batch_generation`, overridden; everything not named here is SGLang's code):

1. staged weight updates of the adaptive head are copied in place (`AtlasRuntime.safe_begin_batch`) -- before
   any forward of the batch, so CUDA graphs (which read the same storage) stay valid and a step uses one
   version;
2. the controller plans drafter and lookahead per request; the batch's step count is the smallest
   pre-captured runtime state covering the longest chain, with hysteresis (`states.StickySteps`), applied
   with `EAGLEWorkerV2.apply_runtime_state` (what `--speculative-adaptive` does, `StepStates`); SGLang's
   INFO line per switch is filtered and its override log compacted, so nothing grows per step;
3. drafts: rows on the static drafter come from SGLang's own EAGLE-3 path, `EagleDraftWorker.draft`, with our
   exported head as the draft model, untouched; suffix/adaptive rows are written over them (same topk-1
   chain verify input, `chain.overlay_chains`); when no row uses EAGLE its forward is skipped and the chain
   verify input comes from `build_eagle_verify_input`; zero steps uses `_build_trivial_verify_input`;
4. `verify` and `_draft_extend_for_decode` run unchanged (the draft model's KV stays warm every step);
5. `on_verify_complete_cpu` (called by `SchedulerBatchResultProcessor._resolve_spec_v2_tokens` once accept lengths are
   on the host) hands the results to `AtlasRuntime.complete`: controller feedback, drafter observations,
   metrics, and the logs queued to a background sender -- a failure there is counted, never raised.

Importing this module imports SGLang's GPU-side worker modules; `spec` imports it only in the worker factory.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import torch

from adaspec.sglang_ext.version import SGLANG_VERSION, import_failure

try:
    from sglang.srt.layers.moe.utils import speculative_moe_a2a_backend_context, speculative_moe_backend_context
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, check_cuda_graph_backend
    from sglang.srt.runtime_context import get_context, get_exec, get_schedule
    from sglang.srt.speculative.adaptive_runtime_state import SpecRuntimeState
    from sglang.srt.speculative.eagle_info import EagleDraftInput
    from sglang.srt.speculative.eagle_utils import get_draft_recurrent_hidden_state_spec
    from sglang.srt.speculative.eagle_worker_common import build_eagle_verify_input
    from sglang.srt.speculative.eagle_worker_v2 import EAGLEWorkerV2
    from sglang.srt.speculative.spec_utils import spec_stage_span
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
except Exception as exc:  # e.g. a CPU-only install: say which SGLang is expected, not a bare ImportError
    raise import_failure("sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2", exc) from exc

from adaspec.sglang_ext.chain import ChainStager, overlay_chains
from adaspec.sglang_ext.hidden_tap import TAP
from adaspec.sglang_ext.runtime import AtlasRuntime, ReqView, StepPlan
from adaspec.sglang_ext.settings import PluginSettings, load_plugin_settings
from adaspec.sglang_ext.states import RESTORE_SOURCE, StepStates, compact_overrides

log = logging.getLogger(__name__)


def req_view(req: Any) -> ReqView:
    """An SGLang `Req` as the runtime sees it (live references to its token arrays; tenant = cache salt)."""
    return ReqView(
        request_id=str(req.rid),
        tenant=str(getattr(req, "extra_key", None) or "default"),
        prompt=req.origin_input_ids,
        output=req.output_ids,
        max_new_tokens=int(req.sampling_params.max_new_tokens or 1 << 30),
    )


def prefill_done(req: Any, batch: Any) -> bool:
    """Whether this extend finished the request's prefill. A chunked prefill's earlier chunks do not: the
    scheduler hands every prefill batch its still-unfinished chunked request as `batch.chunked_req`
    (sglang 0.5.17 `managers/scheduler.py:3177-3179,3299`; `add_chunked_req` returns the request while it is
    truncated, None once its last chunk is scheduled)."""
    return req is not getattr(batch, "chunked_req", None)


class _DropSwitchLines(logging.Filter):
    """SGLang logs an INFO line on every runtime-state switch (`eagle_worker_v2.py:1382`); ATLAS switches
    often enough that it would flood the log. The switches are counted in `adaspec_sglang_state_switches`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Switch adaptive runtime state")


def quiet_state_switches() -> None:
    """Install the filter once on SGLang's worker logger (other lines of that logger stay)."""
    logger = logging.getLogger("sglang.srt.speculative.eagle_worker_v2")
    if not any(isinstance(f, _DropSwitchLines) for f in logger.filters):
        logger.addFilter(_DropSwitchLines())


class AtlasWorkerV2(EAGLEWorkerV2):
    """EAGLEWorkerV2 whose drafts per request come from the ATLAS controller's choice."""

    def __init__(self, server_args, gpu_id, ps, nccl_port, target_worker) -> None:
        super().__init__(server_args, gpu_id, ps, nccl_port, target_worker)
        self.settings: PluginSettings = load_plugin_settings()
        self.step_states = StepStates(self, self.settings.candidate_steps, after_switch=self._after_switch)
        quiet_state_switches()
        self.server_id = self.settings.server_id or f"sglang-{socket.gethostname()}-{os.getpid()}"
        self._pending: tuple[StepPlan, torch.Tensor, Any] | None = None
        from adaspec.sglang_ext.assembly import build_runtime

        self.runtime: AtlasRuntime = build_runtime(self.settings, self.server_id, self._target_worker, self.device)
        self.stager = ChainStager(max(get_schedule().max_running_requests or 1, 1), self.settings.max_steps,
                                  self.device)
        log.info("adaspec ATLAS worker (sglang %s): drafters %s, candidate steps %s", SGLANG_VERSION,
                 ["static"] + list(self.runtime.drafters), list(self.settings.candidate_steps))

    # -- start-up ------------------------------------------------------------------------------------------
    def alloc_memory_pool(self, memory_pool_config=None, req_to_token_pool=None, token_to_kv_pool_allocator=None):
        super().alloc_memory_pool(memory_pool_config=memory_pool_config, req_to_token_pool=req_to_token_pool,
                                  token_to_kv_pool_allocator=token_to_kv_pool_allocator)
        # Before the scheduler captures the target's verify graphs (Scheduler.__init__: tp_worker graphs
        # come after the pools), so the tap's copy is captured into them.
        graph = get_exec().graph.cuda_graph_config
        max_bs = max((graph.decode.max_bs if graph is not None else 0) or 0,
                     get_schedule().max_running_requests or 0, 1)
        model = self._target_worker.model_runner.model
        processor = getattr(model, "logits_processor", None)
        if processor is None:  # the adaptive drafter then never gets a hidden state and never drafts
            log.warning("adaspec ATLAS: %s has no logits_processor; adaptive drafter idle", type(model).__name__)
            return
        embed, _ = model.get_embed_and_head()
        TAP.bind(processor, max_bs * (self.settings.max_steps + 1), embed.shape[1], embed.dtype, embed.device)

    def init_cuda_graphs(self):
        super().init_cuda_graphs()  # draft graphs at the server's (largest) step count
        self.step_states.register(self.speculative_num_steps, SpecRuntimeState(
            speculative_num_steps=self.speculative_num_steps,
            speculative_num_draft_tokens=self.speculative_num_draft_tokens,
            draft_attn_backend=self._draft_worker.draft_attn_backend,
            cuda_graph_runner=self._draft_worker.cuda_graph_runner,
            target_attn_backend=self._target_worker.model_runner.attn_backend,
            target_graph_runner=self._target_worker.model_runner.decode_cuda_graph_runner,
            draft_extend_attn_backend=self._draft_worker.draft_extend_attn_backend,
            cuda_graph_runner_for_draft_extend=self._draft_worker.cuda_graph_runner_for_draft_extend,
        ))
        graph_bs = (None if check_cuda_graph_backend(Phase.DECODE, Backend.DISABLED)
                    else get_exec().graph.cuda_graph_bs_decode)
        with (self._draft_worker.draft_tp_context(self._draft_worker.draft_runner.tp_group),
              speculative_moe_backend_context(), speculative_moe_a2a_backend_context()):
            self.step_states.build_all(graph_bs)
        self.runtime.candidates = sorted(self.step_states.states)
        self.runtime.warm_up()  # e.g. the adaptive head's Triton kernel compiles here, not mid-serving

    # -- serving -------------------------------------------------------------------------------------------
    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None):
        self.runtime.safe_begin_batch()  # in-place weight swap, before anything of this batch runs
        if batch.forward_mode.is_extend() or batch.is_extend_in_batch or batch.forward_mode.is_idle():
            out = super().forward_batch_generation(batch, on_publish=on_publish, grammar_barrier=grammar_barrier)
            if not batch.forward_mode.is_idle():
                self._after_prefill(batch, out)
            return out

        plan = self.runtime.safe_plan([req_view(r) for r in batch.reqs])
        self.step_states.activate(plan.steps)
        if batch.spec_info is None:
            hidden_size, hidden_dtype = get_draft_recurrent_hidden_state_spec(self.draft_worker.draft_runner)
            batch.spec_info = EagleDraftInput.create_idle_input(
                device=self.device, hidden_size=hidden_size, dtype=hidden_dtype, topk=self.topk,
                capture_hidden_mode=CaptureHiddenMode.LAST, vocab_size=self.target_worker.model_config.vocab_size,
            )
        if plan.steps == 0:
            verify_input = self._build_trivial_verify_input(batch)
        else:
            with (self.draft_worker.draft_tp_context(self.draft_worker.draft_runner.tp_group),
                  speculative_moe_backend_context(), speculative_moe_a2a_backend_context(),
                  spec_stage_span("draft")):
                verify_input = self._draft(batch, plan)
        assert verify_input.is_verify_input()
        batch.spec_info = verify_input
        batch_output = self.verify(batch, grammar_barrier=grammar_barrier)
        if on_publish is not None:
            on_publish(batch_output.new_seq_lens)
        with (self.draft_worker.draft_tp_context(self.draft_worker.draft_runner.tp_group),
              speculative_moe_backend_context(), speculative_moe_a2a_backend_context(),
              spec_stage_span("draft_extend")):
            self.draft_worker._draft_extend_for_decode(batch, batch_output)
        self._pending = (plan, verify_input.draft_token, batch_output)
        return batch_output

    def _draft(self, batch, plan: StepPlan):
        """The verify input of a planned step: EAGLE's chains with the CPU chains written over their rows."""
        chains = plan.chain_tokens()
        steps, bs = plan.steps, len(chains)
        if plan.uses_static:
            verify_input = self.draft_worker.draft(batch)  # SGLang's EAGLE-3 draft, unchanged
            if any(c is not None for c in chains):
                rows = verify_input.draft_token.view(bs, steps + 1)
                rows[:, 1:] = overlay_chains(rows[:, 1:], chains, steps, self.device, plan.pads(), self.stager)
            return verify_input
        dw = self._draft_worker
        return build_eagle_verify_input(
            batch, batch.spec_info, dw._topk1_parents_prealloc[:bs], dw._topk1_score_indices_prealloc[:bs],
            overlay_chains(None, chains, steps, self.device, plan.pads(), self.stager), None,
            target_worker=self.target_worker, topk=1, num_steps=steps, num_draft_tokens=steps + 1,
            tree_mask_mode=dw.tree_mask_mode, device=self.device,
        )

    def _after_prefill(self, batch, out) -> None:
        try:
            last = TAP.take_prefill()
            done = [i for i, r in enumerate(batch.reqs) if prefill_done(r, batch)]
            if not done:
                return
            hidden = None if last is None or last.shape[0] != len(batch.reqs) else last
            nxt = out.next_token_ids
            if len(done) < len(batch.reqs):  # a chunked request is mid-prompt: keep the others' rows
                idx = torch.tensor(done, device=nxt.device)
                nxt = nxt.index_select(0, idx)
                hidden = None if hidden is None else hidden.index_select(0, idx.to(hidden.device))
            self.runtime.prefilled([req_view(batch.reqs[i]) for i in done], hidden, nxt)
        except Exception:
            self._glue_error("after prefill")

    def on_verify_complete_cpu(self, num_correct_drafts_per_req: list[int], batch_size: int = 0) -> None:
        """Verify-complete hook (accept lengths are on the host): feedback, observations, logs. Never raises."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        plan, draft_token, result = pending
        try:
            stride = plan.steps + 1
            hidden = TAP.verify_hidden(len(plan.rows) * stride)
            self.runtime.complete(plan, [n + 1 for n in num_correct_drafts_per_req], result.next_token_ids.tolist(),
                                  draft_token.tolist(), hidden)
        except Exception:
            self._glue_error("verify complete")

    def _after_switch(self, old: int, new: int) -> None:
        """After each runtime-state switch: count it and keep SGLang's override log from growing."""
        try:
            compact_overrides(get_context()._overrides_log, RESTORE_SOURCE)
            if self.runtime.metrics is not None:
                self.runtime.metrics.state_switches.inc()
        except Exception:
            self._glue_error("state switch")

    def _glue_error(self, where: str) -> None:
        """A failure inside a hook SGLang calls: counted and logged by the runtime's one rule, never raised."""
        self.runtime.failed(where)

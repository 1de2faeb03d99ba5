"""Runs inside a subprocess with SGLang 0.5.17 importable (the .venv/sglang-cpu overlay on PYTHONPATH) and
reports, as JSON, what the plugin tests assert: entry point, ATLAS registration, hooks applied to the real
SGLang classes, server-args parsing/validation, the worker class, adaspec series in SGLang's /metrics.

Usage: python tests/sglang_probe.py WORKDIR  (writes WORKDIR/probe.json). Each check records either its
result or the error text, so one failing check does not hide the others.

The only thing set up outside SGLang: torch 2.13's torchvision wheel on PyPI is CUDA-built, so on CPU torch its
C++ ops do not load and torchvision's import-time fake registrations for `torchvision::nms`/`qnms` fail; the
two op schemas are declared first (no kernels: calling them would fail, and nothing here does).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

WORK = Path(sys.argv[1])
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(WORK / "prom")  # before prometheus_client is imported anywhere
(WORK / "prom").mkdir(parents=True, exist_ok=True)

import torch  # noqa: E402

for _op in ("nms", "qnms"):
    torch.library.define(f"torchvision::{_op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

RESULTS: dict[str, object] = {}


def check(name):
    def deco(fn):
        try:
            RESULTS[name] = {"ok": True, "value": fn()}
        except BaseException as exc:  # record, keep going
            RESULTS[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                             "trace": traceback.format_exc()[-3000:]}
        return fn
    return deco


def write_model_dirs() -> tuple[Path, Path]:
    """A tiny Llama target config and our exported EAGLE-3 head config for it (configs only: parsing server
    args reads config.json, loads no weights)."""
    from transformers import LlamaConfig

    from adaspec.core.heads.eagle3 import Eagle3Config
    from adaspec.core.heads.export_sglang import sglang_config

    target = WORK / "target"
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      architectures=["LlamaForCausalLM"])
    cfg.save_pretrained(target)
    draft = WORK / "draft"
    draft.mkdir(exist_ok=True)
    (draft / "config.json").write_text(json.dumps(sglang_config(Eagle3Config.from_target(cfg))))
    return target, draft


@check("entry_point")
def _entry_point():
    from importlib.metadata import entry_points

    return sorted(f"{e.name}={e.value}" for e in entry_points(group="sglang.srt.plugins"))


@check("registered_before_load")
def _before():
    from sglang.srt.speculative.spec_registry import get_spec

    return get_spec("ATLAS") is not None


@check("load_plugins")
def _load():
    from sglang.srt.plugins import load_plugins

    load_plugins()
    return True


@check("algorithm")
def _algorithm():
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    algo = SpeculativeAlgorithm.from_string("atlas")
    enum_methods = sorted(n for n, v in vars(SpeculativeAlgorithm).items()
                          if callable(v) and not n.startswith("_") and not isinstance(v, classmethod))
    return {
        "class": type(algo).__name__, "name": algo.name, "is_eagle": algo.is_eagle(),
        "is_eagle3": algo.is_eagle3(), "is_speculative": algo.is_speculative(), "need_topk": algo.need_topk(),
        "missing_enum_methods": [n for n in enum_methods if not hasattr(algo, n)],
        "enum_methods": len(enum_methods),
    }


@check("load_again_idempotent")
def _again():
    from sglang.srt.plugins.hook_registry import HookRegistry

    from adaspec.sglang_ext import plugin
    from adaspec.sglang_ext.hooks import LOGITS_FORWARD

    plugin.load()
    return {"hooks_on_logits_forward": len(HookRegistry._hooks[LOGITS_FORWARD]),
            "patched": LOGITS_FORWARD in HookRegistry._patched}


@check("hook_points")
def _hook_points():
    from adaspec.sglang_ext.hooks import check_hook_points

    return check_hook_points()


@check("tap_through_real_logits_processor")
def _tap():
    """The patched LogitsProcessor.forward routes the target's hidden states through the tap."""
    from types import SimpleNamespace

    from sglang.srt.layers.logits_processor import LogitsProcessor
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from adaspec.sglang_ext.hidden_tap import TAP

    owner = object.__new__(LogitsProcessor)
    TAP.bind(owner, 8, 4, torch.float32, "cpu")
    hidden = torch.arange(24, dtype=torch.float32).view(6, 4)
    meta = SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY)
    try:  # the original forward then fails on the bare instance; the tap ran before it
        LogitsProcessor.forward(owner, None, hidden, None, meta)
    except Exception as exc:
        after = type(exc).__name__
    else:
        after = "returned"
    got = TAP.verify_hidden(6)
    return {"copied": bool(torch.equal(got, hidden)), "rows": TAP.verify_rows, "original_then": after,
            "wrapped": hasattr(LogitsProcessor.forward, "__wrapped__")}


def _parse(extra: list[str]):
    from sglang.srt.server_args import prepare_server_args

    target, draft = write_model_dirs()
    return prepare_server_args(["--model-path", str(target), "--device", "cpu", "--speculative-algorithm",
                                "ATLAS", "--speculative-draft-model-path", str(draft), *extra])


@check("server_args")
def _server_args():
    sa = _parse([])
    return {k: getattr(sa, k) for k in ("speculative_algorithm", "speculative_num_steps",
                                        "speculative_num_draft_tokens", "speculative_eagle_topk",
                                        "disable_overlap_schedule", "max_running_requests", "enable_mixed_chunk")}


@check("server_args_lowercase_and_env_steps")
def _lower():
    os.environ["ADASPEC_SGLANG_CANDIDATE_STEPS"] = "0,1,3"
    try:
        from sglang.srt.server_args import prepare_server_args

        target, draft = write_model_dirs()
        sa = prepare_server_args(["--model-path", str(target), "--device", "cpu", "--speculative-algorithm",
                                  "atlas", "--speculative-draft-model-path", str(draft)])
        return [sa.speculative_algorithm, sa.speculative_num_steps, sa.speculative_num_draft_tokens]
    finally:
        del os.environ["ADASPEC_SGLANG_CANDIDATE_STEPS"]


def _rejected(extra: list[str], drop_draft: bool = False) -> str:
    from sglang.srt.server_args import prepare_server_args

    target, draft = write_model_dirs()
    argv = ["--model-path", str(target), "--device", "cpu", "--speculative-algorithm", "ATLAS"]
    if not drop_draft:
        argv += ["--speculative-draft-model-path", str(draft)]
    try:
        prepare_server_args(argv + extra)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


@check("server_args_rejected")
def _rejections():
    return {
        "topk": _rejected(["--speculative-eagle-topk", "4"]),
        "no_draft": _rejected([], drop_draft=True),
        "adaptive": _rejected(["--speculative-adaptive"]),
        "steps": _rejected(["--speculative-num-steps", "3"]),
    }


@check("worker_class")
def _worker():
    from sglang.srt.speculative.eagle_worker_v2 import EAGLEWorkerV2
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    sa = _parse([])
    cls = SpeculativeAlgorithm.from_string(sa.speculative_algorithm).create_worker(sa)
    return {"name": f"{cls.__module__}.{cls.__qualname__}", "eagle_v2": issubclass(cls, EAGLEWorkerV2),
            "overrides": sorted(n for n in ("forward_batch_generation", "on_verify_complete_cpu",
                                            "init_cuda_graphs", "alloc_memory_pool") if n in vars(cls))}


@check("metrics_in_sglang_endpoint")
def _metrics():
    """adaspec series created in this (scheduler-like) process show up on SGLang's own /metrics app."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient
    from sglang.srt.utils.common import add_prometheus_middleware

    from adaspec.core.step import StepRecord
    from adaspec.sglang_ext.metrics import plugin_metrics

    pm, engine = plugin_metrics()
    pm.batch_steps.observe(3)
    pm.static_skipped.inc()
    engine([StepRecord(step=1, request_id="r", tenant="t", drafter="suffix", k=3, drafted=3, accepted=2,
                       emitted=3, confidence=[1.0] * 3, batch_size=1, chunk_tokens=4, draft_s=0.0,
                       verify_s=0.0, prefill=False)])
    app = FastAPI()
    add_prometheus_middleware(app)
    body = TestClient(app).get("/metrics/").text
    return [line for line in body.splitlines() if line.startswith("adaspec_") and not line.startswith("#")]



@check("worker_decode_steps_with_fakes")
def _worker_steps():
    """AtlasWorkerV2's own decode path (the code only a GPU runs end to end) over fake SGLang objects: which
    draft path each plan takes, the chain overlay on EAGLE's verify input, the verify-complete records."""
    import contextlib
    from types import SimpleNamespace

    import adaspec.sglang_ext.worker as wm
    from adaspec.core.drafters.base import Draft, DrafterBase
    from adaspec.core.step import Plan, PolicyBase
    from adaspec.sglang_ext.runtime import AtlasRuntime
    from adaspec.sglang_ext.states import StepStates

    calls = []
    null = lambda *a, **k: contextlib.nullcontext()  # noqa: E731
    wm.speculative_moe_backend_context = wm.speculative_moe_a2a_backend_context = wm.spec_stage_span = null

    def fake_build(batch, draft_input, parents, scores, draft_tokens, probs, **kw):
        calls.append(("chain_verify_input", draft_tokens.tolist(), kw["num_steps"]))
        roots = draft_input.bonus_tokens.view(-1, 1)
        return SimpleNamespace(draft_token=torch.cat([roots, draft_tokens], 1).flatten(), is_verify_input=lambda: True)

    wm.build_eagle_verify_input = fake_build

    class Policy(PolicyBase):
        script = {}
        lam = 1.0

        def plan(self, rows):
            return [self.script.get(r.request_id, Plan(None, 0)) for r in rows]

        def feedback(self, records):
            calls.append(("feedback", [(r.request_id, r.drafter, r.accepted, r.emitted_tokens) for r in records]))

    class Suffix(DrafterBase):
        def start(self, r): pass
        def finish(self, r): pass
        def observe(self, obs): pass
        def propose(self, reqs, ks): return [Draft([70 + i for i in range(k)], [0.5] * k) for k in ks]

    class DraftWorker:
        tree_mask_mode = None
        draft_runner = SimpleNamespace(tp_group=None)
        _topk1_parents_prealloc = torch.zeros(8, 8, dtype=torch.long)
        _topk1_score_indices_prealloc = torch.zeros(8, 8, dtype=torch.long)

        def draft_tp_context(self, group):
            return contextlib.nullcontext()

        def draft(self, batch):  # EAGLE: root then 10, 11, ... per row
            bs, S = len(batch.reqs), worker.speculative_num_steps
            rows = torch.arange(10, 10 + S).repeat(bs, 1)
            calls.append(("eagle_draft", S))
            return SimpleNamespace(draft_token=torch.cat([batch.spec_info.bonus_tokens.view(-1, 1), rows], 1).flatten(),
                                   is_verify_input=lambda: True)

        def _draft_extend_for_decode(self, batch, out):
            calls.append(("draft_extend", len(batch.reqs)))

    policy = Policy()
    worker = object.__new__(wm.AtlasWorkerV2)
    worker._draft_worker = DraftWorker()
    worker._target_worker = SimpleNamespace()
    worker.device = "cpu"
    worker.topk = 1
    worker._pending = None
    worker.runtime = AtlasRuntime(policy, {"suffix": Suffix()}, [0, 2, 4])
    from adaspec.sglang_ext.chain import ChainStager

    worker.stager = ChainStager(2, 4, "cpu")
    applied = []

    def apply(state):
        applied.append(state)
        worker.speculative_num_steps = state
    worker.step_states = StepStates(SimpleNamespace(apply_runtime_state=apply), [0, 2, 4])
    for st in (0, 2, 4):
        worker.step_states.states[st] = st
    worker.step_states.active = worker.speculative_num_steps = 4

    def verify(batch, grammar_barrier=None):  # accepts one draft per request; bonus 99
        S = worker.speculative_num_steps
        toks = batch.spec_info.draft_token.view(len(batch.reqs), S + 1)
        nxt = torch.cat([toks[:, 1:2], torch.full((len(batch.reqs), S), 99)], 1) if S else torch.full((len(batch.reqs), 1), 99)
        calls.append(("verify", batch.spec_info.draft_token.tolist()))
        return SimpleNamespace(new_seq_lens=None, next_token_ids=nxt.flatten(), accept_lens=torch.full((len(batch.reqs),), 2 if S else 1))

    worker.verify = verify
    worker._build_trivial_verify_input = lambda batch: SimpleNamespace(
        draft_token=batch.spec_info.bonus_tokens.clone(), is_verify_input=lambda: True)
    mode = SimpleNamespace(is_extend=lambda: False, is_idle=lambda: False)

    def req(rid):
        return SimpleNamespace(rid=rid, origin_input_ids=[1, 2, 3], output_ids=[5], extra_key=None,
                               sampling_params=SimpleNamespace(max_new_tokens=64))

    out = {}
    for name, script in (("mixed", {"a": Plan("static", 3), "b": Plan("suffix", 2)}),
                         ("chains_only", {"a": Plan("suffix", 1), "b": Plan("suffix", 2)}),
                         ("none", {})):
        calls.clear()
        policy.script = script
        batch = SimpleNamespace(forward_mode=mode, is_extend_in_batch=False, reqs=[req("a"), req("b")],
                                spec_info=SimpleNamespace(bonus_tokens=torch.tensor([5, 5])))
        worker.forward_batch_generation(batch)
        worker.on_verify_complete_cpu([1, 1] if worker.speculative_num_steps else [0, 0], batch_size=2)
        out[name] = {"steps": worker.speculative_num_steps, "calls": calls[:], "errors": sum(worker.runtime.failures.values())}

    # a chunked prefill: the batch's `chunked_req` (still mid-prompt) is not done; the other request is
    from adaspec.sglang_ext.hidden_tap import TAP

    TAP.take_prefill()
    a, b = req("p1"), req("p2")
    extend = SimpleNamespace(reqs=[a, b], chunked_req=b)
    worker._after_prefill(extend, SimpleNamespace(next_token_ids=torch.tensor([7, 8])))
    last = SimpleNamespace(reqs=[b], chunked_req=None)  # its last chunk
    worker._after_prefill(last, SimpleNamespace(next_token_ids=torch.tensor([9])))
    out["prefilled"] = [[r.request_id for r in rows] for rows, _, _ in worker.runtime._prefills]
    out["prefill_done_real_attr"] = wm.prefill_done(a, SimpleNamespace(chunked_req=None))
    return out


@check("state_switch_lines_filtered")
def _quiet():
    """The worker filters SGLang's per-switch INFO line from its real logger, and only that line."""
    import logging

    from adaspec.sglang_ext.worker import quiet_state_switches

    logger = logging.getLogger("sglang.srt.speculative.eagle_worker_v2")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Keep()
    logger.addHandler(h)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        quiet_state_switches()
        quiet_state_switches()  # idempotent
        logger.info("Switch adaptive runtime state: steps 8 -> 2, draft_tokens 9 -> 3")
        logger.info("Built adaptive runtime state steps=2: elapsed=0.10s, mem=0.01GB")
    finally:
        logger.removeHandler(h)
        logger.setLevel(old)
    return {"seen": seen, "filters": len(logger.filters)}

@check("check_image_plugin")
def _check_image():
    """deploy/check_image.py's plugin check (what the image build runs) against the real SGLang 0.5.17."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_image", Path(__file__).resolve().parents[1] / "deploy" / "check_image.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.check_plugin()


(WORK / "probe.json").write_text(json.dumps(RESULTS, indent=1, default=str))

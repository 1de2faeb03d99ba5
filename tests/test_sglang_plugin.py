"""The SGLang plugin against the real sglang 0.5.17 (CPU): entry point, ATLAS registration, hooks on the real
classes, server args, worker class, adaspec series in SGLang's /metrics.

SGLang is imported only in a subprocess (tests/sglang_probe.py) with the .venv/sglang-cpu overlay on
PYTHONPATH (scripts/install_sglang_cpu.sh, run by setup.sh): it pins transformers 5.12.1 and this venv runs
5.23. In this process SGLang is not importable, which is what the clear-error tests use.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from adaspec.sglang_ext.hooks import CALL_SITES, SIGNATURES
from adaspec.sglang_ext.version import SGLANG_VERSION, SGLangUnavailable

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = ROOT / ".venv" / "sglang-cpu"
needs_overlay = pytest.mark.skipif(
    not (OVERLAY / "sglang").is_dir(),
    reason="SGLang 0.5.17 CPU overlay not installed (bash scripts/install_sglang_cpu.sh)",
)


def ok(probe: dict, name: str):
    r = probe[name]
    assert r["ok"], f"{name}: {r['error']}\n{r.get('trace', '')}"
    return r["value"]


@needs_overlay
def test_entry_point_is_discovered(probe):
    assert "adaspec=adaspec.sglang_ext.plugin:load" in ok(probe, "entry_point")


@needs_overlay
def test_load_plugins_registers_atlas_as_eagle3_family(probe):
    assert ok(probe, "registered_before_load") is False  # nothing but the entry point registers it
    assert ok(probe, "load_plugins") is True
    algo = ok(probe, "algorithm")
    assert algo["class"] == "AtlasSpecAlgo" and algo["name"] == "ATLAS"
    assert algo["is_eagle"] and algo["is_eagle3"] and algo["is_speculative"] and algo["need_topk"]
    # every public method of SGLang's SpeculativeAlgorithm (the scheduler calls e.g. create_future_map on
    # any algorithm) exists on ATLAS's spec class
    assert algo["enum_methods"] > 10 and algo["missing_enum_methods"] == []


@needs_overlay
def test_loading_twice_registers_once(probe):
    assert ok(probe, "load_again_idempotent") == {"hooks_on_logits_forward": 1, "patched": True}


@needs_overlay
def test_hook_points_match_real_sglang(probe):
    checked = ok(probe, "hook_points")
    assert "sglang.srt.layers.logits_processor.LogitsProcessor.forward" in checked
    assert any(t.endswith("SchedulerBatchResultProcessor._resolve_spec_v2_tokens") for t in checked)
    assert len(checked) == len(SIGNATURES) + len(CALL_SITES) == 19
    # what the audit fixes rely on: the chunked request on the batch, the switch's log line and override
    assert any(t.endswith("Scheduler._get_new_batch_prefill_raw") for t in checked)
    assert any(t.endswith("RuntimeContext.override") for t in checked)


@needs_overlay
def test_only_the_state_switch_line_is_filtered(probe):
    got = ok(probe, "state_switch_lines_filtered")
    assert got["seen"] == ["Built adaptive runtime state steps=2: elapsed=0.10s, mem=0.01GB"] and got["filters"] == 1


@needs_overlay
def test_hidden_tap_runs_inside_patched_logits_processor(probe):
    tap = ok(probe, "tap_through_real_logits_processor")
    assert tap["wrapped"] and tap["copied"] and tap["rows"] == 6


@needs_overlay
def test_server_args_parse_and_validate(probe):
    sa = ok(probe, "server_args")
    assert sa["speculative_algorithm"] == "ATLAS"
    assert (sa["speculative_num_steps"], sa["speculative_num_draft_tokens"], sa["speculative_eagle_topk"]) == (8, 9, 1)
    assert sa["disable_overlap_schedule"] is True  # CPU drafters need the committed tokens
    assert sa["max_running_requests"] == 48 and sa["enable_mixed_chunk"] is False  # SGLang's EAGLE-family rules
    assert ok(probe, "server_args_lowercase_and_env_steps") == ["ATLAS", 3, 4]


@needs_overlay
def test_server_args_errors_say_how_to_fix(probe):
    rej = ok(probe, "server_args_rejected")
    assert "--speculative-eagle-topk must be 1" in rej["topk"]
    assert "needs --speculative-draft-model-path" in rej["no_draft"] and SGLANG_VERSION in rej["no_draft"]
    assert "ATLAS replaces it" in rej["adaptive"]
    assert "ADASPEC_SGLANG_CANDIDATE_STEPS" in rej["steps"]


@needs_overlay
def test_create_worker_returns_atlas_worker_on_eagle_v2(probe):
    w = ok(probe, "worker_class")
    assert w["name"] == "adaspec.sglang_ext.worker.AtlasWorkerV2" and w["eagle_v2"]
    assert w["overrides"] == ["alloc_memory_pool", "forward_batch_generation", "init_cuda_graphs",
                              "on_verify_complete_cpu"]


@needs_overlay
def test_adaspec_series_on_sglang_metrics_endpoint(probe):
    lines = ok(probe, "metrics_in_sglang_endpoint")
    assert "adaspec_sglang_static_draft_skipped_total 1.0" in lines
    assert 'adaspec_engine_accepted_tokens_total{drafter="suffix"} 2.0' in lines
    assert any(line.startswith("adaspec_sglang_batch_steps_count") and line.endswith(" 1.0") for line in lines)


# -- without SGLang (this process): clear errors naming the version ---------------------------------------------


def test_plugin_load_without_sglang_names_the_version():
    from adaspec.sglang_ext import plugin

    with pytest.raises(SGLangUnavailable, match=f"sglang=={SGLANG_VERSION}.*not installed"):
        plugin.load()


def test_wrong_sglang_version_is_refused(monkeypatch):
    from adaspec.sglang_ext import version

    monkeypatch.setattr(version.metadata, "version", lambda name: "0.5.9")
    with pytest.raises(SGLangUnavailable, match=r"sglang==0\.5\.17; found sglang 0\.5\.9"):
        version.require_sglang()


def test_post_release_is_admitted_only_through_the_hook_check(monkeypatch):
    from adaspec.sglang_ext import hooks, plugin, version

    for found, ok_ in (("0.5.17.post1", True), ("0.5.17+cu130", True), ("0.5.17rc1", False),
                       ("0.5.18", False), ("0.5.17.dev3", False), ("garbage", False)):
        monkeypatch.setattr(version.metadata, "version", lambda name, f=found: f)
        if ok_:
            assert version.require_sglang() == found
        else:
            with pytest.raises(SGLangUnavailable, match="found sglang"):
                version.require_sglang()
    monkeypatch.setattr(version.metadata, "version", lambda name: "0.5.17.post1")
    checked = []
    monkeypatch.setattr(hooks, "check_hook_points", lambda: checked.append(1) or (_ for _ in ()).throw(
        SGLangUnavailable("EAGLEWorkerV2.verify moved")))
    with pytest.raises(SGLangUnavailable, match="moved"):  # refused before anything is registered
        plugin.load()
    assert checked == [1]


def test_worker_import_without_sglang_names_the_version():
    sys.modules.pop("adaspec.sglang_ext.worker", None)
    with pytest.raises(SGLangUnavailable, match=f"sglang=={SGLANG_VERSION}.*EAGLEWorkerV2"):
        import adaspec.sglang_ext.worker  # noqa: F401


@needs_overlay
def test_worker_decode_path_with_fake_sglang_objects(probe):
    """AtlasWorkerV2.forward_batch_generation + on_verify_complete_cpu (the code only a GPU runs end to end)."""
    steps = ok(probe, "worker_decode_steps_with_fakes")
    mixed = steps["mixed"]
    # a static row: EAGLE drafts (4 = smallest state covering k=3); the suffix row is written over its row
    assert mixed["steps"] == 4 and mixed["calls"][0] == ["eagle_draft", 4]
    assert mixed["calls"][1] == ["verify", [5, 10, 11, 12, 13, 5, 70, 71, 71, 71]]
    assert mixed["calls"][2] == ["draft_extend", 2]  # SGLang's draft extend still runs: the head's KV stays warm
    assert mixed["calls"][3] == ["feedback", [["a", "static", 1, [10, 99]], ["b", "suffix", 1, [70, 99]]]]
    chains = steps["chains_only"]
    # no static row: no EAGLE forward, the chain verify input is built directly at steps 2
    assert chains["steps"] == 2 and ["chain_verify_input", [[70, 70], [70, 71]], 2] in chains["calls"]
    assert not any(c[0] == "eagle_draft" for c in chains["calls"])
    none = steps["none"]
    assert none["steps"] == 0 and none["calls"][0] == ["verify", [5, 5]]  # SGLang's trivial one-node verify
    assert all(s["errors"] == 0 for s in steps.values() if isinstance(s, dict))
    # F1: a chunked prefill's request starts drafting after its last chunk, not after every chunk
    assert steps["prefilled"] == [["p1"], ["p2"]] and steps["prefill_done_real_attr"] is True

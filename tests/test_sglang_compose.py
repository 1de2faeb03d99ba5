"""compose.yaml: `docker compose config` when the compose plugin exists, else the Compose Specification schema
(check-jsonschema's vendored copy, .venv/compose-check overlay); plus the structure the stack relies on, read
after Compose's own variable interpolation (`${VAR:-default}`, `$$`) the way `docker compose` resolves it; and
the image's build-time checks and first-start provisioning (deploy/check_image.py, deploy/provision.py)."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
CHECKER = ROOT / ".venv" / "compose-check"
OVERLAY = ROOT / ".venv" / "sglang-cpu"
ENV_8B = ROOT / "deploy" / "llama-3.1-8b.env"
RUNBOOK = ROOT / "docs" / "gpu-runbook.md"
DEMO_MODEL = "smollm2-135m-instruct"
HEAD_8B = "lmsys/sglang-EAGLE3-LLaMA3.1-Instruct-8B"  # SGLang 0.5.17's own EAGLE-3 test head (test_utils.py)


def load(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


# -- Compose's interpolation (compose-spec "Interpolation"): what `docker compose config` prints ----------------------

_TOKEN = re.compile(r"\$(?:(?P<esc>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?$", re.S)


def interpolate(value, env: dict[str, str]):
    """`value` (a loaded compose document or any part of it) with every variable resolved against `env`."""
    if isinstance(value, dict):
        return {interpolate(k, env): interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group("esc"):
            return "$"
        if m.group("named"):
            return env.get(m.group("named"), "")
        b = _BRACED.match(m.group("braced"))
        assert b, f"invalid interpolation ${{{m.group('braced')}}}"
        name, op, arg = b.group("name"), b.group("op"), b.group("arg")
        val = env.get(name)
        if op is None:
            return val or ""
        if op == ":-":
            return val if val else arg
        if op == "-":
            return val if val is not None else arg
        if op in (":?", "?"):
            if (val is None) or (op == ":?" and not val):
                raise KeyError(f"{name}: {arg}")
            return val
        return arg if (val if op == ":+" else val is not None) else ""

    out = _TOKEN.sub(sub, value)
    assert "$" not in _TOKEN.sub("", value), f"a bare `$` Compose would reject: {value!r}"
    return out


def resolved(env: dict[str, str] | None = None) -> dict:
    return interpolate(load(), env or {})


def env_file(path: Path) -> dict[str, str]:
    """A Compose env file (KEY=VALUE lines, # comments)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def mounts(svc: dict) -> dict[str, tuple[str, str]]:
    """target -> (source, mode) of a service's short-syntax volumes (after interpolation)."""
    out = {}
    for v in svc.get("volumes", []):
        parts = v.split(":")
        out[parts[1]] = (parts[0], parts[2] if len(parts) > 2 else "rw")
    return out


def arg(cmd: list[str], flag: str) -> str:
    assert flag in cmd, f"{flag} missing from {cmd}"
    return cmd[cmd.index(flag) + 1]


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


# -- what an image built from a Dockerfile holds where: WORKDIR + COPY ------------------------------------------------

def image_files(dockerfile: Path) -> dict[PurePosixPath, Path]:
    """image path -> the build-context path COPY put there (COPY SRC DEST, DEST relative to WORKDIR)."""
    workdir, out = PurePosixPath("/"), {}
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words or words[0] not in ("WORKDIR", "COPY"):
            continue
        if words[0] == "WORKDIR":
            workdir = workdir / words[1]
        elif not any(w.startswith("--from") for w in words):
            *srcs, dest = [w for w in words[1:] if not w.startswith("--")]
            if len(srcs) > 1 or dest.endswith("/"):  # into a directory, under their own names
                for src in srcs:
                    out[workdir / dest / PurePosixPath(src).name] = ROOT / src
            else:
                out[workdir / dest] = ROOT / srcs[0]
    return out


def in_image(dockerfile: Path, path: str) -> Path | None:
    """The build-context file/dir the image has at `path`, or None when no COPY put anything there."""
    p = PurePosixPath(path)
    for dest, src in image_files(dockerfile).items():
        if p == dest or dest in p.parents:
            return src / p.relative_to(dest)
    return None


def final_workdir(dockerfile: Path) -> PurePosixPath:
    workdir = PurePosixPath("/")
    for line in dockerfile.read_text().splitlines():
        if line.startswith("WORKDIR "):
            workdir = workdir / line.split()[1]
    return workdir


def load_deploy(name: str):
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", ROOT / "deploy" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- the file itself ------------------------------------------------------------------------------------------------

def compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


def schema_check(path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(CHECKER))
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], env=env, capture_output=True, text=True, timeout=120)


def test_compose_validates():
    if compose_plugin():
        for extra in ([], ["--env-file", str(ENV_8B)]):
            proc = subprocess.run(["docker", "compose", "-f", str(COMPOSE), *extra, "--profile", "gpu",
                                   "--profile", "cpu", "config", "-q"], cwd=ROOT, capture_output=True, text=True,
                                  timeout=120)
            assert proc.returncode == 0, proc.stderr
        return
    if not (CHECKER / "check_jsonschema").is_dir():
        pytest.skip("neither the docker compose plugin nor the schema checker overlay (scripts/install_sglang_cpu.sh)")
    proc = schema_check(COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for env in ({}, env_file(ENV_8B)):  # and what Compose resolves it to, with and without the 8B example
        out = ROOT / ".pytest_cache" / "compose-resolved.yaml"
        out.parent.mkdir(exist_ok=True)
        out.write_text(yaml.safe_dump(resolved(env)))
        proc = schema_check(out)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_check_rejects_a_broken_compose(tmp_path):
    if not (CHECKER / "check_jsonschema").is_dir():
        pytest.skip("schema checker overlay not installed (scripts/install_sglang_cpu.sh)")
    doc = load()
    doc["services"]["sglang"]["healthcheck"]["retries"] = "many"
    doc["services"]["sidecar"]["deploy"] = {"resources": {"reservations": {"devices": "all"}}}
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert schema_check(bad).returncode != 0


def test_interpolation_reads_like_compose():
    assert interpolate("${A:-x}/${B-y}/$$1/${C}", {"A": "", "B": ""}) == "x//$1/"
    assert interpolate("${A:-x}", {"A": "a"}) == "a"
    with pytest.raises(AssertionError):
        interpolate("echo $1", {})  # Compose refuses a `$` that is neither `$$` nor a variable
    resolved()  # the whole file interpolates


# -- services, health, ordering ---------------------------------------------------------------------------------------

def test_services_healthchecks_and_gpu_reservation():
    doc = resolved()
    services = doc["services"]
    assert set(services) == {"models", "sglang", "sidecar", "models-cpu", "serve-cpu", "sidecar-cpu", "prometheus",
                             "grafana"}
    for name in ("models", "sglang", "sidecar"):
        assert services[name]["profiles"] == ["gpu"], name
    for name, svc in services.items():
        if svc.get("restart") == "no":  # a one-shot job: done is its only state
            assert "healthcheck" not in svc, name
            continue
        assert svc["healthcheck"]["test"][0] == "CMD", name
    devices = services["sglang"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["sidecar"] and "deploy" not in services["models"]  # both run on the CPU


def test_gpu_server_never_waits_on_the_sidecars_health():
    services = resolved()["services"]
    deps = services["sglang"]["depends_on"]
    assert deps["sidecar"]["condition"] == "service_started"  # LinkGuard covers a sidecar that is down or late
    assert deps["models"]["condition"] == "service_completed_successfully"
    assert services["sidecar"]["depends_on"] == {"models": {"condition": "service_completed_successfully"}}
    assert services["sidecar"]["healthcheck"]["test"][1:4] == ["adaspec", "sidecar", "status"]  # still reported


@pytest.mark.parametrize("name", ["sidecar", "sidecar-cpu"])
def test_sidecar_healthcheck_gives_up_before_compose_does(name):
    """The CLI's own timeout must end well inside Compose's, or a slow answer reads as a killed check."""
    check = resolved()["services"][name]["healthcheck"]
    test = check["test"]
    if "--timeout-ms" in test:
        cli_s = int(arg(test, "--timeout-ms")) / 1000
    else:
        src = (ROOT / "sidecar" / "cli.py").read_text()
        cli_s = int(re.search(r'typer\.Option\(([\d_]+), "--timeout-ms"', src).group(1).replace("_", "")) / 1000
    startup_s = 3.0  # `adaspec sidecar status` imports before it asks (~2.6 s measured on a loaded 2-core box)
    assert cli_s + startup_s <= seconds(check["timeout"]), (cli_s, check["timeout"])


def test_sglang_runs_atlas_from_the_repo_image():
    svc = resolved()["services"]["sglang"]
    dockerfile = ROOT / svc["build"]["dockerfile"]
    text = dockerfile.read_text()
    assert "FROM lmsysorg/sglang:v0.5.17" in text
    for part in ("core", "kernels", "sidecar", "sglang_ext", "pyproject.toml"):
        assert f"COPY {part}" in text or f" {part} " in text
    cmd = svc["command"]
    assert cmd[:3] == ["python3", "-m", "sglang.launch_server"]
    assert arg(cmd, "--speculative-algorithm") == "ATLAS"
    assert "--speculative-draft-model-path" in cmd and "--enable-metrics" in cmd
    # `python3 -m` puts the working directory first on sys.path: adaspec's source tree there would shadow
    # SGLang's own imports (its top-level `kernels` folder vs the `kernels` package SGLang's FA3 loader imports).
    workdir = final_workdir(dockerfile)
    assert not any(dest.parent == workdir and dest.name in ("kernels", "core", "sidecar")
                   for dest in image_files(dockerfile)), workdir
    assert svc.get("working_dir") in (None, str(workdir))


# -- what the GPU server serves: variables, the demo defaults, the shipped head, dtype --------------------------------

def test_gpu_model_head_and_dtype_are_compose_variables():
    raw = load()["services"]["sglang"]["command"]
    raw_text = json.dumps(load())
    for var in ("ADASPEC_SGLANG_MODEL", "ADASPEC_SGLANG_DRAFT_HEAD", "ADASPEC_SGLANG_DTYPE"):
        assert "${" + var + ":-" in raw_text, var
    cmd = resolved({"ADASPEC_SGLANG_MODEL": "/models/m", "ADASPEC_SGLANG_DRAFT_HEAD": "/models/h",
                    "ADASPEC_SGLANG_DTYPE": "float16"})["services"]["sglang"]["command"]
    assert (arg(cmd, "--model-path"), arg(cmd, "--speculative-draft-model-path"), arg(cmd, "--dtype")) == \
        ("/models/m", "/models/h", "float16")
    assert len(cmd) == len(raw)


def test_gpu_default_is_the_demo_model_with_the_head_shipped_in_the_image(tmp_path):
    from adaspec.core.drafters.eagle3 import resolve_static_head

    doc = resolved()
    svc = doc["services"]["sglang"]
    cmd = svc["command"]
    model, head = arg(cmd, "--model-path"), arg(cmd, "--speculative-draft-model-path")
    cache = svc["environment"]["ADASPEC_CACHE_DIR"]
    assert model == f"{cache}/models/{DEMO_MODEL}"  # where `adaspec models fetch` puts it (core/models.model_dir)
    # The head is in the image: a COPY put the repo's shipped head at that path ...
    dockerfile = ROOT / svc["build"]["dockerfile"]
    src = in_image(dockerfile, head)
    assert src is not None, f"no COPY in {dockerfile.name} puts anything at {head}"
    assert (src / "config.json").is_file() and (src / "model.safetensors").is_file()
    # ... and it is the head the package itself resolves for the demo model (no `adaspec train-static` needed) ...
    assert src.resolve() == resolve_static_head(None, tmp_path, DEMO_MODEL).resolve()
    # ... which the wheel carries as package data too (deploy/check_image.py compares the two copies at build).
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pkg = "adaspec.core.heads.pretrained"
    pkg_dir = ROOT / pyproject["tool"]["setuptools"]["package-dir"]["adaspec.core"] / "heads" / "pretrained"
    assert pkg in pyproject["tool"]["setuptools"]["packages"] and src.parent.resolve() == pkg_dir.resolve()
    globs = pyproject["tool"]["setuptools"]["package-data"][pkg]
    for f in ("config.json", "model.safetensors"):
        assert any(fnmatch.fnmatch(f"{src.name}/{f}", g) for g in globs), f
    assert head in (ROOT / "deploy" / "sglang.Dockerfile").read_text()  # the path the build checks
    for name in ("sglang", "sidecar", "models"):  # the sidecar builds the adaptive base from the served model
        assert doc["services"][name]["environment"]["ADASPEC_MODEL"] == model, name


def test_gpu_server_sets_the_dtype_explicitly():
    cmd = resolved()["services"]["sglang"]["command"]
    # SmolLM2's converted config says float32, which SGLang's `auto` would silently serve as float16.
    assert arg(cmd, "--dtype") == "bfloat16"
    assert json.loads((ROOT / "core/heads/pretrained/smollm2-135m-instruct-eagle3/config.json").read_text())[
        "torch_dtype"] == "bfloat16"  # the shipped head's own dtype
    server_args = OVERLAY / "sglang" / "srt" / "server_args.py"
    if server_args.is_file():
        choices = re.search(r'choices=\[("auto", "half"[^\]]*)\]', server_args.read_text()).group(1)
        assert '"bfloat16"' in choices
    assert arg(resolved(env_file(ENV_8B))["services"]["sglang"]["command"], "--dtype") == "bfloat16"


# -- first start: nothing to run on the host ---------------------------------------------------------------------------

def test_gpu_model_is_provisioned_in_a_volume_by_a_one_shot_job():
    doc = resolved()
    job, server, side = (doc["services"][n] for n in ("models", "sglang", "sidecar"))
    assert job["restart"] == "no" and job["image"] == server["image"] == side["image"]
    cache = job["environment"]["ADASPEC_CACHE_DIR"]
    checkpoints = mounts(server)["/var/lib/adaspec"][0]
    assert mounts(job)[cache] == ("adaspec-gpu-cache", "rw")  # the job writes the model ...
    assert mounts(server)[cache] == mounts(side)[cache] == ("adaspec-gpu-cache", "ro")  # ... they only read it
    assert mounts(job)["/var/lib/adaspec"] == (checkpoints, "rw")  # and the adaptive head base
    cmd = job["command"]
    assert cmd[:2] == ["python3", "/opt/adaspec/src/deploy/provision.py"]
    assert cmd[2] == arg(server["command"], "--speculative-draft-model-path")
    assert in_image(ROOT / server["build"]["dockerfile"], cmd[1]) == ROOT / "deploy" / "provision.py"
    for svc in (job, server, side):  # nothing of the host's home is mounted any more
        assert not any(v.startswith(("~", "/home")) for v in svc["volumes"])
    header = COMPOSE.read_text().split("\nname:")[0]  # what it tells a user to run: just `up`
    assert "docker compose --profile gpu up -d" in header
    assert "adaspec train-static" not in header and "adaspec models fetch &&" not in header


def test_provision_keeps_fetches_and_refuses(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    import torch

    prov = load_deploy("provision")
    model, head, state = tmp_path / "model", tmp_path / "head", tmp_path / "state"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 64, "hidden_size": 8}))
    monkeypatch.setenv("ADASPEC_MODEL", str(model))
    monkeypatch.setenv("ADASPEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ADASPEC_SIDECAR_STATE_DIR", str(state))
    assert prov.main([str(head)]) == 1  # no head there
    head.mkdir()
    (head / "config.json").write_text("{}")
    state.mkdir()
    base = state / "base.safetensors"
    for shape, rc in (((64, 8), 0), ((49152, 576), 1)):  # a base for this model is kept, another model's refused
        save_file({"x": torch.zeros(1)}, str(base), metadata={"config": json.dumps(
            {"vocab_size": shape[0], "hidden_size": shape[1]})})
        assert prov.main([str(head)]) == rc, shape
    save_file({"x": torch.zeros(1)}, str(base), metadata={"config": json.dumps({"vocab_size": 64, "hidden_size": 8})})
    fetched = []
    monkeypatch.setattr("adaspec.core.models.fetch", lambda s, **kw: fetched.append(s) or model)
    for demo in (DEMO_MODEL, str(tmp_path / "cache" / "models" / DEMO_MODEL)):  # its name or its place in the cache
        monkeypatch.setenv("ADASPEC_MODEL", demo)
        assert prov.main([str(head)]) == 0
    assert len(fetched) == 2  # the demo model is fetched (faked here); a model of yours is never touched


# -- the 8B example ---------------------------------------------------------------------------------------------------

def test_8b_example_uses_a_public_eagle3_head():
    env = env_file(ENV_8B)
    doc = resolved(env)
    svc = doc["services"]["sglang"]
    cmd = svc["command"]
    model, head = arg(cmd, "--model-path"), arg(cmd, "--speculative-draft-model-path")
    assert model == "/models/Llama-3.1-8B-Instruct" and head == "/models/" + HEAD_8B.split("/")[1]
    assert doc["services"]["sidecar"]["environment"]["ADASPEC_MODEL"] == model
    for name in ("models", "sglang", "sidecar"):
        assert mounts(doc["services"][name])["/models"] == (env["ADASPEC_MODELS_DIR"], "ro"), name
    text = ENV_8B.read_text()
    for needle in ("meta-llama/Llama-3.1-8B-Instruct", HEAD_8B, "-p ", "--env-file deploy/llama-3.1-8b.env"):
        assert needle in text, needle
    test_utils = OVERLAY / "sglang" / "test" / "test_utils.py"
    if test_utils.is_file():  # the pair SGLang 0.5.17 itself tests EAGLE-3 with
        src = test_utils.read_text()
        assert 'DEFAULT_TARGET_MODEL_EAGLE3 = "meta-llama/Llama-3.1-8B-Instruct"' in src
        assert f'DEFAULT_DRAFT_MODEL_EAGLE3 = "{HEAD_8B}"' in src
    for doc_text in (COMPOSE.read_text().split("\nname:")[0], RUNBOOK.read_text()):
        assert "deploy/llama-3.1-8b.env" in doc_text and HEAD_8B in doc_text


# -- the image's build checks ------------------------------------------------------------------------------------------

def test_sglang_dockerfile_installs_only_adaspecs_own_requirements_and_checks_the_image():
    text = (ROOT / "deploy" / "sglang.Dockerfile").read_text()
    run = " ".join(line.strip().rstrip("\\") for line in text.split("\nRUN ", 1)[1].split("\n\n")[0].splitlines())
    steps = [s.strip() for s in run.split("&&")]
    assert ".[sglang]" not in run  # would let pip re-resolve sglang's exact pins on the base image
    want = ["check_image.py snapshot", "pip install --no-cache-dir --no-deps .", "check_image.py requirements",
            "pip install --no-cache-dir -r", "check_image.py verify"]
    at = [next(i for i, s in enumerate(steps) if w in s) for w in want]
    assert at == sorted(at), steps
    # The `sglang` extra is only sglang itself, which the base image carries at the pinned version.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["sglang"]
    assert [re.split(r"[=<>!~ ;\[]", r)[0] for r in extra] == ["sglang"]
    base_version = re.search(r"FROM lmsysorg/sglang:v(\S+)", text).group(1)
    assert extra == [f"sglang=={base_version}"]
    check = (ROOT / "deploy" / "check_image.py").read_text()
    for needle in ('"pip", "check"', "entry_points(group=", "get_spec(", "resolve_static_head(", "require_sglang("):
        assert needle in check, needle
    assert in_image(ROOT / "deploy" / "sglang.Dockerfile", "/opt/adaspec/src/deploy/check_image.py") == \
        ROOT / "deploy" / "check_image.py"


def test_check_image_logic():
    ci = load_deploy("check_image")
    reqs = ["torch>=2.11", 'tomli>=2.0; python_version < "3.0"', 'sglang==0.5.17; extra == "sglang"',
            'pytest>=8; extra == "test"']
    assert ci.own_requirements(reqs) == ["torch>=2.11"]
    versions = {"torch": "2.11.0+cu130", "sglang": "0.5.17"}
    assert ci.unmet(reqs, {"sglang"}, versions.get) == []
    assert ci.unmet(reqs, {"sglang"}, {"torch": "2.10.0"}.get) == ["torch>=2.11 (found 2.10.0)",
                                                                   'sglang==0.5.17; extra == "sglang" (not installed)']
    assert ci.extra_names(reqs, "sglang") == {"sglang"}
    assert ci.new_complaints(["a requires b, which is not installed."],
                             ["a requires b, which is not installed.", "c 1 has requirement d==2, but you have d 3."]) \
        == ["c 1 has requirement d==2, but you have d 3."]
    assert ci.moved({"torch": "2.11.0", "x": "1"}, {"torch": "2.12.0", "x": "2"}, {"torch"}) == ["torch 2.11.0 -> 2.12.0"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = pyproject["dependencies"]
    own = ci.own_requirements(deps + [f'{r}; extra == "{e}"' for e, rs in pyproject["optional-dependencies"].items()
                                      for r in rs])
    assert own == [r for r in deps if "python_version" not in r]  # this Python (3.11+) needs no tomli


@pytest.mark.skipif(not (OVERLAY / "sglang").is_dir(), reason="SGLang 0.5.17 CPU overlay not installed")
def test_check_image_loads_the_plugin_through_its_entry_point(probe):
    """The image build's plugin check, run inside real SGLang 0.5.17 by tests/sglang_probe.py."""
    r = probe["check_image_plugin"]
    assert r["ok"], f"{r['error']}\n{r.get('trace', '')}"
    assert "ATLAS registered" in r["value"] and "sglang 0.5.17" in r["value"]


@pytest.mark.parametrize("name", ["sglang", "cpu"])
def test_build_context_is_only_what_the_dockerfile_copies(name):
    """<Dockerfile>.dockerignore (BuildKit): the context is the COPY sources, not the 3 GB .venv."""
    dockerfile = ROOT / "deploy" / f"{name}.Dockerfile"
    ignore = [line.strip() for line in (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    copied = {str(src.relative_to(ROOT)) for src in image_files(dockerfile).values()}
    assert copied <= allowed, copied - allowed


# -- the rest of the stack --------------------------------------------------------------------------------------------

def test_shared_ipc_and_checkpoint_volumes():
    doc = resolved()
    assert set(doc["volumes"]) == {"adaspec-ipc", "adaspec-checkpoints", "adaspec-cpu-cache", "adaspec-gpu-cache",
                                   "adaspec-models"}
    m = {}
    for name in ("sglang", "sidecar"):
        svc = doc["services"][name]
        m[name] = {src: target for target, (src, _) in mounts(svc).items()}
        assert svc["environment"]["ADASPEC_TRANSPORT_RUN_DIR"] == m[name]["adaspec-ipc"]
    assert m["sglang"]["adaspec-ipc"] == m["sidecar"]["adaspec-ipc"]
    assert m["sglang"]["adaspec-checkpoints"] == m["sidecar"]["adaspec-checkpoints"]
    env = doc["services"]["sglang"]["environment"]
    assert env["ADASPEC_SGLANG_ADAPTIVE_BASE"].startswith(m["sglang"]["adaspec-checkpoints"])
    assert env["ADASPEC_SGLANG_ADAPTIVE_BASE"] == env["ADASPEC_SIDECAR_STATE_DIR"] + "/base.safetensors"
    assert env["ADASPEC_SIDECAR_STATE_DIR"] == doc["services"]["sidecar"]["environment"]["ADASPEC_SIDECAR_STATE_DIR"]
    assert doc["services"]["sidecar"]["command"][:3] == ["adaspec", "sidecar", "serve"]


def test_prometheus_scrapes_sglang_and_sidecar():
    doc = resolved()
    mount = next(v for v in doc["services"]["prometheus"]["volumes"] if v.endswith("prometheus.yml:ro"))
    prom = yaml.safe_load((ROOT / mount.split(":")[0]).read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"sglang:30000", "sidecar:9400", "serve-cpu:8000", "sidecar-cpu:9400"}
    assert "--port" in doc["services"]["sglang"]["command"] and "9400" in doc["services"]["sidecar"]["command"]


def test_grafana_provisions_prometheus_and_the_dashboard():
    svc = resolved()["services"]["grafana"]
    mounts_ = dict(v.rsplit(":", 1)[0].split(":", 1) for v in svc["volumes"])
    assert mounts_["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    prov = ROOT / "deploy/grafana/provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    dash = yaml.safe_load((prov / "dashboards" / "adaspec.yml").read_text())["providers"][0]
    target = mounts_["./deploy/grafana/adaspec-dashboard.json"]
    assert Path(target).parent == Path(dash["options"]["path"])
    board = ROOT / "deploy" / "grafana" / "adaspec-dashboard.json"
    if not board.is_file():
        pytest.skip("deploy/grafana/adaspec-dashboard.json is not in the tree yet (the sidecar issue ships it)")
    assert "adaspec_" in json.dumps(json.loads(board.read_text()))


def test_cpu_profile_serves_the_reference_engine_with_its_sidecar_and_no_gpu():
    doc = resolved()
    serve, side = doc["services"]["serve-cpu"], doc["services"]["sidecar-cpu"]
    assert serve["profiles"] == side["profiles"] == ["cpu"]
    assert "deploy" not in serve and "deploy" not in side  # no device reservation anywhere on this profile
    cmd = serve["command"][-1]
    assert "adaspec serve --host 0.0.0.0 --port 8000" in cmd
    # one fetch, before both services: two fetches into the same volume at once would race
    fetch = doc["services"]["models-cpu"]
    assert fetch["command"] == ["adaspec", "models", "fetch"] and fetch["restart"] == "no"
    assert "models fetch" not in cmd and "models fetch" not in side["command"][-1]
    for svc in (serve, side):
        assert svc["depends_on"]["models-cpu"]["condition"] == "service_completed_successfully"
        assert mounts(svc)["/cache/adaspec"] == mounts(fetch)["/cache/adaspec"]
    assert "sidecar serve" in side["command"][-1] and "--metrics-port 9400" in side["command"][-1]
    # co-located with serve-cpu: the learner's share follows its drafter's earnings (sidecar/budget.py)
    env = side["environment"]
    assert env["ADASPEC_SIDECAR_PRIORITY"] == "idle" and env["ADASPEC_SIDECAR_SHARE_FOLLOWS_EARNINGS"] == "true"
    assert 0 < float(env["ADASPEC_SIDECAR_CPU_SHARE"]) < 1
    ipc = {name: dict(v.split(":")[:2] for v in svc["volumes"])["adaspec-ipc"] for name, svc in
           (("serve", serve), ("side", side))}
    assert ipc["serve"] == ipc["side"] == serve["environment"]["ADASPEC_TRANSPORT_RUN_DIR"]
    assert f"--sidecar-endpoint {ipc['serve']}" in cmd  # the server joins the sidecar's sockets
    assert serve["depends_on"]["sidecar-cpu"]["condition"] == "service_started"  # never waits on its health
    assert serve["ports"] == ["8000:8000"] and serve["healthcheck"]["test"][0] == "CMD"
    text = (ROOT / serve["build"]["dockerfile"]).read_text()
    assert "download.pytorch.org/whl/cpu" in text and "torch==2.13.0" in text and "torch.version.cuda is None" in text

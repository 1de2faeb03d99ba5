"""Durable sidecar state: published versions and trainer checkpoints, each written atomically.

    <state_dir>/versions/v0000000007.safetensors     weights of every published version (+ record in metadata)
    <state_dir>/checkpoints/ckpt-00000012/           trainer.safetensors (weights + AdamW moments),
                                                      buffers.safetensors (replay buffer + held-out split),
                                                      manifest.json (counters, lineage, checksums of all)

Everything is written into a temp name and renamed into place, so a crash (kill -9) leaves either the old
or the new state, never a half-written one; leftovers of an interrupted write are removed at start. A
version file is written *before* the version is broadcast, so a restarted sidecar never reuses a number the
servers already hold. Loading verifies checksums (the files' and the manifest's own); a damaged checkpoint
is skipped for the previous one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from adaspec.core import fsio
from adaspec.core.errors import AdaspecError, ConfigError
from adaspec.core.online.wire import named_tensor, weights_checksum


FORMAT = "adaspec-sidecar-checkpoint/2"  # /2: buffers and a manifest checksum
_LEGACY_FORMATS = ("adaspec-sidecar-checkpoint/1",)  # weights and moments only, manifest unchecked
_VERSION_RE = re.compile(r"^v(\d{10})\.safetensors$")
_CKPT_RE = re.compile(r"^ckpt-(\d{8})$")


class CheckpointError(AdaspecError):
    """A stored file is missing, damaged or from another base."""


@dataclass
class VersionRecord:
    """Why and when a version was published (kept in its file and in the manifest's history)."""

    version: int
    source: str  # "gate" | "rollback" | "operator-rollback" | "reset" | "initial"
    parent: int  # the version that was serving before
    time: float
    reason: str = ""
    candidate_tau: float = 0.0
    serving_tau: float = 0.0
    weights_of: int = 0  # for rollbacks: the version whose weights were re-published


@dataclass
class TrainerState:
    """What a checkpoint restores: trainer weights + AdamW moments, counters, the serving lineage."""

    weights: dict[str, Tensor]
    optimizer: dict[str, dict[str, Tensor]]  # param name -> {"exp_avg", "exp_avg_sq"}
    optimizer_step: int
    updates: int
    trained_tokens: int
    serving_version: int
    history: list[VersionRecord] = field(default_factory=list)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    #: Replay buffers by name ("buffer", "holdout"): (tensors, layout) as `ReplayBuffer.state()` gives them.
    buffers: dict[str, tuple[dict[str, Tensor], dict[str, Any]]] = field(default_factory=dict)
    path: Path | None = None


log = logging.getLogger(__name__)


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own checksum field (D12: a flipped byte in a
    counter or the lineage must not load as a silently different state)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def checksum(tensors: dict[str, Tensor]) -> str:
    """The wire checksum of a set of named tensors (what a WeightUpdate of them would carry)."""
    return weights_checksum([named_tensor(n, t) for n, t in tensors.items()])


class CheckpointStore:
    """Reads and writes versions and checkpoints under one state dir for one base fingerprint."""

    def __init__(self, state_dir: Path, drafter: str, fingerprint: str, keep_checkpoints: int = 3,
                 keep_versions: int = 16) -> None:
        self.root = Path(state_dir)
        self.drafter, self.fingerprint = drafter, fingerprint
        self.keep_checkpoints, self.keep_versions = keep_checkpoints, keep_versions
        self.versions_dir = self.root / "versions"
        self.ckpt_dir = self.root / "checkpoints"
        for d in (self.versions_dir, self.ckpt_dir):
            try:
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
                if not d.is_dir():  # a dangling symlink passes exist_ok
                    raise NotADirectoryError(f"{d} is not a directory")
                for leftover in fsio.leftovers(d):  # an interrupted write
                    fsio.remove(leftover)
            except OSError as exc:  # D14: read-only dir, `versions` a file or a dangling symlink
                raise ConfigError(f"sidecar state dir {self.root} is unusable: {exc}") from None

    # -- versions -------------------------------------------------------------------------------------------
    def version_path(self, version: int) -> Path:
        return self.versions_dir / f"v{version:010d}.safetensors"

    def versions(self) -> list[int]:
        out = []
        for p in self.versions_dir.iterdir():
            m = _VERSION_RE.match(p.name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def save_version(self, record: VersionRecord, weights: dict[str, Tensor]) -> Path:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        meta = {
            "format": FORMAT,
            "drafter": self.drafter,
            "fingerprint": self.fingerprint,
            "record": json.dumps(asdict(record)),
            "checksum": checksum(tensors),
        }
        return fsio.save_safetensors(tensors, self.version_path(record.version), meta, fsync=True)

    def load_version(self, version: int) -> tuple[dict[str, Tensor], VersionRecord]:
        path = self.version_path(version)
        if not path.is_file():
            raise CheckpointError(f"version {version} is not stored (kept: {self.versions()})")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            record = VersionRecord(**json.loads(meta["record"]))
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})"[:400]) from None
        if meta.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"{path}: trained against another head base")
        if checksum(tensors) != meta.get("checksum"):
            raise CheckpointError(f"{path}: checksum mismatch")
        return tensors, record

    def prune_versions(self, protect: set[int]) -> None:
        vs = self.versions()
        for v in vs[: max(0, len(vs) - self.keep_versions)]:
            if v not in protect:
                self.version_path(v).unlink(missing_ok=True)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Checkpoint dirs, newest first."""
        found = [(int(m.group(1)), p) for p in self.ckpt_dir.iterdir() if (m := _CKPT_RE.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: TrainerState) -> Path:
        existing = self.checkpoints()
        seq = (int(_CKPT_RE.match(existing[0].name).group(1)) + 1) if existing else 1  # type: ignore[union-attr]
        final = self.ckpt_dir / f"ckpt-{seq:08d}"
        with fsio.atomic_dir(final, fsync=True, mode=0o700) as tmp:
            tensors = {f"weights.{k}": v.detach().to("cpu").contiguous() for k, v in state.weights.items()}
            for name, moments in state.optimizer.items():
                for m, t in moments.items():
                    tensors[f"opt.{name}.{m}"] = t.detach().to("cpu").contiguous()
            save_file(tensors, str(tmp / "trainer.safetensors"))
            files = {"trainer.safetensors": fsio.sha256_file(tmp / "trainer.safetensors")}
            buffers = {}
            if state.buffers:
                flat = {f"{name}.{k}": v.detach().to("cpu").contiguous()
                        for name, (tensors_, _) in state.buffers.items() for k, v in tensors_.items()}
                save_file(flat, str(tmp / "buffers.safetensors"))
                files["buffers.safetensors"] = fsio.sha256_file(tmp / "buffers.safetensors")
                buffers = {name: layout for name, (_, layout) in state.buffers.items()}
            manifest = {
                "format": FORMAT,
                "created": time.time(),
                "drafter": self.drafter,
                "base_fingerprint": self.fingerprint,
                "updates": state.updates,
                "trained_tokens": state.trained_tokens,
                "optimizer_step": state.optimizer_step,
                "serving_version": state.serving_version,
                "history": [asdict(r) for r in state.history[-256:]],
                "rollbacks": state.rollbacks[-256:],
                "buffers": buffers,
                "files": files,
            }
            manifest["manifest_sha256"] = manifest_checksum(manifest)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        for old in self.checkpoints()[self.keep_checkpoints:]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path) -> TrainerState:
        """One checkpoint, verified; CheckpointError for anything wrong with it (never another exception)."""
        try:
            return self._load(path)
        except CheckpointError:
            raise
        except Exception as exc:  # valid JSON of the wrong shape (a list, files: []), odd tensors, ...
            raise CheckpointError(f"{path}: damaged ({type(exc).__name__}: {exc})"[:400]) from None

    def _load(self, path: Path) -> TrainerState:
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: manifest unreadable ({exc})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
            raise CheckpointError(f"{path}: manifest is not a map with a 'files' map")
        if manifest.get("format") not in (FORMAT, *_LEGACY_FORMATS):
            raise CheckpointError(f"{path}: unknown format {manifest.get('format')!r}")
        if manifest.get("format") == FORMAT and manifest.get("manifest_sha256") != manifest_checksum(manifest):
            raise CheckpointError(f"{path}: manifest checksum mismatch")
        if manifest.get("base_fingerprint") != self.fingerprint:
            raise CheckpointError(f"{path}: trained against another head base")
        trainer = path / "trainer.safetensors"
        if not trainer.is_file() or fsio.sha256_file(trainer) != manifest.get("files", {}).get("trainer.safetensors"):
            raise CheckpointError(f"{path}: trainer.safetensors missing or damaged")
        weights: dict[str, Tensor] = {}
        optimizer: dict[str, dict[str, Tensor]] = {}
        with safe_open(str(trainer), framework="pt") as f:
            for key in f.keys():
                if key.startswith("weights."):
                    weights[key[len("weights."):]] = f.get_tensor(key)
                elif key.startswith("opt."):
                    name, moment = key[len("opt."):].rsplit(".", 1)
                    optimizer.setdefault(name, {})[moment] = f.get_tensor(key)
        buffers: dict[str, tuple[dict[str, Tensor], dict[str, Any]]] = {}
        layouts = manifest.get("buffers") or {}
        if layouts:
            file = path / "buffers.safetensors"
            if not file.is_file() or fsio.sha256_file(file) != manifest["files"].get("buffers.safetensors"):
                raise CheckpointError(f"{path}: buffers.safetensors missing or damaged")
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    name, rest = key.split(".", 1)
                    buffers.setdefault(name, ({}, layouts.get(name, {})))[0][rest] = f.get_tensor(key)
            for name, layout in layouts.items():
                buffers.setdefault(name, ({}, layout))
        return TrainerState(
            weights=weights,
            optimizer=optimizer,
            optimizer_step=int(manifest["optimizer_step"]),
            updates=int(manifest["updates"]),
            trained_tokens=int(manifest["trained_tokens"]),
            serving_version=int(manifest["serving_version"]),
            history=[VersionRecord(**r) for r in manifest.get("history", [])],
            rollbacks=list(manifest.get("rollbacks", [])),
            buffers=buffers,
            path=path,
        )

    def latest(self) -> TrainerState | None:
        """The newest checkpoint that loads and verifies, or None. A damaged one is skipped with a warning
        (D13: silently, a sidecar whose checkpoints were all damaged started from scratch unannounced)."""
        damaged = []
        for path in self.checkpoints():
            try:
                state = self.load(path)
            except CheckpointError as exc:
                log.warning("skipping damaged checkpoint: %s", exc)
                damaged.append(path)
                continue
            if damaged:
                log.warning("resuming from %s; %d newer checkpoint(s) were damaged", path.name, len(damaged))
            return state
        if damaged:
            log.warning("every checkpoint (%d) is damaged: starting from the head base with a fresh optimizer",
                        len(damaged))
        return None


def export_head(path: Path, weights: dict[str, Tensor], config: dict[str, Any], version: int, drafter: str) -> Path:
    """Write serving weights as one safetensors file loadable by the adaptive drafter (`adaptive_head_path`):
    the head's state_dict with its config under metadata key `adaspec_adaptive`."""
    path = Path(path)
    if path.is_dir():
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", drafter)[:64] or "head"
        path = path / f"{safe}-v{version}.safetensors"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    meta = {
        "adaspec_adaptive": json.dumps(config),
        "version": str(version),
        "drafter": drafter,
        "checksum": checksum(tensors),
    }
    return fsio.save_safetensors(tensors, path, meta)

"""Offline bundle: what an air-gapped CUDA host that has torch needs to run `scripts/gpu_validate.sh`.

One file, three commands:

* ``build`` (on a machine with PyPI): the pinned wheels of ``requirements/sglang-gpu-serving.txt`` (``pip
  download``, or taken from ``--wheel-dir``), sglang-kernel rebuilt without FlashAttention-3
  (``sgl_kernel/flash_ops.abi3.so``, 1.1 GB that the triton/flashinfer attention backends never load),
  adaspec's own wheel (it carries the static EAGLE-3 head), the SmolLM2 model dir and ``gpu_validate.sh`` ->
  one tar stream, compressed, split into parts of at most ``--part-mib`` MiB, with ``MANIFEST.json`` (sha256 of
  every part and of every file inside).
* ``unpack`` (on the host): checks every part's sha256 before anything is extracted, extracts (checking every
  file again), installs the wheels with ``pip install --no-index --find-links`` into ``--target DIR`` (then on
  PYTHONPATH) or the current env, then runs ``verify`` there.
* ``verify`` (inside the installed env): imports the serving path with ``sgl_kernel.flash_ops`` blocked, so a
  module that needs FA3 fails here instead of in the middle of a server start.

The module is stdlib-only at import time on purpose: ``build`` copies this very file into the bundle as
``unpack.py``, so the host runs the code that built the bundle, before anything is installed.
"""

from __future__ import annotations

import argparse
import ast
import base64
import csv
import fnmatch
import gzip
import hashlib
import importlib
import importlib.abc
import importlib.util
import io
import json
import lzma
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

FORMAT = "adaspec-offline-bundle/1"
MANIFEST = "MANIFEST.json"
SUMS = "SHA256SUMS"
UNPACKER = "unpack.py"
ARCHIVE_STEM = "adaspec-bundle.tar"
DEFAULT_REQUIREMENTS = "requirements/sglang-gpu-serving.txt"
CHUNK = 1 << 20
MIB = 1 << 20

EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_INTEGRITY = 0, 1, 2, 3

COMPRESSION_SUFFIX = {"gz": ".gz", "xz": ".xz", "none": ""}

#: The serving path of `scripts/gpu_validate.sh` (SGLang 0.5.17, --attention-backend triton or flashinfer):
#: the modules `verify` imports on the host, and where the build's static check starts.
SERVING_MODULES = (
    "sglang.launch_server",
    "sglang.srt.entrypoints.http_server",
    "sglang.srt.entrypoints.engine",
    "sglang.srt.managers.scheduler",
    "sglang.srt.managers.tokenizer_manager",
    "sglang.srt.managers.detokenizer_manager",
    "sglang.srt.model_executor.model_runner",
    "sglang.srt.models.llama",
    "sglang.srt.models.llama_eagle3",
    "sglang.srt.layers.attention.attention_registry",
    "sglang.srt.layers.attention.triton_backend",
    "sglang.srt.layers.attention.flashinfer_backend",
    "sglang.srt.speculative.eagle_worker_v2",
    "sglang.srt.speculative.ngram_worker",
)

#: The default profile: what the host must already have, what to keep from it, what `verify` proves.
GPU_SERVING_PROFILE: dict = {
    "name": "sglang-gpu-serving",
    # sgl_kernel's extensions link against libtorch: they load only into the torch they were built for.
    "host_requires": {"torch": "2.11.0"},
    "torch_cuda_major": "13",
    # Built against one torch: a host torchvision matches the host torch better than PyPI's does.
    "prefer_host": ["torchvision"],
    "serving_entries": list(SERVING_MODULES),
    "verify": {
        "imports": ["torch", "sgl_kernel", "flashinfer", *SERVING_MODULES,
                    "adaspec.sglang_ext.plugin", "adaspec.sglang_ext.worker", "adaspec.sglang_ext.validate",
                    "adaspec.core.cli", "adaspec.sidecar.cli"],
        "checks": ["cuda", "adaspec_plugin", "adaspec_model_and_head"],
    },
}


class BundleError(Exception):
    """A failure with a message for the operator; `code` becomes the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def say(message: str) -> None:
    """Progress and results go to stderr, so stdout stays clean for callers that parse it."""
    print(message, file=sys.stderr, flush=True)


def mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


class Progress:
    """Byte progress for long steps: one updating line on a terminal, a line per 10% in logs and CI."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done = label, max(int(total), 1), 0
        self._tty = sys.stderr.isatty()
        self._shown = -1
        self._t0 = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        pct = min(100, self.done * 100 // self.total)
        step = pct if self._tty else pct // 10 * 10
        if step != self._shown and pct < 100 and self.total >= 16 * MIB:  # small steps: the final line only
            self._shown = step
            end = "\r" if self._tty else "\n"
            print(f"  {self.label}: {mib(self.done)} / {mib(self.total)} ({pct}%)", end=end, file=sys.stderr,
                  flush=True)

    def finish(self) -> None:
        dt = max(time.monotonic() - self._t0, 1e-6)
        print(f"  {self.label}: {mib(self.done)} in {dt:.1f}s ({self.done / MIB / dt:.1f} MiB/s)" + " " * 8,
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- hashing


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """Hex sha256 of a file, read in chunks (parts and wheels are up to GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            if progress is not None:
                progress.advance(len(block))
    return h.hexdigest()


def record_digest(digest: bytes) -> str:
    """A wheel RECORD hash field (PEP 376/427: urlsafe base64 without padding)."""
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class HashingReader:
    """Reads through a file object while hashing, so a file is hashed and archived in one pass."""

    def __init__(self, raw: IO[bytes], progress: Progress | None = None):
        self.raw, self.progress, self.hash, self.size = raw, progress, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        self.size += len(data)
        if self.progress is not None:
            self.progress.advance(len(data))
        return data


# ----------------------------------------------------------------------------------------------------- wheels

_WHEEL_RE = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(?:-(?P<build>\d[^-]*))?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)
_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def canonical_name(name: str) -> str:
    """PEP 503 normalised project name: requirement names and wheel file names compare equal through it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def normalize_version(version: str) -> str:
    """PEP 440 normal form where `packaging` is importable (build side), else the string as written."""
    try:
        from packaging.version import Version

        return str(Version(version))
    except Exception:  # no packaging (a bare host) or not a PEP 440 version
        return version.strip().lower()


@dataclass(frozen=True)
class WheelName:
    """The parts of a wheel file name (PEP 427), with compressed tag sets split."""

    name: str
    version: str
    build: str | None
    py: tuple[str, ...]
    abi: tuple[str, ...]
    plat: tuple[str, ...]

    @classmethod
    def parse(cls, filename: str) -> WheelName | None:
        m = _WHEEL_RE.match(filename)
        if m is None:
            return None
        return cls(m["name"], m["version"], m["build"], tuple(m["py"].split(".")), tuple(m["abi"].split(".")),
                   tuple(m["plat"].split(".")))

    @property
    def key(self) -> str:
        return canonical_name(self.name)

    def filename(self) -> str:
        build = f"-{self.build}" if self.build else ""
        return f"{self.name}-{self.version}{build}-{'.'.join(self.py)}-{'.'.join(self.abi)}-{'.'.join(self.plat)}.whl"

    @property
    def platform_specific(self) -> bool:
        return self.plat != ("any",)

    @property
    def python_specific(self) -> bool:
        """True for wheels built for one CPython minor version (cp312-cp312), not abi3 or pure ones."""
        return any(a.startswith("cp") for a in self.abi)


@dataclass(frozen=True)
class Target:
    """The host the bundle is for: pip downloads for it, and its wheels are matched against it."""

    python: tuple[int, int]
    glibc: tuple[int, int]
    arch: str

    @classmethod
    def parse(cls, python: str, glibc: str, arch: str) -> Target:
        try:
            py = tuple(int(x) for x in python.split("."))
            libc = tuple(int(x) for x in glibc.split("."))
        except ValueError:
            raise BundleError(f"--python-version and --glibc take X.Y, got {python!r} / {glibc!r}") from None
        if len(py) != 2 or len(libc) != 2:
            raise BundleError(f"--python-version and --glibc take X.Y, got {python!r} / {glibc!r}")
        return cls((py[0], py[1]), (libc[0], libc[1]), arch)

    def _platform_ok(self, plat: str) -> bool:
        if plat == "any":
            return True
        if plat == f"linux_{self.arch}":
            return True
        m = re.fullmatch(rf"manylinux_(\d+)_(\d+)_{re.escape(self.arch)}", plat)
        if m:
            return (int(m[1]), int(m[2])) <= self.glibc
        for legacy, libc in _LEGACY_MANYLINUX.items():
            if plat == f"{legacy}_{self.arch}":
                return libc <= self.glibc
        return False

    def _python_abi_ok(self, py: str, abi: str) -> bool:
        major, minor = self.python
        m = re.fullmatch(r"(py|cp)(\d)(\d*)", py)
        if m is None or int(m[2]) != major:
            return False
        kind, tag_minor = m[1], (int(m[3]) if m[3] else None)
        if abi == "none":  # pure: py3 / py37 (and older minors), or cp3X-none for exactly that minor
            return (tag_minor is None or tag_minor <= minor) if kind == "py" else tag_minor == minor
        if abi == "abi3":  # the stable ABI: built for cp3X, loads on every later minor
            return kind == "cp" and tag_minor is not None and tag_minor <= minor
        return kind == "cp" and tag_minor == minor and abi in (f"cp{major}{minor}", f"cp{major}{minor}m")

    def supports(self, wheel: WheelName) -> bool:
        return (any(self._platform_ok(p) for p in wheel.plat)
                and any(self._python_abi_ok(py, abi) for py in wheel.py for abi in wheel.abi))

    def pip_args(self) -> list[str]:
        """`pip download` options selecting wheels for this host (not for the build machine)."""
        major, minor = self.python
        args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", f"{major}.{minor}"]
        for abi in (f"cp{major}{minor}", "abi3", "none"):
            args += ["--abi", abi]
        for libc_minor in range(self.glibc[1], 4, -1):  # manylinux_2_34 ... manylinux_2_5
            args += ["--platform", f"manylinux_{self.glibc[0]}_{libc_minor}_{self.arch}"]
        for legacy, libc in _LEGACY_MANYLINUX.items():
            if libc <= self.glibc:
                args += ["--platform", f"{legacy}_{self.arch}"]
        return args

    def marker_env(self) -> dict[str, str]:
        """PEP 508 marker variables of the host, for the `; python_version < ...` parts of the requirements."""
        py = f"{self.python[0]}.{self.python[1]}"
        return {"python_version": py, "python_full_version": f"{py}.0", "implementation_name": "cpython",
                "implementation_version": f"{py}.0", "platform_python_implementation": "CPython",
                "os_name": "posix", "sys_platform": "linux", "platform_system": "Linux",
                "platform_machine": self.arch, "platform_release": "", "platform_version": "", "extra": ""}

    def as_json(self) -> dict:
        return {"python": f"{self.python[0]}.{self.python[1]}", "glibc": f"{self.glibc[0]}.{self.glibc[1]}",
                "arch": self.arch}


def _dist_info_dir(names: Iterable[str]) -> str:
    """The single top-level `*.dist-info` directory of a wheel (a wheel with none or two is malformed)."""
    dirs = sorted({n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")})
    if len(dirs) != 1:
        raise BundleError(f"expected one .dist-info directory in the wheel, found {dirs or 'none'}")
    return dirs[0]


def read_record(zf: zipfile.ZipFile, dist_info: str) -> dict[str, tuple[str, str]]:
    """RECORD as {path: (hash field, size field)}."""
    try:
        text = zf.read(f"{dist_info}/RECORD").decode("utf-8")
    except KeyError:
        raise BundleError(f"{dist_info}/RECORD is missing") from None
    return {row[0]: (row[1], row[2]) for row in csv.reader(io.StringIO(text)) if row}


def _metadata_version(metadata: str) -> str | None:
    m = re.search(r"^Version:\s*(\S+)\s*$", metadata, re.M)
    return m[1] if m else None


def check_wheel(path: Path) -> list[str]:
    """Everything that makes a wheel invalid for an installer, as messages (empty = valid): the file name, the
    dist-info name and METADATA's Version agree; RECORD lists every member with its real sha256 and size, and
    nothing that is not there."""
    problems: list[str] = []
    name = WheelName.parse(path.name)
    if name is None:
        return [f"{path.name}: not a wheel file name"]
    with zipfile.ZipFile(path) as zf:
        members = [i for i in zf.infolist() if not i.is_dir()]
        try:
            dist_info = _dist_info_dir(i.filename for i in members)
            record = read_record(zf, dist_info)
        except BundleError as exc:
            return [f"{path.name}: {exc}"]
        di_name, _, di_version = dist_info[: -len(".dist-info")].rpartition("-")
        if canonical_name(di_name) != name.key or normalize_version(di_version) != normalize_version(name.version):
            problems.append(f"{dist_info} does not match the file name ({name.name} {name.version})")
        try:
            meta_version = _metadata_version(zf.read(f"{dist_info}/METADATA").decode("utf-8"))
        except KeyError:
            meta_version = None
            problems.append(f"{dist_info}/METADATA is missing")
        if meta_version is not None and normalize_version(meta_version) != normalize_version(name.version):
            problems.append(f"METADATA says Version {meta_version}, the file name {name.version}")
        if f"{dist_info}/WHEEL" not in zf.namelist():
            problems.append(f"{dist_info}/WHEEL is missing")
        unsigned = {f"{dist_info}/RECORD", f"{dist_info}/RECORD.jws", f"{dist_info}/RECORD.p7s"}
        present = {i.filename for i in members}
        for info in members:
            if info.filename in unsigned:
                continue
            if info.filename not in record:
                problems.append(f"{info.filename} is not in RECORD")
                continue
            want_hash, want_size = record[info.filename]
            h = hashlib.sha256()
            with zf.open(info) as f:
                while block := f.read(CHUNK):
                    h.update(block)
            if want_hash != record_digest(h.digest()):
                problems.append(f"{info.filename}: sha256 differs from RECORD")
            if want_size and int(want_size) != info.file_size:
                problems.append(f"{info.filename}: size {info.file_size} differs from RECORD ({want_size})")
        for listed in record:
            if listed not in present:
                problems.append(f"RECORD lists {listed}, which is not in the wheel")
        record_row = record.get(f"{dist_info}/RECORD")
        if record_row is None:
            problems.append("RECORD does not list itself")
        elif record_row != ("", ""):
            problems.append("RECORD's own row must have no hash and no size")
    return [f"{path.name}: {p}" for p in problems]


@dataclass(frozen=True)
class StripRule:
    """Files to drop from one distribution's wheel, and the local version label the rebuilt wheel carries."""

    package: str
    patterns: tuple[str, ...]
    label: str
    reason: str

    def matches(self, member: str) -> bool:
        return any(fnmatch.fnmatchcase(member, p) for p in self.patterns)


FA3_STRIP = StripRule(
    package="sglang-kernel",
    patterns=("sgl_kernel/flash_ops.*",),
    label="nofa3",
    reason="FlashAttention-3 (sgl_kernel.flash_ops): only sgl_kernel.flash_attn loads it, for "
           "--attention-backend fa3; the triton and flashinfer backends never do",
)


@dataclass
class StripResult:
    wheel: Path
    removed: list[dict]
    source: str
    source_sha256: str


def _stripped_version(version: str, label: str) -> str:
    return f"{version}.{label}" if "+" in version else f"{version}+{label}"


def strip_wheel(src: Path, out_dir: Path, rule: StripRule) -> StripResult:
    """Rebuild `src` without the members `rule` matches: a new local version (0.4.5+nofa3, so `pip list` says
    what it is, and `sglang-kernel==0.4.5` / `>=0.4.5` still accept it), the dist-info renamed to match, every
    kept file checked against the original RECORD while copied, a new RECORD, and a provenance file."""
    name = WheelName.parse(src.name)
    if name is None:
        raise BundleError(f"{src}: not a wheel file name")
    new_version = _stripped_version(name.version, rule.label)
    new_name = WheelName(name.name, new_version, name.build, name.py, name.abi, name.plat)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / new_name.filename()
    tmp = out.with_name(out.name + ".partial")
    say(f"rebuilding {src.name} without {', '.join(rule.patterns)}")
    source_sha = sha256_file(src)
    removed: list[dict] = []
    with zipfile.ZipFile(src) as zin:
        members = [i for i in zin.infolist() if not i.is_dir()]
        dist_info = _dist_info_dir(i.filename for i in members)
        record = read_record(zin, dist_info)
        di_name = dist_info[: -len(".dist-info")].rpartition("-")[0]
        new_dist_info = f"{di_name}-{new_version}.dist-info"
        skip = {f"{dist_info}/RECORD", f"{dist_info}/RECORD.jws", f"{dist_info}/RECORD.p7s"}
        kept = [i for i in members if i.filename not in skip and not rule.matches(i.filename)]
        removed = [{"path": i.filename, "size": i.file_size, "record_hash": record.get(i.filename, ("", ""))[0]}
                   for i in members if rule.matches(i.filename)]
        if not removed:
            raise BundleError(f"{src.name} has no member matching {rule.patterns}: its layout changed; "
                              "check what it ships before stripping anything")
        progress = Progress("repack", sum(i.file_size for i in kept))
        rows: list[tuple[str, str, str]] = []
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zout:
            for info in kept:
                arcname = info.filename
                if arcname.startswith(dist_info + "/"):
                    arcname = new_dist_info + arcname[len(dist_info):]
                data_hash = hashlib.sha256()
                new_hash = hashlib.sha256()
                out_info = zipfile.ZipInfo(arcname, date_time=info.date_time)
                out_info.external_attr = info.external_attr
                out_info.compress_type = zipfile.ZIP_DEFLATED
                if info.filename == f"{dist_info}/METADATA":
                    raw = zin.read(info)
                    data_hash.update(raw)
                    text = re.sub(r"^Version:.*$", f"Version: {new_version}", raw.decode("utf-8"), count=1,
                                  flags=re.M)
                    payload = text.encode("utf-8")
                    new_hash.update(payload)
                    zout.writestr(out_info, payload)
                    size = len(payload)
                    progress.advance(info.file_size)
                else:
                    size = 0
                    with zin.open(info) as fin, zout.open(out_info, "w", force_zip64=info.file_size >= 1 << 31) as fout:
                        while block := fin.read(CHUNK):
                            data_hash.update(block)
                            fout.write(block)
                            size += len(block)
                            progress.advance(len(block))
                    new_hash = data_hash
                listed = record.get(info.filename)
                if listed is not None and listed[0] and listed[0] != record_digest(data_hash.digest()):
                    tmp.unlink(missing_ok=True)
                    raise BundleError(f"{src.name}: {info.filename} does not match its RECORD hash "
                                      "(corrupted download?)", EXIT_INTEGRITY)
                rows.append((arcname, record_digest(new_hash.digest()), str(size)))
            note = json.dumps({
                "stripped_by": "adaspec.sglang_ext.bundle", "reason": rule.reason, "source_wheel": src.name,
                "source_sha256": source_sha, "removed": removed,
            }, indent=2).encode("utf-8")
            note_name = f"{new_dist_info}/ADASPEC-STRIPPED.json"
            zout.writestr(zipfile.ZipInfo(note_name, date_time=time.localtime()[:6]), note)
            rows.append((note_name, record_digest(hashlib.sha256(note).digest()), str(len(note))))
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerows(rows)
            writer.writerow((f"{new_dist_info}/RECORD", "", ""))
            zout.writestr(zipfile.ZipInfo(f"{new_dist_info}/RECORD", date_time=time.localtime()[:6]), buf.getvalue())
        progress.finish()
    tmp.replace(out)
    problems = check_wheel(out)
    if problems:
        raise BundleError("the rebuilt wheel is invalid:\n  " + "\n  ".join(problems))
    freed = sum(r["size"] for r in removed)
    say(f"  {out.name}: {mib(out.stat().st_size)} (was {mib(src.stat().st_size)}; {mib(freed)} uncompressed removed)")
    return StripResult(out, removed, src.name, source_sha)


# -------------------------------------------------------------------------------------------- import analysis


@dataclass(frozen=True)
class ImportEdge:
    """One import statement executed when `source` is imported (module level or class body)."""

    source: str
    target: str
    line: int
    guard: str | None  # None: always runs; else why it may not (`if _is_cuda:`, `try/except ImportError`, ...)


@dataclass
class _Module:
    name: str
    is_package: bool
    origin: str
    read: Callable[[], bytes] | None  # None: an extension module (no source)


_EXT_RE = re.compile(r"^(?P<stem>[A-Za-z_][A-Za-z0-9_]*)\.(?:[A-Za-z0-9_-]+\.)?(?:so|pyd)$")


def _module_name(relpath: str) -> tuple[str, bool, bool] | None:
    """(dotted name, is_package, is_extension) of a path inside a wheel or site dir, or None if not a module."""
    parts = relpath.split("/")
    leaf = parts[-1]
    if not all(p.isidentifier() for p in parts[:-1]):
        return None
    if leaf == "__init__.py":
        return (".".join(parts[:-1]), True, False) if len(parts) > 1 else None
    if leaf.endswith(".py") and leaf[:-3].isidentifier():
        return ".".join(parts[:-1] + [leaf[:-3]]), False, False
    m = _EXT_RE.match(leaf)
    if m:
        return ".".join(parts[:-1] + [m["stem"]]), False, True
    return None


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, (ast.Name, ast.Attribute)) and ast.unparse(n).split(".")[-1] in
               ("ImportError", "ModuleNotFoundError", "Exception", "BaseException") for n in names)


def _swallows(handler: ast.ExceptHandler) -> bool:
    """A handler that catches an ImportError and does not re-raise: the guarded import may fail quietly."""
    return _catches_import_error(handler) and not (handler.body and isinstance(handler.body[-1], ast.Raise))


def _is_suppress(item: ast.withitem) -> bool:
    call = item.context_expr
    return isinstance(call, ast.Call) and ast.unparse(call.func).split(".")[-1] == "suppress"


def _literal_import_calls(node: ast.AST) -> Iterator[tuple[str, int]]:
    """`importlib.import_module("x")` / `__import__("x")` with a literal name, outside functions."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if (isinstance(n, ast.Call) and ast.unparse(n.func).split(".")[-1] in ("import_module", "__import__")
                and n.args and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str)):
            yield n.args[0].value, n.lineno
        stack.extend(ast.iter_child_nodes(n))


def module_imports(name: str, source: bytes, is_package: bool) -> list[ImportEdge]:
    """The imports that run when module `name` is imported: module level and class bodies, not functions.
    Each edge says whether it always runs (guard None) or only in a branch (an `if`, a `try` whose handler
    swallows ImportError, `with suppress(...)`, a loop); `if TYPE_CHECKING:` bodies never run."""
    tree = ast.parse(source, filename=name)
    package = name if is_package else name.rpartition(".")[0]
    edges: list[ImportEdge] = []

    def resolve(module: str | None, level: int) -> str:
        if not level:
            return module or ""
        base = package
        for _ in range(level - 1):
            base = base.rpartition(".")[0]
        return f"{base}.{module}" if module else base

    def visit(body: Sequence[ast.stmt], guard: str | None) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.ClassDef):
                visit(node.body, guard)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    edges.append(ImportEdge(name, alias.name, node.lineno, guard))
            elif isinstance(node, ast.ImportFrom):
                base = resolve(node.module, node.level)
                edges.append(ImportEdge(name, base, node.lineno, guard))
                for alias in node.names:
                    if alias.name != "*":
                        edges.append(ImportEdge(name, f"{base}.{alias.name}", node.lineno, guard))
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" in test:
                    visit(node.orelse, guard or f"not ({test}) (line {node.lineno})")
                    continue
                visit(node.body, guard or f"if {test}: (line {node.lineno})")
                visit(node.orelse, guard or f"not ({test}) (line {node.lineno})")
            elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
                swallowed = any(_swallows(h) for h in node.handlers)  # type: ignore[attr-defined]
                inner = guard or (f"try/except ImportError (line {node.lineno})" if swallowed else None)
                visit(node.body, inner)  # type: ignore[attr-defined]
                for handler in node.handlers:  # type: ignore[attr-defined]
                    visit(handler.body, guard or f"except (line {handler.lineno})")
                visit(node.orelse, inner)  # type: ignore[attr-defined]
                visit(node.finalbody, guard)  # type: ignore[attr-defined]
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                suppressed = any(_is_suppress(i) for i in node.items)
                visit(node.body, guard or (f"with suppress(...) (line {node.lineno})" if suppressed else None))
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
                visit(node.body, guard or f"loop (line {node.lineno})")
                visit(node.orelse, guard or f"loop (line {node.lineno})")
            elif type(node).__name__ == "Match":
                for case in node.cases:  # type: ignore[attr-defined]
                    visit(case.body, guard or f"match (line {node.lineno})")
            else:
                for target, line in _literal_import_calls(node):
                    edges.append(ImportEdge(name, target, line, guard))

    visit(tree.body, None)
    return edges


class SourceTree:
    """Python modules by dotted name, read from wheels and site directories -- parsed, never imported, so the
    CPU machine can reason about GPU packages whose extensions it cannot load."""

    def __init__(self) -> None:
        self.modules: dict[str, _Module] = {}
        self._edges: dict[str, list[ImportEdge]] = {}
        self._prefixes: set[str] = set()

    def _add(self, relpath: str, origin: str, read: Callable[[], bytes]) -> None:
        parsed = _module_name(relpath)
        if parsed is None:
            return
        name, is_package, is_ext = parsed
        existing = self.modules.get(name)
        if is_ext and existing is not None and existing.read is not None:
            return  # a source module and an extension of one name: the source is what can be analysed
        self.modules[name] = _Module(name, is_package, origin, None if is_ext else read)
        parts = name.split(".")
        self._prefixes.update(".".join(parts[:i]) for i in range(1, len(parts)))

    def add_wheel(self, path: Path) -> SourceTree:
        zf = zipfile.ZipFile(path)  # kept open by the readers; wheels are read-only inputs
        for info in zf.infolist():
            if not info.is_dir() and ".dist-info/" not in info.filename and ".data/" not in info.filename:
                self._add(info.filename, f"{path.name}:{info.filename}", lambda i=info: zf.read(i))
        return self

    def add_dir(self, root: Path, packages: Sequence[str]) -> SourceTree:
        for package in packages:
            base = root / package
            for file in sorted(base.rglob("*")):
                if file.is_file() and "__pycache__" not in file.parts:
                    rel = file.relative_to(root).as_posix()
                    self._add(rel, str(file), lambda f=file: f.read_bytes())
        return self

    def merge(self, other: SourceTree) -> SourceTree:
        """Add `other`'s modules that this tree lacks (the serving graph plus the rebuilt kernel wheel)."""
        for name, module in other.modules.items():
            if name not in self.modules:
                self.modules[name] = module
                self._prefixes.update(".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1))
        return self

    def has(self, name: str) -> bool:
        return name in self.modules or name in self._prefixes

    def top_packages(self) -> list[str]:
        return sorted({n.split(".")[0] for n in self.modules})

    def edges(self, name: str) -> list[ImportEdge]:
        if name not in self._edges:
            module = self.modules.get(name)
            if module is None or module.read is None:
                self._edges[name] = []
            else:
                try:
                    self._edges[name] = module_imports(name, module.read(), module.is_package)
                except SyntaxError as exc:  # not the interpreter's grammar: say so rather than guess
                    raise BundleError(f"cannot parse {module.origin}: {exc}") from None
        return self._edges[name]

    def reach(self, entries: Iterable[str], required_only: bool) -> dict[str, ImportEdge | None]:
        """Every module of this tree that importing `entries` runs (required_only: on every path, whatever the
        platform; else in some branch), each with the edge that first reached it."""
        reached: dict[str, ImportEdge | None] = {}
        stack: list[tuple[str, ImportEdge | None]] = [(e, None) for e in reversed(list(entries))]
        while stack:
            name, via = stack.pop()
            if name in reached or not self.has(name):
                continue
            reached[name] = via
            parts = name.split(".")
            for i in range(len(parts) - 1, 0, -1):  # importing a.b.c runs a and a.b first
                parent = ".".join(parts[:i])
                if parent not in reached:
                    stack.append((parent, via))
            for edge in reversed(self.edges(name)):
                if edge.target not in reached and not (required_only and edge.guard is not None):
                    stack.append((edge.target, edge))
        return reached


def import_chain(reached: dict[str, ImportEdge | None], module: str) -> list[ImportEdge]:
    """The edges from an entry module to `module`, for messages."""
    chain: list[ImportEdge] = []
    seen: set[str] = set()
    while (edge := reached.get(module)) is not None and module not in seen:
        seen.add(module)
        chain.append(edge)
        module = edge.source
    return list(reversed(chain))


def describe_chain(chain: Sequence[ImportEdge]) -> str:
    if not chain:
        return "(an entry module)"
    hops = [chain[0].source] + [f"{e.target} [line {e.line}{', ' + e.guard if e.guard else ''}]" for e in chain]
    return " -> ".join(hops)


@dataclass
class StripCheck:
    """What the static analysis says about dropping a rule's files from a wheel."""

    stripped_modules: list[str]
    dependents: list[str]  # modules of the wheel that always import a stripped one: they must fail to import
    serving_conditional: list[str] = field(default_factory=list)  # serving imports of them, only under a branch

    def as_json(self) -> dict:
        return {"stripped_modules": self.stripped_modules, "dependents": self.dependents,
                "serving_conditional": self.serving_conditional}


def check_strip_safe(wheel: Path, rule: StripRule, serving: SourceTree | None = None,
                     serving_entries: Sequence[str] = ()) -> StripCheck:
    """Refuse a strip that would break an import: the wheel's own packages must not import the stripped modules
    (or a module that needs them) at import time in any branch, and the serving entry modules must not on any
    path that always runs. Serving imports that only happen in a branch (`if _is_xpu:`) are returned, to print."""
    tree = SourceTree().add_wheel(wheel)
    with zipfile.ZipFile(wheel) as zf:
        stripped = sorted({p[0] for n in zf.namelist() if rule.matches(n) and (p := _module_name(n))})
    if not stripped:
        raise BundleError(f"{wheel.name}: no module matches {rule.patterns}")
    gone = set(stripped)
    dependents = sorted(m for m in tree.modules if m not in gone and tree.modules[m].read is not None
                        and gone & set(tree.reach([m], required_only=True)))
    broken = gone | set(dependents)
    for package in tree.top_packages():
        reached = tree.reach([package], required_only=False)
        for module in sorted(broken & set(reached)):
            raise BundleError(
                f"{wheel.name}: importing {package} imports {module}, which needs the stripped "
                f"{', '.join(stripped)}: {describe_chain(import_chain(reached, module))}. Stripping would break "
                "`import " + package + "`; build with --keep-fa3.")
    conditional: list[str] = []
    if serving is not None and serving_entries:
        serving.merge(tree)  # the serving graph sees the kernel wheel's modules too
        missing = [e for e in serving_entries if not serving.has(e)]
        if missing:
            raise BundleError(f"serving entry modules not found in the bundle's wheels: {missing}")
        always = serving.reach(serving_entries, required_only=True)
        for module in sorted(broken & set(always)):
            raise BundleError(
                f"the serving path always imports {module}, which needs the stripped {', '.join(stripped)}: "
                f"{describe_chain(import_chain(always, module))}. Build with --keep-fa3.")
        anywhere = serving.reach(serving_entries, required_only=False)
        conditional = [describe_chain(import_chain(anywhere, m)) for m in sorted(broken & set(anywhere))]
    return StripCheck(stripped, dependents, conditional)


# ------------------------------------------------------------------------------------------------ requirements


@dataclass(frozen=True)
class Pin:
    """One `name==version [; marker]` line of a requirements file."""

    name: str
    version: str
    marker: str | None
    line: int

    @property
    def key(self) -> str:
        return canonical_name(self.name)


_PIN_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(?P<version>[A-Za-z0-9.!+_-]+)\s*"
                     r"(?:;\s*(?P<marker>.+))?$")


def parse_requirements(path: Path) -> list[Pin]:
    """Exact pins only: the host installs with --no-deps, so a range or an unpinned name would make the bundle
    depend on whatever PyPI had on the build day without saying so."""
    pins: list[Pin] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        m = _PIN_RE.match(line)
        if m is None:
            raise BundleError(f"{path}:{number}: expected `name==version [; marker]`, got {raw.strip()!r}")
        pin = Pin(m["name"], m["version"], m["marker"], number)
        if pin.key in seen:
            raise BundleError(f"{path}:{number}: {pin.name} is already pinned on line {seen[pin.key]}")
        seen[pin.key] = number
        pins.append(pin)
    if not pins:
        raise BundleError(f"{path}: no requirements")
    return pins


def pins_for(pins: Sequence[Pin], target: Target) -> list[Pin]:
    """The pins whose markers hold on the host (evaluated for the host, not for this machine)."""
    if not any(p.marker for p in pins):
        return list(pins)
    try:
        from packaging.markers import Marker
    except ImportError:
        raise BundleError("requirements with markers need the `packaging` module to build") from None
    env = target.marker_env()
    return [p for p in pins if p.marker is None or Marker(p.marker).evaluate(env)]


# ------------------------------------------------------------------------------------------------------ build


@dataclass
class BuildOptions:
    out: Path
    requirements: Path
    repo: Path
    wheel_dir: Path
    download: bool
    target: Target
    adaspec_wheel: Path | None
    build_adaspec: bool
    model_dir: Path | None
    keep_fa3: bool
    profile: dict
    part_bytes: int
    compression: str
    level: int
    force: bool


@dataclass
class BundledWheel:
    path: Path
    name: WheelName
    source: str  # "wheel-dir", "downloaded", "built", "rebuilt without FA3 from <file>"


def find_wheel(wheel_dir: Path, pin: Pin, target: Target) -> Path | None:
    """The first wheel in `wheel_dir` for exactly this pin that installs on the host."""
    if not wheel_dir.is_dir():
        return None
    want = normalize_version(pin.version)
    for path in sorted(wheel_dir.glob("*.whl")):
        name = WheelName.parse(path.name)
        if (name is not None and name.key == pin.key and normalize_version(name.version) == want
                and target.supports(name)):
            return path
    return None


def download_wheels(pins: Sequence[Pin], target: Target, dest: Path) -> None:
    """One `pip download --no-deps` for the host's platform (the list is already closed, nothing to resolve)."""
    dest.mkdir(parents=True, exist_ok=True)
    say(f"downloading {len(pins)} wheel(s) for CPython {target.as_json()['python']} / glibc "
        f"{target.as_json()['glibc']} / {target.arch} into {dest} (pip)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest),
           *target.pip_args(), *(f"{p.name}=={p.version}" for p in pins)]
    if subprocess.run(cmd).returncode != 0:
        raise BundleError("pip download failed (see its output above); offline? pass --wheel-dir with the "
                          "wheels and --skip-download")


def collect_wheels(pins: Sequence[Pin], opts: BuildOptions) -> list[BundledWheel]:
    """Every pinned wheel: from --wheel-dir first, what is missing from PyPI (unless --skip-download)."""
    found = {p.key: find_wheel(opts.wheel_dir, p, opts.target) for p in pins}
    missing = [p for p in pins if found[p.key] is None]
    downloaded: set[str] = set()
    if missing and opts.download:
        download_wheels(missing, opts.target, opts.wheel_dir)
        for p in missing:
            found[p.key] = find_wheel(opts.wheel_dir, p, opts.target)
            downloaded.add(p.key)
    still = [p for p in pins if found[p.key] is None]
    if still:
        hint = "" if opts.download else " (--skip-download: nothing is fetched)"
        raise BundleError(f"no wheel for the host in {opts.wheel_dir} for: "
                          + ", ".join(f"{p.name}=={p.version}" for p in still) + hint)
    wheels = []
    for p in pins:
        path = found[p.key]
        assert path is not None
        name = WheelName.parse(path.name)
        assert name is not None
        wheels.append(BundledWheel(path, name, "downloaded" if p.key in downloaded else "wheel-dir"))
    return wheels


#: Never part of adaspec's wheel, and some are large: not copied into the build dir.
_NOT_SOURCE = (".git", ".venv", ".cache", ".pytest_cache", ".hypothesis", "__pycache__", "*.egg-info", "build",
               "dist", "out", "*.whl")


def build_project_wheel(repo: Path, dest: Path, exclude: Sequence[Path] = ()) -> Path:
    """adaspec's own wheel (`pip wheel --no-deps`) from a copy of the checkout -- an in-tree build would leave
    build/ and egg-info behind in it -- without build isolation when setuptools is here (offline)."""
    if not (repo / "pyproject.toml").is_file():
        raise BundleError(f"{repo} has no pyproject.toml: pass --repo, --adaspec-wheel PATH or --no-adaspec-wheel")
    dest.mkdir(parents=True, exist_ok=True)
    say(f"building adaspec's wheel from {repo}")
    skip = {p.resolve() for p in exclude}
    patterns = shutil.ignore_patterns(*_NOT_SOURCE)

    def ignore(directory: str, names: list[str]) -> set[str]:
        return set(patterns(directory, names)) | {n for n in names if (Path(directory) / n).resolve() in skip}

    source = dest / "src"
    shutil.copytree(repo, source, ignore=ignore, symlinks=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", str(dest)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.append("--no-build-isolation")
    if subprocess.run([*cmd, str(source)]).returncode != 0:
        raise BundleError("building adaspec's wheel failed (see pip's output above)")
    built = sorted(dest.glob("adaspec-*.whl"))
    if not built:
        raise BundleError(f"pip wheel produced no adaspec-*.whl in {dest}")
    return built[-1]


def check_head_in_wheel(wheel: Path, model: str) -> str:
    """The static head must ride in adaspec's wheel (package data of adaspec.core.heads.pretrained), since
    `resolve_static_head` looks there first; a wheel built without it would send the host into train-static."""
    prefix = f"adaspec/core/heads/pretrained/{Path(model).name}-eagle3/"
    with zipfile.ZipFile(wheel) as zf:
        names = {n for n in zf.namelist() if n.startswith(prefix)}
    if prefix + "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise BundleError(f"{wheel.name} has no static head under {prefix} (config.json + *.safetensors); "
                          "is core/heads/pretrained/ complete in the checkout?")
    return prefix


def default_model_dir() -> Path:
    """The provisioned, checksum-verified model of the default settings (what gpu_validate.sh serves)."""
    from adaspec.core.config import Settings
    from adaspec.core.errors import ModelError
    from adaspec.core.models import resolve_model_path

    try:
        return resolve_model_path(Settings())
    except ModelError as exc:
        raise BundleError(f"{exc}\n(or pass --model-dir DIR, or --no-model)") from None


def check_model_dir(path: Path) -> None:
    """A model dir adaspec provisioned is checked against its manifest; any other needs a config.json."""
    if (path / "adaspec-model.json").is_file():
        from adaspec.core.errors import ModelError
        from adaspec.core.models import verify

        try:
            verify(path)
        except ModelError as exc:
            raise BundleError(str(exc)) from None
    elif not (path / "config.json").is_file():
        raise BundleError(f"{path} is not a model directory (no config.json)")


class PartWriter:
    """One byte stream written as numbered part files of at most `part_bytes` each, hashing every part and the
    whole stream as it goes (the archive never exists as one file on disk)."""

    def __init__(self, out_dir: Path, archive_name: str, part_bytes: int):
        self.out_dir, self.archive_name, self.part_bytes = out_dir, archive_name, part_bytes
        self.parts: list[dict] = []
        self.total = hashlib.sha256()
        self.size = 0
        self._file: IO[bytes] | None = None
        self._hash = hashlib.sha256()
        self._written = 0

    def _open_next(self) -> None:
        self._close_part()
        name = f"{self.archive_name}.part-{len(self.parts):03d}"
        self._file = open(self.out_dir / name, "wb")
        self.parts.append({"name": name})
        self._hash, self._written = hashlib.sha256(), 0

    def _close_part(self) -> None:
        if self._file is not None:
            self._file.close()
            self.parts[-1].update(size=self._written, sha256=self._hash.hexdigest())
            self._file = None

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._file is None or self._written == self.part_bytes:
                self._open_next()
            n = min(len(view), self.part_bytes - self._written)
            chunk = view[:n]
            assert self._file is not None
            self._file.write(chunk)
            self._hash.update(chunk)
            self.total.update(chunk)
            self._written += n
            self.size += n
            view = view[n:]
        return len(data)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is None and not self.parts:  # an empty stream still gets one (empty) part
            self._open_next()
        self._close_part()


def _compressor(raw: PartWriter, compression: str, level: int) -> IO[bytes]:
    if compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level, mtime=0)  # type: ignore[arg-type]
    if compression == "xz":
        return lzma.LZMAFile(raw, "wb", preset=level)  # type: ignore[arg-type]
    return raw  # type: ignore[return-value]


def write_archive(entries: Sequence[tuple[str, Path]], out_dir: Path, compression: str, level: int,
                  part_bytes: int) -> tuple[dict, list[dict], list[dict]]:
    """Stream `entries` (archive path, file) into a compressed tar split into parts; returns the archive's
    record, its parts and its files, each with size and sha256 (files hashed in the same read)."""
    archive_name = ARCHIVE_STEM + COMPRESSION_SUFFIX[compression]
    writer = PartWriter(out_dir, archive_name, part_bytes)
    stream = _compressor(writer, compression, level)
    total = sum(path.stat().st_size for _, path in entries)
    say(f"writing {len(entries)} files ({mib(total)}) as {archive_name} in parts of at most {mib(part_bytes)}")
    progress = Progress("archive", total)
    files: list[dict] = []
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for arcname, path in entries:
            st = path.stat()
            info = tarfile.TarInfo(arcname)
            info.size, info.mtime = st.st_size, int(st.st_mtime)
            info.mode = 0o755 if st.st_mode & 0o111 else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(path, "rb") as f:
                reader = HashingReader(f, progress)
                tar.addfile(info, reader)  # type: ignore[arg-type]
            if reader.size != st.st_size:
                raise BundleError(f"{path} changed size while it was archived")
            files.append({"path": arcname, "size": reader.size, "sha256": reader.hash.hexdigest()})
    if stream is not writer:
        stream.close()
    writer.close()
    progress.finish()
    archive = {"name": archive_name, "compression": compression, "size": writer.size,
               "sha256": writer.total.hexdigest()}
    return archive, writer.parts, files


def _unpack_sh() -> str:
    return (
        "#!/bin/sh\n"
        "# Check every part's sha256, extract, pip-install (offline) and verify this bundle: see README.txt.\n"
        "# sh unpack.sh [--dest DIR] [--target DIR | --current-env] [--python PY]; PYTHON=... picks the python.\n"
        "set -eu\n"
        'here=$(cd "$(dirname "$0")" && pwd)\n'
        'exec "${PYTHON:-python3}" "$here/unpack.py" unpack --bundle "$here" "$@"\n'
    )


def _readme(manifest: dict) -> str:
    parts = manifest["parts"]
    wheels = manifest["wheels"]
    host = manifest["profile"].get("host_requires", {})
    lines = [
        "adaspec offline bundle for scripts/gpu_validate.sh (SGLang 0.5.17 + ATLAS), built "
        f"{manifest['created']} for CPython {manifest['target']['python']} / glibc >= {manifest['target']['glibc']}"
        f" / {manifest['target']['arch']}.",
        "",
        f"Files: {len(parts)} part(s) of {manifest['archive']['name']}, MANIFEST.json (sha256 of every part and",
        "every file inside), SHA256SUMS (the same for `sha256sum -c`), unpack.py (the unpacker, Python 3.10+,",
        "stdlib only), unpack.sh.",
        "",
        "The host needs: " + (", ".join(f"{k}=={v}" for k, v in host.items()) or "nothing pre-installed")
        + (f" (CUDA {manifest['profile']['torch_cuda_major']} build)" if manifest["profile"].get("torch_cuda_major")
           else "") + ", pip, a python of the version above.",
        "",
        "  sh unpack.sh --dest ~/adaspec-offline            # check, extract, install into DEST/site, verify",
        "  . ~/adaspec-offline/env.sh && bash ~/adaspec-offline/scripts/gpu_validate.sh",
        "",
        "unpack refuses a missing or corrupted part before extracting anything (exit 3), refuses a host that",
        "lacks the requirements above (exit 2; --skip-host-check), and exits 1 when the import check fails.",
        f"{len(wheels)} wheels: " + ", ".join(f"{w['name']}=={w['version']}" for w in wheels),
    ]
    return "\n".join(lines) + "\n"


def _verify_spec(profile: dict, strip: StripCheck | None, wheels: Sequence[BundledWheel], has_adaspec: bool,
                 has_model: bool) -> dict:
    """What `verify` checks on the host, from the profile plus what this build did: the stripped modules are
    blocked, the modules that always need them must fail, the bundled versions must be the ones imported."""
    spec = dict(profile.get("verify", {}))
    imports = list(spec.get("imports", []))
    checks = list(spec.get("checks", []))
    if not has_adaspec:
        imports = [m for m in imports if not m.startswith("adaspec.")]
        checks = [c for c in checks if not c.startswith("adaspec_")]
    if not has_model:
        checks = [c for c in checks if c != "adaspec_model_and_head"]
    prefer_host = {canonical_name(n) for n in profile.get("prefer_host", [])}
    return {
        "imports": imports,
        "checks": checks,
        "forbidden_modules": strip.stripped_modules if strip else [],
        "expect_import_error": strip.dependents if strip else [],
        "versions": {w.name.key: w.name.version for w in wheels if w.name.key not in prefer_host},
        "prefer_host": sorted(prefer_host),
    }


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise BundleError(f"{out} exists and is not empty (use --force to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _serving_tree(wheels: Sequence[BundledWheel], entries: Sequence[str]) -> SourceTree | None:
    """The bundled wheels that provide the serving entry modules' top-level packages (sglang), as sources."""
    tops = {e.split(".")[0] for e in entries}
    tree = SourceTree()
    for w in wheels:
        with zipfile.ZipFile(w.path) as zf:
            provides = {n.split("/", 1)[0] for n in zf.namelist()}
        if provides & tops:
            tree.add_wheel(w.path)
    return tree if tree.modules else None


def build(opts: BuildOptions) -> dict:
    """Assemble the bundle in opts.out; returns the manifest."""
    t0 = time.monotonic()
    _prepare_out(opts.out, opts.force)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=opts.out))
    try:
        pins = pins_for(parse_requirements(opts.requirements), opts.target)
        wheels = collect_wheels(pins, opts)
        strip_check: StripCheck | None = None
        strip_info: dict | None = None
        if not opts.keep_fa3:
            for i, w in enumerate(wheels):
                if w.name.key != FA3_STRIP.package:
                    continue
                entries = opts.profile.get("serving_entries", [])
                serving = _serving_tree(wheels, entries)
                if serving is None and entries:
                    say(f"note: no bundled wheel provides {sorted({e.split('.')[0] for e in entries})}; "
                        "the serving path is not checked statically")
                say(f"checking that nothing imports {FA3_STRIP.patterns[0]} at import time (static, all branches)")
                strip_check = check_strip_safe(w.path, FA3_STRIP, serving, entries if serving else ())
                for line in strip_check.serving_conditional:
                    say(f"  note: only under a branch: {line}")
                result = strip_wheel(w.path, work, FA3_STRIP)
                wheels[i] = BundledWheel(result.wheel, WheelName.parse(result.wheel.name),  # type: ignore[arg-type]
                                         f"rebuilt without FA3 from {result.source}")
                strip_info = {"rule": FA3_STRIP.reason, "source_wheel": result.source,
                              "source_sha256": result.source_sha256, "removed": result.removed,
                              **strip_check.as_json()}
        if opts.adaspec_wheel is not None or opts.build_adaspec:
            project = opts.adaspec_wheel or build_project_wheel(opts.repo, work / "adaspec", [opts.out, opts.wheel_dir])
            name = WheelName.parse(project.name)
            if name is None:
                raise BundleError(f"{project}: not a wheel file name")
            problems = check_wheel(project)
            if problems:
                raise BundleError("adaspec's wheel is invalid:\n  " + "\n  ".join(problems))
            if "adaspec_model_and_head" in opts.profile.get("verify", {}).get("checks", []):
                check_head_in_wheel(project, opts.model_dir.name if opts.model_dir else "smollm2-135m-instruct")
            wheels.append(BundledWheel(project, name, "built" if opts.adaspec_wheel is None else "given"))
        has_adaspec = any(w.name.key == "adaspec" for w in wheels)

        entries: list[tuple[str, Path]] = [(f"wheels/{w.path.name}", w.path) for w in wheels]
        model: dict | None = None
        if opts.model_dir is not None:
            check_model_dir(opts.model_dir)
            arc_dir = f"cache/models/{opts.model_dir.name}"
            files = sorted(p for p in opts.model_dir.rglob("*") if p.is_file())
            entries += [(f"{arc_dir}/{p.relative_to(opts.model_dir).as_posix()}", p) for p in files]
            model = {"name": opts.model_dir.name, "dir": arc_dir, "source": str(opts.model_dir)}
        validate = opts.repo / "scripts" / "gpu_validate.sh"
        if validate.is_file():
            entries.append(("scripts/gpu_validate.sh", validate))

        archive, parts, files = write_archive(entries, opts.out, opts.compression, opts.level, opts.part_bytes)
        python_specific = any(w.name.python_specific for w in wheels)
        manifest = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "builder": {"python": platform.python_version(), "platform": platform.platform()},
            "target": {**opts.target.as_json(), "python_specific": python_specific,
                       "platform_specific": any(w.name.platform_specific for w in wheels)},
            "profile": {k: v for k, v in opts.profile.items() if k != "verify"},
            "verify": _verify_spec(opts.profile, strip_check, wheels, has_adaspec, model is not None),
            "archive": archive,
            "part_bytes": opts.part_bytes,
            "parts": parts,
            "files": files,
            "wheels": [{"file": w.path.name, "name": w.name.key, "version": w.name.version, "source": w.source,
                        **next({"size": f["size"], "sha256": f["sha256"]} for f in files
                               if f["path"] == f"wheels/{w.path.name}")} for w in wheels],
            "strip": strip_info,
            "model": model,
        }
        (opts.out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.copyfile(Path(__file__), opts.out / UNPACKER)
        (opts.out / "unpack.sh").write_text(_unpack_sh())
        os.chmod(opts.out / "unpack.sh", 0o755)
        (opts.out / "README.txt").write_text(_readme(manifest))
        sums = [(p["sha256"], p["name"]) for p in parts]
        sums += [(sha256_file(opts.out / n), n) for n in (MANIFEST, UNPACKER, "unpack.sh")]
        (opts.out / SUMS).write_text("".join(f"{h}  {n}\n" for h, n in sums))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = sum(p["size"] for p in manifest["parts"])
    say(f"bundle ready: {opts.out} -- {len(parts)} part(s), {mib(total)}, {len(manifest['wheels'])} wheels"
        f"{', model ' + model['name'] if model else ''}; MANIFEST.json sha256 "
        f"{sha256_file(opts.out / MANIFEST)} ({time.monotonic() - t0:.0f}s)")
    return manifest


# ----------------------------------------------------------------------------------------------------- unpack


def load_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} is missing: is {bundle} a bundle directory?", EXIT_INTEGRITY) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is corrupted ({exc}); copy it again", EXIT_INTEGRITY) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a {FORMAT} manifest", EXIT_INTEGRITY)
    lacking = [k for k in ("archive", "parts", "files", "wheels", "target", "profile", "verify") if k not in manifest]
    if lacking:
        raise BundleError(f"{path} lacks {lacking}: corrupted or from another version", EXIT_INTEGRITY)
    return manifest


def check_parts(bundle: Path, manifest: dict) -> list[str]:
    """Every part present, of the right size and sha256 -- all problems at once, so one copy fixes them all."""
    problems: list[str] = []
    total = sum(p["size"] for p in manifest["parts"])
    progress = Progress("sha256 of the parts", total)
    for part in manifest["parts"]:
        path = bundle / part["name"]
        if not path.is_file():
            problems.append(f"{part['name']}: missing")
            continue
        size = path.stat().st_size
        if size != part["size"]:
            problems.append(f"{part['name']}: {size} bytes, the manifest says {part['size']} (truncated copy?)")
            progress.advance(part["size"])
            continue
        if sha256_file(path, progress) != part["sha256"]:
            problems.append(f"{part['name']}: sha256 differs from the manifest (corrupted)")
    progress.finish()
    return problems


class PartReader:
    """The parts read back as one stream, in manifest order."""

    def __init__(self, paths: Sequence[Path]):
        self._paths = list(paths)
        self._file: IO[bytes] | None = None

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            if self._file is None:
                if not self._paths:
                    break
                self._file = open(self._paths.pop(0), "rb")
            block = self._file.read(CHUNK if n < 0 else n - len(out))
            if not block:
                self._file.close()
                self._file = None
                continue
            out += block
        return bytes(out)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _decompressor(raw: PartReader, compression: str) -> IO[bytes]:
    if compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[arg-type]
    if compression == "xz":
        return lzma.LZMAFile(raw, "rb")  # type: ignore[arg-type]
    return raw  # type: ignore[return-value]


def _safe_member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or not path.parts or any(p in ("", "..") for p in path.parts):
        raise BundleError(f"archive member {name!r} escapes the destination; refusing it", EXIT_INTEGRITY)
    return path


def extract(bundle: Path, manifest: dict, dest: Path) -> None:
    """Extract into a staging dir beside `dest`, every file hashed as written and matched to the manifest (only
    regular files, no links, nothing outside), then move it into place: a failed extraction leaves no `dest`."""
    expected = {f["path"]: f for f in manifest["files"]}
    staging = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    progress = Progress("extract", sum(f["size"] for f in manifest["files"]))
    seen: set[str] = set()
    reader = PartReader([bundle / p["name"] for p in manifest["parts"]])
    try:
        stream = _decompressor(reader, manifest["archive"]["compression"])
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                rel = _safe_member_path(member.name)
                if member.isdir():
                    continue
                if not member.isfile():
                    raise BundleError(f"archive member {member.name!r} is not a regular file; refusing it",
                                      EXIT_INTEGRITY)
                want = expected.get(str(rel))
                if want is None:
                    raise BundleError(f"archive member {member.name!r} is not in the manifest", EXIT_INTEGRITY)
                out = staging.joinpath(*rel.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                h = hashlib.sha256()
                with open(out, "wb") as f:
                    while block := src.read(CHUNK):
                        h.update(block)
                        f.write(block)
                        progress.advance(len(block))
                if h.hexdigest() != want["sha256"]:
                    raise BundleError(f"{rel}: sha256 differs from the manifest after extraction", EXIT_INTEGRITY)
                os.chmod(out, member.mode & 0o755 | 0o644)
                seen.add(str(rel))
        while stream.read(CHUNK):  # to the end: gzip/xz check their own trailer CRC there
            pass
        missing = sorted(set(expected) - seen)
        if missing:
            raise BundleError(f"the archive lacks {len(missing)} file(s) of the manifest: {missing[:5]}",
                              EXIT_INTEGRITY)
    except BundleError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise BundleError(f"the archive is unreadable ({type(exc).__name__}: {exc})", EXIT_INTEGRITY) from None
    finally:
        reader.close()
    progress.finish()
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)


_HOST_PROBE = r"""
import json, platform, sys
from importlib import metadata
names = json.loads(sys.argv[1])
info = {"python": list(sys.version_info[:2]), "machine": platform.machine(), "libc": list(platform.libc_ver()),
        "executable": sys.executable, "dists": {}}
try:
    import pip
    info["pip"] = pip.__version__
except Exception:
    info["pip"] = None
for n in names:
    try:
        info["dists"][n] = metadata.version(n)
    except metadata.PackageNotFoundError:
        info["dists"][n] = None
if "torch" in names and info["dists"].get("torch"):
    try:
        import torch
        info["torch_cuda"] = torch.version.cuda
    except Exception as exc:
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(info))
"""


def probe_host(python: str, names: Sequence[str]) -> dict:
    """What the host's python has (version, platform, pip, the named distributions, torch's CUDA)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the host as it is, not an old install
    proc = subprocess.run([python, "-c", _HOST_PROBE, json.dumps(list(names))], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise BundleError(f"cannot run {python}: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def host_problems(manifest: dict, host: dict) -> list[str]:
    """Why this host cannot use the bundle (empty: it can)."""
    target, profile = manifest["target"], manifest["profile"]
    problems = []
    want_py = tuple(int(x) for x in target["python"].split("."))
    if target.get("python_specific") and tuple(host["python"]) != want_py:
        problems.append(f"python {'.'.join(map(str, host['python']))}, the bundle's wheels are for {target['python']}"
                        " (pass --python PY, or rebuild with --python-version)")
    if target.get("platform_specific"):
        if host["machine"] != target["arch"]:
            problems.append(f"machine {host['machine']}, the bundle is for {target['arch']}")
        libc, version = host["libc"]
        want_libc = tuple(int(x) for x in target["glibc"].split("."))
        if libc == "glibc" and version:
            have = tuple(int(x) for x in version.split(".")[:2])
            if have < want_libc:
                problems.append(f"glibc {version}, the bundle's wheels need >= {target['glibc']}")
    if not host.get("pip"):
        problems.append("no pip in this python (python -m ensurepip, or the distribution's python3-pip)")
    for name, version in profile.get("host_requires", {}).items():
        have = host["dists"].get(name)
        if have is None:
            problems.append(f"{name}=={version} is not installed (the bundle does not ship it)")
        elif have.split("+")[0] != version:
            problems.append(f"{name} {have} is installed, the bundle needs {version}")
    cuda_major = profile.get("torch_cuda_major")
    if cuda_major and host["dists"].get("torch"):
        cuda = host.get("torch_cuda")
        if host.get("torch_error"):
            problems.append(f"torch does not import: {host['torch_error']}")
        elif not cuda or cuda.split(".")[0] != cuda_major:
            problems.append(f"torch is built for CUDA {cuda or 'none (CPU build)'}, the bundle's kernels for "
                            f"CUDA {cuda_major}")
    return problems


def install(python: str, dest: Path, manifest: dict, target: Path | None, skip: set[str]) -> None:
    """pip install --no-index --find-links DEST/wheels --no-deps of exactly the bundled versions."""
    wanted = [w for w in manifest["wheels"] if w["name"] not in skip]
    reqs = dest / "install-requirements.txt"
    reqs.write_text("".join(f"{w['name']}=={w['version']}\n" for w in wanted))
    cmd = [python, "-m", "pip", "install", "--isolated", "--no-index", "--find-links", str(dest / "wheels"),
           "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-warn-script-location",
           "-r", str(reqs)]
    if target is not None:
        cmd += ["--target", str(target), "--upgrade"]
    say(f"installing {len(wanted)} wheels {'into ' + str(target) if target else 'into ' + python + ' (current env)'}"
        + (f"; keeping the host's {', '.join(sorted(skip))}" if skip else ""))
    t0 = time.monotonic()
    if subprocess.run(cmd).returncode != 0:
        raise BundleError("pip install failed (see pip's output above)")
    say(f"  installed in {time.monotonic() - t0:.0f}s")


def _env_sh(dest: Path, python: str, target: Path | None, manifest: dict) -> str:
    lines = ["# source me: the environment the bundle installed (written by unpack.py)",
             f"export PYTHON='{python}'"]
    if target is not None:
        lines += [f"export PYTHONPATH='{target}'${{PYTHONPATH:+:$PYTHONPATH}}",
                  f"export PATH='{target}/bin':$PATH"]
    if manifest.get("model"):
        lines.append(f"export ADASPEC_CACHE_DIR='{dest / 'cache'}'")
    return "\n".join(lines) + "\n"


def run_verify(python: str, dest: Path, manifest: dict, target: Path | None, skipped: set[str]) -> int:
    """`verify` in a fresh interpreter that sees the install (PYTHONPATH=target), from DEST/tools/unpack.py (a
    directory holding nothing else, so no stray module shadows an installed one)."""
    spec = dict(manifest["verify"])
    spec["versions"] = {k: v for k, v in spec["versions"].items() if k not in skipped}
    tools = dest / "tools"
    tools.mkdir(exist_ok=True)
    shutil.copyfile(Path(__file__), tools / UNPACKER)
    spec_path = dest / "verify-spec.json"
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    env = dict(os.environ)
    if target is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    if manifest.get("model"):
        env["ADASPEC_CACHE_DIR"] = str(dest / "cache")
    say("verifying the install (imports with the stripped modules blocked)")
    return subprocess.run([python, str(tools / UNPACKER), "verify", "--spec", str(spec_path),
                           "--report", str(dest / "verify-report.json")], env=env, cwd=dest).returncode


def unpack(bundle: Path, dest: Path, target: Path | None, python: str, host_check: bool, verify: bool,
           force: bool) -> int:
    """Check, extract, install, verify; see the module docstring."""
    manifest = load_manifest(bundle)
    say(f"bundle {bundle}: {len(manifest['parts'])} part(s), {len(manifest['wheels'])} wheels, built "
        f"{manifest['created']}; MANIFEST.json sha256 {sha256_file(bundle / MANIFEST)}")
    problems = check_parts(bundle, manifest)
    if problems:
        raise BundleError("refusing to extract anything:\n  " + "\n  ".join(problems)
                          + "\ncopy those parts again from the build machine (their sha256 are in MANIFEST.json "
                            "and SHA256SUMS)", EXIT_INTEGRITY)
    say("all parts match their sha256")
    prefer_host = [canonical_name(n) for n in manifest["verify"].get("prefer_host", [])]
    host_names = sorted(set(manifest["profile"].get("host_requires", {})) | set(prefer_host))
    host = probe_host(python, host_names)
    if host_check:
        issues = host_problems(manifest, host)
        if issues:
            raise BundleError("this host cannot use the bundle:\n  " + "\n  ".join(issues)
                              + "\n(--skip-host-check to go on anyway)")
    skipped = {n for n in prefer_host if host["dists"].get(n)}
    if dest.exists() and any(dest.iterdir()) and not force:
        raise BundleError(f"{dest} exists and is not empty (use --force to replace it)")
    extract(bundle, manifest, dest)
    say(f"extracted into {dest}")
    install(python, dest, manifest, target, skipped)
    (dest / "env.sh").write_text(_env_sh(dest, python, target, manifest))
    if not verify:
        say(f"installed; not verified (--no-verify). Next: . {dest}/env.sh")
        return EXIT_OK
    rc = run_verify(python, dest, manifest, target, skipped)
    if rc != 0:
        say(f"verification FAILED (report: {dest}/verify-report.json)")
        return EXIT_VERIFY
    next_step = f"bash {dest}/scripts/gpu_validate.sh" if (dest / "scripts" / "gpu_validate.sh").is_file() else ""
    say(f"ready. Next: . {dest}/env.sh{' && ' + next_step if next_step else ''}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------- verify


class _Blocker(importlib.abc.MetaPathFinder):
    """Makes the stripped modules unimportable even if a copy is somewhere on sys.path, and records who asked:
    an import that needs them then fails here, by name."""

    def __init__(self, names: Iterable[str]):
        self.names = set(names)
        self.attempts: list[tuple[str, str]] = []

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 (importlib protocol)
        if fullname in self.names:
            self.attempts.append((fullname, _importer()))
            raise ModuleNotFoundError(f"{fullname} is stripped from this bundle", name=fullname)
        return None


def _importer() -> str:
    """The first frame outside importlib and this file: the module that asked for an import."""
    frame = sys._getframe(1)
    here = os.path.abspath(__file__)
    while frame is not None:
        file = frame.f_code.co_filename
        if "importlib" not in file and not file.startswith("<frozen") and os.path.abspath(file) != here:
            return f"{frame.f_globals.get('__name__', '?')}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _check_cuda() -> str:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device (CUDA build {torch.version.cuda})")
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)}"


def _check_adaspec_plugin() -> str:
    from importlib.metadata import entry_points

    found = [e.value for e in entry_points(group="sglang.srt.plugins") if e.value.startswith("adaspec.")]
    if not found:
        raise RuntimeError("no adaspec entry point in group sglang.srt.plugins")
    from sglang.srt.plugins import load_plugins
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    load_plugins()
    SpeculativeAlgorithm.from_string("atlas")
    return f"entry point {found[0]}; --speculative-algorithm ATLAS registered"


def _check_model_and_head() -> str:
    from adaspec.core.config import Settings
    from adaspec.core.drafters.eagle3 import resolve_static_head
    from adaspec.core.models import resolve_model_path

    s = Settings()
    model = resolve_model_path(s)
    head = resolve_static_head(s.static_head_path, s.cache_dir, s.model)
    return f"model {model} (checksums ok), static head {head}"


CHECKS: dict[str, Callable[[], str]] = {
    "cuda": _check_cuda,
    "adaspec_plugin": _check_adaspec_plugin,
    "adaspec_model_and_head": _check_model_and_head,
}


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _check_version(name: str, version: str) -> str:
    """The version importlib.metadata sees first on sys.path: ours, unless something shadows the install."""
    have = _dist_version(name)
    if have is None or normalize_version(have) != normalize_version(version):
        raise RuntimeError(f"{name} {have or 'not installed'} is visible, the bundle installed {version}")
    return version


def _unknown_check(name: str) -> str:
    raise KeyError(f"unknown check {name!r} (known: {sorted(CHECKS)})")


def verify(spec: dict) -> list[dict]:
    """Run in the installed env: bundled versions are the ones visible, `cuda` first, every serving import,
    every module that needs a stripped one fails, then the named checks. Returns one record per check."""
    blocker = _Blocker(spec.get("forbidden_modules", []))
    sys.meta_path.insert(0, blocker)
    results: list[dict] = []

    def record(kind: str, name: str, fn: Callable[[], str | None], expect_import_error: bool = False) -> None:
        before = len(blocker.attempts)
        t0 = time.monotonic()
        try:
            detail = fn()
            ok = not expect_import_error
            if expect_import_error:
                detail = "imported, but it needs a stripped module: is the stripped file still installed?"
        except ImportError as exc:
            cause = exc.__cause__ or exc.__context__
            detail = f"{type(exc).__name__}: {exc}" + (f" (from {type(cause).__name__}: {cause})" if cause else "")
            ok = expect_import_error
            if expect_import_error and len(blocker.attempts) == before:  # failed, but not for the stripped file
                ok = False
                detail = "failed without asking for a stripped module: " + detail
        except BaseException as exc:  # noqa: BLE001 -- a check that crashes is a failed check, reported
            ok = False
            detail = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}"
        asked = blocker.attempts[before:]
        if asked and not ok:
            detail = (detail or "") + "; it asked for " + ", ".join(f"{m} (from {who})" for m, who in asked)
        results.append({"kind": kind, "name": name, "ok": ok, "detail": detail or "",
                        "seconds": round(time.monotonic() - t0, 2)})
        say(f"  {'ok  ' if ok else 'FAIL'} {kind} {name}" + (f": {detail.splitlines()[0]}" if detail else ""))

    for name, version in sorted(spec.get("versions", {}).items()):
        record("version", name, lambda n=name, v=version: _check_version(n, v))
    checks = list(spec.get("checks", []))
    if "cuda" in checks:
        record("check", "cuda", CHECKS["cuda"])
        checks.remove("cuda")
    for module in spec.get("imports", []):
        record("import", module, lambda m=module: (importlib.import_module(m), None)[1])
    for module in spec.get("expect_import_error", []):
        record("needs-stripped", module, lambda m=module: (importlib.import_module(m), None)[1],
               expect_import_error=True)
    for name in checks:
        record("check", name, CHECKS.get(name) or (lambda n=name: _unknown_check(n)))
    for module in spec.get("forbidden_modules", []):
        askers = sorted({who for m, who in blocker.attempts if m == module})
        loaded = module in sys.modules
        results.append({"kind": "stripped", "name": module, "ok": not loaded,
                        "detail": ("never requested" if not askers else
                                   "requested (and refused) by " + ", ".join(askers)) +
                                  ("; LOADED" if loaded else "")})
        say(f"  {'ok  ' if not loaded else 'FAIL'} stripped {module}: {results[-1]['detail']}")
    sys.meta_path.remove(blocker)
    return results


# -------------------------------------------------------------------------------------------------------- CLI


def _default_wheel_dir() -> Path:
    base = os.environ.get("ADASPEC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "adaspec")
    return Path(base) / "bundle-wheels"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adaspec.sglang_ext.bundle", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="assemble the bundle (on a machine with PyPI, or from --wheel-dir)")
    b.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    b.add_argument("--repo", type=Path, default=Path.cwd(), help="adaspec checkout (default: the current dir)")
    b.add_argument("--requirements", type=Path, help=f"pinned list (default: REPO/{DEFAULT_REQUIREMENTS})")
    b.add_argument("--wheel-dir", type=Path, default=None,
                   help="wheels to use before downloading; downloads land here too "
                        "(default: $ADASPEC_CACHE_DIR/bundle-wheels)")
    b.add_argument("--skip-download", action="store_true", help="never run pip download: --wheel-dir has them all")
    b.add_argument("--python-version", default="3.12", help="the host's CPython X.Y (default 3.12, as pinned)")
    b.add_argument("--glibc", default="2.34", help="the host's glibc X.Y, at least (default 2.34: sglang's wheels)")
    b.add_argument("--arch", default="x86_64")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--adaspec-wheel", type=Path, help="use this adaspec wheel instead of building one")
    g.add_argument("--no-adaspec-wheel", action="store_true", help="leave adaspec out")
    m = b.add_mutually_exclusive_group()
    m.add_argument("--model-dir", type=Path, help="model dir to ship (default: the provisioned SmolLM2 dir)")
    m.add_argument("--no-model", action="store_true", help="leave the model out")
    b.add_argument("--keep-fa3", action="store_true",
                   help="ship sglang-kernel as is, with the 1.1 GB FlashAttention-3 library (--attention-backend fa3)")
    b.add_argument("--profile", type=Path, help="JSON profile replacing the GPU serving one (host requirements, "
                                               "serving entries, what verify checks)")
    b.add_argument("--part-mib", type=int, default=1024, help="largest part, in MiB (default 1024)")
    b.add_argument("--compression", choices=sorted(COMPRESSION_SUFFIX), default="gz")
    b.add_argument("--level", type=int, default=None, help="compression level (default: gz 1, xz 3: the wheels "
                                                           "are compressed already, only the model gains)")
    b.add_argument("--force", action="store_true", help="replace a non-empty --out")

    u = sub.add_parser("unpack", help="check every part, extract, install offline, verify (on the host)")
    u.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parent,
                   help="bundle directory (default: where this file is)")
    u.add_argument("--dest", type=Path, default=Path("adaspec-offline"),
                   help="where to extract (default ./adaspec-offline)")
    t = u.add_mutually_exclusive_group()
    t.add_argument("--target", type=Path,
                   help="pip --target dir, put on PYTHONPATH by DEST/env.sh (default DEST/site)")
    t.add_argument("--current-env", action="store_true", help="install into --python's own environment instead")
    u.add_argument("--python", default=sys.executable, help="the interpreter to install for (default: this one)")
    u.add_argument("--skip-host-check", action="store_true",
                   help="install even if the host lacks what the bundle needs")
    u.add_argument("--no-verify", action="store_true", help="skip the import verification")
    u.add_argument("--force", action="store_true", help="replace a non-empty --dest")

    v = sub.add_parser("verify",
                       help="(in the installed env) import the serving path with the stripped modules blocked")
    v.add_argument("--spec", type=Path, required=True, help="verify-spec.json written by unpack")
    v.add_argument("--report", type=Path, help="write the results here as JSON")

    c = sub.add_parser("check-wheel", help="validate wheels' RECORD, names and versions")
    c.add_argument("wheels", type=Path, nargs="+")

    s = sub.add_parser("strip-wheel", help="rebuild sglang-kernel without FlashAttention-3")
    s.add_argument("wheel", type=Path)
    s.add_argument("--out", type=Path, required=True, help="directory for the rebuilt wheel")
    return parser


def _load_profile(path: Path | None) -> dict:
    if path is None:
        return json.loads(json.dumps(GPU_SERVING_PROFILE))
    try:
        profile = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"--profile {path}: {exc}") from None
    if not isinstance(profile, dict):
        raise BundleError(f"--profile {path}: expected a JSON object")
    return profile


def _build_options(args: argparse.Namespace) -> BuildOptions:
    if args.part_mib < 1:
        raise BundleError("--part-mib must be at least 1")
    repo = args.repo.resolve()
    level = args.level if args.level is not None else {"gz": 1, "xz": 3, "none": 0}[args.compression]
    if args.no_model:
        model_dir = None
    else:
        model_dir = args.model_dir.resolve() if args.model_dir else default_model_dir()
    return BuildOptions(
        out=args.out.resolve(),
        requirements=(args.requirements or repo / DEFAULT_REQUIREMENTS).resolve(),
        repo=repo,
        wheel_dir=(args.wheel_dir or _default_wheel_dir()).resolve(),
        download=not args.skip_download,
        target=Target.parse(args.python_version, args.glibc, args.arch),
        adaspec_wheel=args.adaspec_wheel.resolve() if args.adaspec_wheel else None,
        build_adaspec=not args.no_adaspec_wheel and args.adaspec_wheel is None,
        model_dir=model_dir,
        keep_fa3=args.keep_fa3,
        profile=_load_profile(args.profile),
        part_bytes=args.part_mib * MIB,
        compression=args.compression,
        level=level,
        force=args.force,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            build(_build_options(args))
            return EXIT_OK
        if args.command == "unpack":
            dest = args.dest.resolve()
            target = None if args.current_env else (args.target or dest / "site").resolve()
            return unpack(args.bundle.resolve(), dest, target, args.python, not args.skip_host_check,
                          not args.no_verify, args.force)
        if args.command == "verify":
            results = verify(json.loads(args.spec.read_text()))
            if args.report:
                args.report.write_text(json.dumps(results, indent=2) + "\n")
            failed = [r for r in results if not r["ok"]]
            say(f"verify: {len(results) - len(failed)} ok, {len(failed)} failed")
            return EXIT_VERIFY if failed else EXIT_OK
        if args.command == "check-wheel":
            problems = [p for w in args.wheels for p in check_wheel(w)]
            for p in problems:
                say(p)
            say(f"{len(args.wheels)} wheel(s): {'invalid' if problems else 'valid'}")
            return EXIT_VERIFY if problems else EXIT_OK
        if args.command == "strip-wheel":
            check = check_strip_safe(args.wheel, FA3_STRIP)
            say(f"stripped modules {check.stripped_modules}; modules that need them: {check.dependents}")
            strip_wheel(args.wheel, args.out, FA3_STRIP)
            return EXIT_OK
    except BundleError as exc:
        say(f"error: {exc}")
        return exc.code
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

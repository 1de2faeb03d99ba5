"""Build-time checks of the SGLang image (deploy/sglang.Dockerfile): an image that would fail at its first
request fails `docker compose build` instead. Needs the standard library and `packaging` (SGLang requires it).

  check_image.py snapshot FILE      before adaspec is installed: every distribution's version and `pip check`'s
                                    complaints about the base image, into FILE
  check_image.py requirements       adaspec's own requirements ([project].dependencies: no extras), one a line,
                                    for `pip install -r` after `pip install --no-deps .`
  check_image.py verify FILE HEAD   after: see `verify`
  check_image.py plugin             only the entry-point check (also part of verify)

Why not a bare `pip check`: the official SGLang images do not pass it by themselves -- they carry packages whose
requirements they do not install (`pip check` on lmsysorg/sglang's 0.5.14 runtime image lists openai/anthropic
without `distro`, msal/google-auth without `cryptography`, nixl without nixl-cu12: sgl-project/sglang#29743).
So the build fails on what installing adaspec added to `pip check`, plus the checks `pip check` does not make.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DIST = "adaspec"
EXTRA = "sglang"  # the extra the base image satisfies: checked here, never installed by pip
ENTRY_POINT = ("sglang.srt.plugins", "adaspec", "adaspec.sglang_ext.plugin:load")
HEAD_FILES = ("config.json", "model.safetensors")


# -- pure helpers (unit-tested on any machine) --------------------------------------------------------------------

def _applies(req: Requirement, extra: str) -> bool:
    return req.marker is None or req.marker.evaluate({"extra": extra})


def own_requirements(requires: Iterable[str]) -> list[str]:
    """The requirements that apply with no extra selected, on this interpreter (as written)."""
    return [line for line in requires if _applies(Requirement(line), "")]


def extra_names(requires: Iterable[str], extra: str) -> set[str]:
    """Names only `extra` adds."""
    out = set()
    for line in requires:
        req = Requirement(line)
        if _applies(req, extra) and not _applies(req, ""):
            out.add(canonicalize_name(req.name))
    return out


def unmet(requires: Iterable[str], extras: set[str], version_of: Callable[[str], str | None]) -> list[str]:
    """Each requirement (base, or of one of `extras`) the installed versions do not satisfy, with why."""
    out = []
    for line in requires:
        req = Requirement(line)
        if not any(_applies(req, e) for e in ("", *sorted(extras))):
            continue
        have = version_of(canonicalize_name(req.name))
        if have is None:
            out.append(f"{line} (not installed)")
        elif not req.specifier.contains(have, prereleases=True):
            out.append(f"{line} (found {have})")
    return out


def new_complaints(before: Iterable[str], after: Iterable[str]) -> list[str]:
    seen = set(before)
    return [line for line in after if line not in seen]


def moved(before: dict[str, str], after: dict[str, str], protected: set[str]) -> list[str]:
    return [f"{n} {before[n]} -> {after.get(n, 'removed')}" for n in sorted(protected)
            if n in before and after.get(n) != before[n]]


# -- what is installed ----------------------------------------------------------------------------------------------

def installed() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(canonicalize_name(name), dist.version)
    return out


def pip_check() -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    return [line.strip() for line in proc.stdout.splitlines()
            if line.strip() and not line.startswith("No broken requirements")]


def exact_pins(dist: str) -> set[str]:
    """What `dist` pins with `==` (its base requirements on this interpreter): pip must never move those."""
    try:
        requires = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return set()
    out = set()
    for line in own_requirements(requires):
        req = Requirement(line)
        if any(spec.operator in ("==", "===") for spec in req.specifier):
            out.add(canonicalize_name(req.name))
    return out


# -- the checks -----------------------------------------------------------------------------------------------------

def check_plugin() -> str:
    """SGLang finds adaspec's entry point, loading it passes the plugin's own version gate and registers ATLAS."""
    group, name, value = ENTRY_POINT
    eps = [ep for ep in metadata.entry_points(group=group) if ep.name == name]
    if [ep.value for ep in eps] != [value]:
        raise SystemExit(f"entry point {group}:{name} is {[ep.value for ep in eps]}, expected [{value!r}]")
    eps[0].load()()  # adaspec.sglang_ext.plugin.load: require_sglang(), register ATLAS and the hooks
    from adaspec.sglang_ext.spec import NAME
    from adaspec.sglang_ext.version import require_sglang
    from sglang.srt.speculative.spec_registry import get_spec

    if get_spec(NAME) is None:
        raise SystemExit(f"the plugin loaded but --speculative-algorithm {NAME} is not registered")
    return f"plugin ok: {group}:{name} = {value}, sglang {require_sglang()}, {NAME} registered"


def check_head(head: Path) -> str:
    """`head` (the path compose serves) holds the very head the installed package resolves for the demo model."""
    from adaspec.core.config import DEFAULT_MODEL
    from adaspec.core.drafters.eagle3 import resolve_static_head

    with tempfile.TemporaryDirectory() as cache:  # an empty cache: only the shipped (package-data) head can match
        packaged = resolve_static_head(None, cache, DEFAULT_MODEL)
    for f in HEAD_FILES:
        if not (head / f).is_file() or (head / f).read_bytes() != (packaged / f).read_bytes():
            raise SystemExit(f"{head / f} is missing or differs from the package's shipped head {packaged / f}")
    return f"head ok: {head} = {packaged}"


def verify(before_file: Path, head: Path) -> None:
    before = json.loads(before_file.read_text())
    after = installed()
    problems = []
    protected = {"sglang", "torch", "transformers"} | exact_pins("sglang")
    problems += [f"moved: {m}" for m in moved(before["versions"], after, protected)]
    others = moved(before["versions"], after, set(before["versions"]) - protected)
    requires = metadata.requires(DIST) or []
    if extra_names(requires, EXTRA) != {"sglang"}:
        problems.append(f"the [{EXTRA}] extra now needs {sorted(extra_names(requires, EXTRA))}: this Dockerfile "
                        "installs none of it (the base image carries sglang); install the rest explicitly")
    problems += [f"unmet: {u}" for u in unmet(requires, {EXTRA}, after.get)]
    problems += [f"pip check, new: {c}" for c in new_complaints(before["pip_check"], pip_check())]
    if problems:
        raise SystemExit("adaspec image check failed:\n  " + "\n  ".join(problems))
    print(f"install ok: adaspec {after.get(DIST)}; stack unchanged ({', '.join(sorted(protected & set(after)))})"
          + (f"; also moved: {', '.join(others)}" if others else ""))
    print(check_plugin())
    print(check_head(head))


def main(argv: list[str]) -> int:
    cmd, *args = argv or ["help"]
    if cmd == "snapshot" and len(args) == 1:
        Path(args[0]).write_text(json.dumps({"versions": installed(), "pip_check": pip_check()}))
    elif cmd == "requirements" and not args:
        print("\n".join(own_requirements(metadata.requires(DIST) or [])))
    elif cmd == "verify" and len(args) == 2:
        verify(Path(args[0]), Path(args[1]))
    elif cmd == "plugin" and not args:
        print(check_plugin())
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The one SGLang release this plugin is written against, and the clear errors when it is not what runs.

The plugin hooks SGLang internals (worker classes, the scheduler's result processor, the logits processor)
whose names and signatures change between releases, so it refuses anything but the exact version.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import InvalidVersion, Version

from adaspec.core.errors import AdaspecError

SGLANG_VERSION = "0.5.17"


class SGLangUnavailable(AdaspecError):
    """SGLang is missing, is another version, or one of the modules the plugin hooks cannot be imported."""


def installed_sglang_version() -> str | None:
    """The installed `sglang` distribution's version, or None when it is not installed."""
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def require_sglang() -> str:
    """The SGLang version, checked to be exactly SGLANG_VERSION; raises SGLangUnavailable otherwise."""
    found = installed_sglang_version()
    if found is None:
        raise SGLangUnavailable(
            f"adaspec's SGLang plugin needs sglang=={SGLANG_VERSION}, which is not installed "
            f"(pip install 'adaspec[sglang]')"
        )
    if not same_release(found):
        raise SGLangUnavailable(
            f"adaspec's SGLang plugin is written against sglang=={SGLANG_VERSION}; found sglang {found}"
        )
    return found


def same_release(found: str) -> bool:
    """Whether `found` is SGLANG_VERSION or a post/local build of it (0.5.17.post1, 0.5.17+cu130): those
    keep the release's internals more often than not, so they are admitted -- `plugin.load` then checks
    every hook point before registering anything."""
    try:
        return Version(found).release == Version(SGLANG_VERSION).release and Version(found).pre is None \
            and Version(found).dev is None
    except InvalidVersion:
        return False


def import_failure(what: str, exc: BaseException) -> SGLangUnavailable:
    """The error raised when a module or attribute the plugin hooks cannot be imported from SGLang."""
    return SGLangUnavailable(
        f"adaspec's SGLang plugin (for sglang=={SGLANG_VERSION}) cannot import {what}: "
        f"{type(exc).__name__}: {exc}"
    )

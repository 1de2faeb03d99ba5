"""The one SGLang release this plugin is written against, and the clear errors when it is not what runs.

The plugin hooks SGLang internals (worker classes, the scheduler's result processor, the logits processor)
whose names and signatures change between releases, so it refuses anything but the exact version.
"""

from __future__ import annotations

from importlib import metadata

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
    if found != SGLANG_VERSION:
        raise SGLangUnavailable(
            f"adaspec's SGLang plugin is written against sglang=={SGLANG_VERSION}; found sglang {found}"
        )
    return found


def import_failure(what: str, exc: BaseException) -> SGLangUnavailable:
    """The error raised when a module or attribute the plugin hooks cannot be imported from SGLang."""
    return SGLangUnavailable(
        f"adaspec's SGLang plugin (for sglang=={SGLANG_VERSION}) cannot import {what}: "
        f"{type(exc).__name__}: {exc}"
    )

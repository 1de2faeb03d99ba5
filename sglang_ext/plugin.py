"""The `sglang.srt.plugins` entry point: SGLang calls `load()` early in every process it starts (launcher,
scheduler processes), so `--speculative-algorithm ATLAS` and the plugin's hooks exist wherever SGLang needs
them -- no fork, no wrapper launcher (sglang 0.5.17 `srt/plugins/__init__.py` `load_plugins`).
"""

from __future__ import annotations

import logging

from adaspec.sglang_ext.version import SGLANG_VERSION, require_sglang

log = logging.getLogger(__name__)


def load() -> None:
    """Check the SGLang version, register ATLAS and the hooks (idempotent). Raises SGLangUnavailable with
    the reason when SGLang is not 0.5.17; SGLang logs it and starts without ATLAS."""
    version = require_sglang()
    from adaspec.sglang_ext.hooks import check_hook_points, register_hooks
    from adaspec.sglang_ext.spec import register_atlas

    if version != SGLANG_VERSION:  # a post/local build: refuse it unless every hook point is where 0.5.17 has it
        log.warning("adaspec: sglang %s is not %s; checking the hook points", version, SGLANG_VERSION)
        check_hook_points()

    added = register_atlas()
    register_hooks()
    if added:
        log.info("adaspec: registered --speculative-algorithm ATLAS (sglang %s)", version)

"""Errors a user can fix. The CLI prints these as one clear message and exits non-zero, without a traceback."""

from __future__ import annotations


class AdaspecError(Exception):
    """Base class: anything raised as AdaspecError is the user's to fix (bad input, config, cache)."""


class ConfigError(AdaspecError):
    """A setting is missing, malformed or out of range."""


class ModelError(AdaspecError):
    """The model cannot be provisioned or loaded (missing, corrupted cache, checksum mismatch)."""


class RequestError(AdaspecError):
    """A generation request is invalid (empty prompt, too long for the context, unknown drafter)."""


class ContextLengthError(RequestError):
    """The prompt leaves no room to generate within the model's context window."""

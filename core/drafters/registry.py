"""Drafters by name: the one place the CLI, the benchmarks and the SGLang plugin look them up."""

from __future__ import annotations

from typing import Callable, Sequence

from adaspec.core.config import Settings
from adaspec.core.drafters.base import Drafter
from adaspec.core.errors import RequestError

Factory = Callable[[Settings, object], Drafter]
_FACTORIES: dict[str, tuple[Factory, str]] = {}


def register(name: str, description: str) -> Callable[[Factory], Factory]:
    def deco(factory: Factory) -> Factory:
        _FACTORIES[name] = (factory, description)
        return factory

    return deco


def available() -> dict[str, str]:
    """name -> one-line description of every registered drafter."""
    return {name: desc for name, (_, desc) in sorted(_FACTORIES.items())}


def require_known(names: Sequence[str]) -> None:
    """Raise a RequestError listing the known drafters if any name is not registered (cheap: no model)."""
    for name in names:
        if name not in _FACTORIES:
            raise RequestError(f"unknown drafter {name!r}; available: {', '.join(available())}")


def make_drafter(name: str, settings: Settings, target: object | None = None) -> Drafter:
    """Build a drafter; unknown names raise a RequestError listing the known ones."""
    require_known([name])
    return _FACTORIES[name][0](settings, target)


def make_drafters(names: Sequence[str], settings: Settings, target: object | None = None) -> dict[str, Drafter]:
    """The drafters of one engine, by name, each told about the others (`share_with`) once all are built."""
    drafters = {n: make_drafter(n, settings, target) for n in names}
    for d in drafters.values():
        d.share_with(drafters)
    return drafters


@register("none", "no drafting: plain decoding, one token per target forward")
def _none(settings: Settings, target: object) -> Drafter:
    from adaspec.core.drafters.none import NoneDrafter

    return NoneDrafter()


@register("prompt-lookup", "n-gram match in the request's own context (model-free)")
def _prompt_lookup(settings: Settings, target: object) -> Drafter:
    from adaspec.core.drafters.prompt_lookup import PromptLookupDrafter

    return PromptLookupDrafter(settings.prompt_lookup_min_ngram, settings.prompt_lookup_max_ngram)


@register("suffix", "suffix tree over this request and past responses of its tenant (model-free)")
def _suffix(settings: Settings, target: object) -> Drafter:
    from adaspec.core.drafters.suffix import SuffixDrafter

    return SuffixDrafter(
        max_depth=settings.suffix_max_depth,
        max_spec_tokens=64,  # k comes from the policy; this is only a hard cap
        spec_factor=settings.suffix_spec_factor,
        min_token_prob=settings.suffix_min_token_prob,
        cache_max_responses=settings.suffix_cache_max_responses,
        cache_max_tokens=settings.suffix_cache_max_tokens,
        max_tenants=settings.suffix_max_tenants,
    )


@register("static", "EAGLE-3-style head over the target's low/mid/high features, trained offline (the floor)")
def _static(settings: Settings, target: object) -> Drafter:
    from adaspec.core.drafters.eagle3 import Eagle3Drafter, resolve_static_head
    from adaspec.core.errors import ModelError

    try:
        path = resolve_static_head(settings.static_head_path, settings.cache_dir, settings.model)
    except FileNotFoundError as exc:
        raise ModelError(str(exc)) from exc
    return Eagle3Drafter.from_path(path, target)


@register("adaptive", "learned online from traffic: a light MLP head over the target's last hidden state "
          "(kind mlp), or the static head plus an online adapter (kind adapter)")
def _adaptive(settings: Settings, target: object) -> Drafter:
    if settings.adaptive_kind == "adapter":
        return _adapted_static(settings, target)
    from adaspec.core.drafters.adaptive import AdaptiveDrafter
    from adaspec.core.errors import ModelError
    from adaspec.core.heads.adaptive import AdaptiveHead, load_adaptive

    if settings.adaptive_head_path is not None:
        try:
            head = load_adaptive(settings.adaptive_head_path, target, lr=settings.adaptive_lr)
        except Exception as exc:  # not a file, not safetensors (SafetensorError), wrong tensors: one clear error
            raise ModelError(f"cannot load adaptive head {settings.adaptive_head_path}: "
                             f"{type(exc).__name__}: {exc}"[:500]) from None
    else:
        head = AdaptiveHead.for_target(
            target, inner_size=settings.adaptive_inner_size, seed=settings.seed, lr=settings.adaptive_lr
        )
    ids = adaptive_draft_ids(settings)
    if ids is not None:
        head.set_draft_vocab(ids)
    return AdaptiveDrafter(head, collect=settings.adaptive_collect)


def adaptive_draft_ids(settings: Settings) -> list[int] | None:
    """The ids the adaptive (MLP) head drafts over: the static head's draft vocabulary with
    `adaptive_draft_vocab` (None without it, or when no static head is found). One rule for the servers and
    the sidecar's head base, so the sidecar gates exactly what the servers draft."""
    if not settings.adaptive_draft_vocab:
        return None
    from adaspec.core.drafters.eagle3 import resolve_static_head
    from adaspec.core.heads.export_sglang import read_draft_vocab

    try:
        return read_draft_vocab(resolve_static_head(settings.static_head_path, settings.cache_dir, settings.model))
    except FileNotFoundError:
        return None


def _adapted_static(settings: Settings, target: object) -> Drafter:
    from adaspec.core.drafters.static_adapted import AdaptedStaticDrafter
    from adaspec.core.heads.static_adapter import AdapterConfig, StaticAdapter

    base = _static(settings, target)
    adapter = StaticAdapter(base.head, AdapterConfig(rank=settings.adaptive_adapter_rank), seed=settings.seed)  # type: ignore[attr-defined]
    return AdaptedStaticDrafter(base, adapter, collect=settings.adaptive_collect)  # type: ignore[arg-type]

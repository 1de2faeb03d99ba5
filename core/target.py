"""The target model: a transformers causal LM plus its tokenizer, loaded from a local dir only.

Nothing here reaches a model hub (`local_files_only=True`); HF_HUB_OFFLINE=1 is honoured by transformers itself.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from adaspec.core.config import Settings
from adaspec.core.errors import ContextLengthError, ModelError, RequestError
from adaspec.core.models import resolve_model_path

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device=cuda requested but CUDA is not available")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _check_utf8(text: str) -> None:
    """Refuse text that is not valid Unicode (lone surrogates: an invalid UTF-8 shell argument, or a JSON
    escape like \\ud800) with a clear error instead of a tokenizer traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"the prompt is not valid UTF-8 (at character {exc.start})") from None


@dataclass
class Target:
    """A loaded target model with what the engine needs to know about it."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    context_len: int
    name: str

    @functools.cached_property
    def cache_kwarg(self) -> str:
        """The forward's name for the KV cache: `cache` (transformers >= 5.2x, which deprecates the old name)
        or `past_key_values` (earlier 5.x, e.g. the 5.12 SGLang 0.5.17 pins)."""
        params = inspect.signature(self.model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids for a raw user prompt: wrapped in the chat template (default) or sent as-is."""
        if not prompt or not prompt.strip():
            raise RequestError("empty prompt")
        _check_utf8(prompt)
        if chat and getattr(self.tokenizer, "chat_template", None):
            return self.encode_chat([{"role": "user", "content": prompt}])
        return self._checked([int(t) for t in self.tokenizer(prompt, add_special_tokens=True)["input_ids"]])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation under the model's chat template, ready for the assistant's turn."""
        if not any(m["content"].strip() for m in messages):
            raise RequestError("empty prompt")
        for m in messages:
            _check_utf8(m["content"])
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):  # a base model: the turns as plain text
            return self._checked(tok("\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"])
        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # a broken chat_template.jinja (jinja2 TemplateError, ...): say which file
            raise ModelError(f"the model's chat template cannot be applied ({type(exc).__name__}: {exc}); "
                             "pass --raw, or fix or remove its chat_template"[:500]) from None
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return self._checked([int(t) for t in ids])

    def _checked(self, ids: list[int]) -> list[int]:
        ids = [int(t) for t in ids]
        if len(ids) >= self.context_len:
            raise ContextLengthError(
                f"prompt is {len(ids)} tokens; the model's context is {self.context_len} tokens "
                "(at least one token must be left to generate)"
            )
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_target(settings: Settings) -> Target:
    """Load the configured target model (provisioned pinned model or a local HF dir)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path: Path = resolve_model_path(settings)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model from {path}: {exc}") from None
    model.to(device).eval()
    eos: set[int] = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            eos.add(src)
        elif isinstance(src, (list, tuple)):
            eos.update(int(t) for t in src)
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    logging.getLogger(__name__).debug("loaded %s on %s (%s)", path, device, dtype)
    return Target(model, tokenizer, device, dtype, frozenset(eos), context, path.name)

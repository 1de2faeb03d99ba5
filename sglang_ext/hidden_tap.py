"""The target's final normed hidden states (the LM head's input), which the adaptive head drafts from.

With an EAGLE-3 draft model SGLang returns only the concatenated aux layers as `hidden_states`, not the
final hidden state the adaptive head reads (adaspec's layer -1). The plugin therefore wraps SGLang's
`LogitsProcessor.forward` (sglang 0.5.17 `srt/layers/logits_processor.py`; the target model calls it with
the post-norm hidden states, e.g. `LlamaForCausalLM.forward` in `srt/models/llama.py`) and, for the target
model's processor only:

* TARGET_VERIFY: copies all [bs * (S+1), d] rows into one persistent buffer. The copy is an ordinary tensor op,
  so when SGLang captures the verify forward into a CUDA graph the copy is captured too and every replay
  refreshes the buffer in place -- the buffer never moves, which is what keeps this graph-safe;
* EXTEND (prefill, eager): keeps each request's row at its last prompt position.

Everything here is plain torch; `forward_mode` / `extend_seq_lens` are read duck-typed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class FinalHiddenTap:
    """Holds the last verify's final hidden rows and the last prefill's last-position rows."""

    def __init__(self) -> None:
        self.owner: Any = None
        self.buffer: Tensor | None = None
        self.verify_rows = 0
        self.prefill_last: Tensor | None = None

    def bind(self, owner: Any, max_rows: int, hidden_size: int, dtype: torch.dtype, device: Any) -> None:
        """Tap `owner` (the target model's logits processor) into a buffer of `max_rows` x `hidden_size`."""
        self.owner = owner
        self.buffer = torch.zeros(max_rows, hidden_size, dtype=dtype, device=device)
        self.verify_rows = 0
        self.prefill_last = None

    def record(self, processor: Any, hidden_states: Tensor, metadata: Any) -> None:
        """Called with every LogitsProcessor.forward; acts only for the bound processor."""
        if processor is not self.owner or self.buffer is None or hidden_states is None:
            return
        mode = getattr(metadata, "forward_mode", None)
        if mode is None:
            return
        if mode.is_target_verify():
            # Never raise inside a forward: a (padded) batch wider than the buffer keeps its first rows.
            n = min(hidden_states.shape[0], self.buffer.shape[0])
            self.buffer[:n].copy_(hidden_states[:n])
            self.verify_rows = n
        elif mode.is_extend():
            lens = getattr(metadata, "extend_seq_lens", None)
            if lens is None:
                return
            last = torch.cumsum(lens.to(hidden_states.device, torch.int64), 0) - 1
            self.prefill_last = hidden_states.index_select(0, last)  # a new tensor: index_select copies

    def verify_hidden(self, rows: int) -> Tensor | None:
        """The first `rows` rows of the last verify (a view of the persistent buffer: copy what you keep)."""
        if self.buffer is None or rows > self.buffer.shape[0]:
            return None
        return self.buffer[:rows]

    def take_prefill(self) -> Tensor | None:
        out, self.prefill_last = self.prefill_last, None
        return out


#: One per process: SGLang runs one target model per scheduler process.
TAP = FinalHiddenTap()


def logits_forward_hook(original, processor, *args: Any, **kwargs: Any):
    """AROUND hook for `LogitsProcessor.forward(self, input_ids, hidden_states, lm_head, logits_metadata, ...)`."""
    hidden = kwargs.get("hidden_states", args[1] if len(args) > 1 else None)
    meta = kwargs.get("logits_metadata", args[3] if len(args) > 3 else None)
    if TAP.owner is processor:
        TAP.record(processor, hidden, meta)
    return original(processor, *args, **kwargs)

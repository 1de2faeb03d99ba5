"""The adaptive speculator as the static EAGLE-3 head plus a small online adapter.

ATLAS's promise is a floor that only gets better: the adaptive speculator starts *as* the static head and learns
the workload's patterns from there. So it is not a second model but a set of deltas on the static head's one
draft layer, trained online while the static weights stay frozen:

    q    = q_proj(x)    + Bq Aq x                   # LoRA, rank r (B starts at zero)
    r    = o_proj(a)    + Bo Ao a  + h
    mlp  = down(silu(gate(n) + Bg Ag n) * (up(n) + Bu Au n)) + Bd Ad (...)
    pre' = pre + W2 silu(W1 rmsnorm(pre))            # residual output adapter (W2 starts at zero)

It plugs into `Eagle3Head.extend` / `ttt_forward` as their `layer` (it has the draft layer's qkv/finish).
k/v projections (and fc, the norms, the embedding and LM head) are untouched, so the keys and values the
static head caches over committed positions are exactly this head's too: the adaptive drafter reuses the
static drafter's cache and pays only its own chain. Every B and W2 starts at zero, so version 0 drafts
bit-identically to the static head (x + 0 == x in floating point) -- the floor by construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaspec.core.heads.eagle3 import Eagle3Head, RMSNorm


@dataclass(frozen=True)
class AdapterConfig:
    rank: int = 16
    #: LoRA output scale alpha / rank (the usual parametrisation: updates stay comparable across ranks).
    alpha: float = 32.0
    out_inner: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class LoRA(nn.Module):
    """delta(x) = scale * B A x, B zero at start: [.., in] -> [.., out]."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, d_in) / d_in**0.5)
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.A.T.to(x.dtype)) @ (self.B.T.to(x.dtype) * self.scale)


class StaticAdapter(nn.Module):
    """The trainable deltas over one `Eagle3Head` (held by reference, never registered: `state_dict()` is the
    adapter alone, which is what versions, checkpoints and weight swaps carry)."""

    def __init__(self, head: Eagle3Head, cfg: AdapterConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg = cfg or AdapterConfig()
        c = head.cfg
        d, hd, inner = c.hidden_size, c.head_dim, c.intermediate_size
        scale = cfg.alpha / cfg.rank
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.q = LoRA(2 * d, c.num_heads * hd, cfg.rank, scale)
            self.o = LoRA(c.num_heads * hd, d, cfg.rank, scale)
            self.gate = LoRA(d, inner, cfg.rank, scale)
            self.up = LoRA(d, inner, cfg.rank, scale)
            self.down = LoRA(inner, d, cfg.rank, scale)
            self.out_norm = RMSNorm(d, c.rms_norm_eps)
            self.out_up = nn.Linear(d, cfg.out_inner, bias=False)
            self.out_down = nn.Linear(cfg.out_inner, d, bias=False)
            nn.init.zeros_(self.out_down.weight)
        object.__setattr__(self, "head", head)
        self.to(head.fc.weight.device)
        self._optimizer: torch.optim.Optimizer | None = None

    # -- the adapted draft layer (mirrors Eagle3Layer.qkv / finish with the deltas added) ---------------------
    def qkv(self, embeds: Tensor, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated q [B,H,T,hd] (adapted), k/v [B,Hkv,T,hd] (the static head's own)."""
        from adaspec.core.heads.eagle3 import apply_rope, rope_cos_sin

        layer, c = self.head.midlayer, self.head.cfg
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)
        B, T, _ = x.shape
        att = layer.self_attn
        q = (att.q_proj(x) + self.q(x)).view(B, T, c.num_heads, c.head_dim).transpose(1, 2)
        k = att.k_proj(x).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = att.v_proj(x).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, q.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, attn: Tensor, residual: Tensor) -> Tensor:
        """attn [B,H,T,hd] -> the adapted pre-norm output [B,T,d]."""
        layer = self.head.midlayer
        B, H, T, hd = attn.shape
        a = attn.transpose(1, 2).reshape(B, T, H * hd)
        r = layer.self_attn.o_proj(a) + self.o(a) + residual
        n = layer.post_attention_layernorm(r)
        mlp = layer.mlp
        act = F.silu(mlp.gate_proj(n) + self.gate(n)) * (mlp.up_proj(n) + self.up(n))
        pre = mlp.down_proj(act) + self.down(act) + r
        return pre + self.out_down(F.silu(self.out_up(self.out_norm(pre))))

    def chain_forward(self, tokens: Tensor, aux: Tensor, valid: Tensor, steps: int,
                      rows: list[Tensor]) -> list[Tensor]:
        """`ttt_forward` at chosen rows only: the normed hidden [R, d] of each step at rows[b] (positions of
        stream b, R = all rows in stream order). Equal to ttt_forward's outputs at those rows, at a fraction of
        the cost: the static head is frozen, so the step-0 keys/values every row attends to are computed once
        without gradients, and queries, chain steps and the LM head run only where a loss (or the gate) reads.
        tokens [B, T+steps-1] (index t+i holds token t+1+i), aux [B, T, width], valid [B, T]."""
        from adaspec.core.heads.eagle3 import apply_rope, repeat_kv, rope_cos_sin

        head, c = self.head, self.head.cfg
        layer, att = head.midlayer, head.midlayer.self_attn
        H, Hkv, hd = c.num_heads, c.num_kv_heads, c.head_dim
        groups, scale = H // Hkv, hd**-0.5
        B, T = valid.shape
        dev = aux.device
        with torch.no_grad():
            h0 = head.fuse(aux)  # [B, T, d]
            x0 = torch.cat([layer.input_layernorm(head.embed(tokens[:, :T])), layer.hidden_norm(h0)], dim=-1)
            cos, sin = rope_cos_sin(torch.arange(T, device=dev).unsqueeze(0).expand(B, T), hd, c.rope_theta, x0.dtype)
            k0 = apply_rope(att.k_proj(x0).view(B, T, Hkv, hd).transpose(1, 2), cos, sin)
            v0 = att.v_proj(x0).view(B, T, Hkv, hd).transpose(1, 2)
            k0, v0 = repeat_kv(k0, groups), repeat_kv(v0, groups)  # [B, H, T, hd]
        outs: list[list[Tensor]] = [[] for _ in range(steps)]
        span = torch.arange(T, device=dev)
        for b in range(B):
            t = rows[b].to(dev)
            R = int(t.shape[0])
            if R == 0:
                continue
            h = h0[b, t]  # [R, d]
            seen = (span.unsqueeze(0) <= t.unsqueeze(1)) & valid[b].unsqueeze(0)  # [R, T] causal over the cache
            chain_k: list[Tensor] = []
            chain_v: list[Tensor] = []
            for i in range(steps):
                x = torch.cat([layer.input_layernorm(head.embed(tokens[b, t + i])), layer.hidden_norm(h)], dim=-1)
                cos_i, sin_i = rope_cos_sin((t + i).unsqueeze(0), hd, c.rope_theta, x.dtype)  # [1, R, hd]
                q = apply_rope((att.q_proj(x) + self.q(x)).view(1, R, H, hd).transpose(1, 2), cos_i, sin_i)[0]
                if i > 0:  # the chain's own keys (the cache's are step 0's)
                    k = apply_rope(att.k_proj(x).view(1, R, Hkv, hd).transpose(1, 2), cos_i, sin_i)[0]
                    v = att.v_proj(x).view(R, Hkv, hd).transpose(0, 1)
                    chain_k.append(k.repeat_interleave(groups, 0))  # [H, R, hd]
                    chain_v.append(v.repeat_interleave(groups, 0))
                s0 = torch.einsum("hrd,htd->hrt", q, k0[b]) * scale  # [H, R, T]
                s0 = s0.masked_fill(~seen.unsqueeze(0), float("-inf"))
                diag = [(q * kj).sum(-1, keepdim=True) * scale for kj in chain_k]  # [H, R, 1] each
                p = torch.softmax(torch.cat([s0, *diag], dim=-1).float(), dim=-1).to(q.dtype)
                attn = torch.einsum("hrt,htd->hrd", p[..., :T], v0[b])
                for j, vj in enumerate(chain_v):
                    attn = attn + p[..., T + j : T + j + 1] * vj
                pre = self.finish(attn.unsqueeze(0), h.unsqueeze(0))[0]  # [R, d]
                outs[i].append(head.logits_hidden(pre))
                h = pre
        return [torch.cat(o) if o else aux.new_zeros(0, c.hidden_size) for o in outs]

    # -- online learning ----------------------------------------------------------------------------------
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(self.parameters(), lr=self.cfg.lr,
                                                weight_decay=self.cfg.weight_decay, betas=(0.9, 0.98))
        return self._optimizer

    def reset_optimizer(self) -> None:
        self._optimizer = None

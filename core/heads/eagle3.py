"""The EAGLE-3-style static draft head: one Llama decoder layer over fused low/mid/high target features.

Layout and math follow SGLang 0.5.17's `LlamaForCausalLMEagle3` (see `sglang_eagle3_format` for the source
lines), so a trained head exports to SGLang without conversion:

    h    = fc(cat(aux_low, aux_mid, aux_high))          # target features (3d -> d); or the head's own output
    x    = cat(input_layernorm(embed(token)), hidden_norm(h))   # 2d: q/k/v read both
    r    = o_proj(attention(x)) + h
    pre  = mlp(post_attention_layernorm(r)) + r          # fed back as `h` for the next draft position
    draft logits = lm_head(norm(pre))                    # the target's frozen LM head

Position t pairs the target hidden at t with token t+1 and predicts token t+2. The embedding and LM head
are the target's own tensors, held by reference and never registered, so `state_dict()` is the head alone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaspec.core.heads.sglang_eagle3_format import default_aux_layers


class RMSNorm(nn.Module):
    """Llama RMSNorm (statistics in float32, as transformers and SGLang compute them)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [..., T, head_dim] for the default (neox-style, rotate-half) Llama RoPE."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, hd] rotated by cos/sin [B, T, hd]."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """[B, Hkv, T, hd] -> [B, Hkv*groups, T, hd] (grouped-query attention)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hd)) v with a boolean keep-mask [B, Tq, Tk]; q [B,H,Tq,hd], k/v [B,Hkv,Tk,hd]."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


@dataclass(frozen=True)
class Eagle3Config:
    """Sizes of the head (taken from the target: one draft layer as wide as a target layer)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    aux_layers: tuple[int, ...]
    target_num_layers: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    target_hidden_size: int | None = None
    #: Target token ids of a reduced draft vocabulary (SGLang's d2t), or () for the full vocabulary.
    draft_vocab: tuple[int, ...] = field(default=(), repr=False)

    @classmethod
    def from_target(cls, config: Any, aux_layers: tuple[int, ...] | None = None) -> "Eagle3Config":
        """Derive the head's sizes from a transformers Llama config; aux layers default to SGLang's choice."""
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
        if rope_type != "default" or getattr(config, "rope_scaling", None) not in (None, {}, rope):
            raise ValueError(f"only default RoPE is supported by the EAGLE-3 head, got {rope_type!r}")
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        theta = float(theta or getattr(config, "rope_theta", 10000.0))
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        return cls(
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            vocab_size=int(config.vocab_size),
            aux_layers=tuple(aux_layers) if aux_layers else default_aux_layers(layers),
            target_num_layers=layers,
            rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=theta,
            max_position_embeddings=int(getattr(config, "max_position_embeddings", 2048)),
            hidden_act=str(getattr(config, "hidden_act", "silu")),
        )

    def __post_init__(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(f"only silu MLPs are supported, got {self.hidden_act!r}")
        bad = [i for i in self.aux_layers if not 0 <= i < self.target_num_layers - 1]
        if bad or len(set(self.aux_layers)) != len(self.aux_layers):
            # the engine cannot deliver the last layer's un-normed output (its -1 is the normed one)
            raise ValueError(f"aux_layers {self.aux_layers} must be distinct in [0, {self.target_num_layers - 2}]")

    @property
    def in_hidden(self) -> int:
        return self.target_hidden_size or self.hidden_size

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["aux_layers"] = list(self.aux_layers)
        d["draft_vocab"] = list(self.draft_vocab)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Eagle3Config":
        d = dict(d)
        d["aux_layers"] = tuple(d["aux_layers"])
        d["draft_vocab"] = tuple(d.get("draft_vocab", ()))
        return cls(**d)


class Eagle3Attention(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(2 * d, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(2 * d, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(2 * d, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)


class Eagle3MLP(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3Layer(nn.Module):
    """SGLang's input draft layer (llama_eagle3.py L44-111), split around attention so callers own the KV."""

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Eagle3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Eagle3MLP(cfg)

    def qkv(self, embeds: Tensor, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated q [B,H,T,hd], k/v [B,Hkv,T,hd] for embeds/hidden [B,T,d] at positions [B,T]."""
        c = self.cfg
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        B, T, _ = x.shape
        q = self.self_attn.q_proj(x).view(B, T, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.self_attn.k_proj(x).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.self_attn.v_proj(x).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, q.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, attn: Tensor, residual: Tensor) -> Tensor:
        """attn [B,H,T,hd] -> the pre-norm output [B,T,d] (residual = the layer's input hidden)."""
        B, H, T, hd = attn.shape
        r = self.self_attn.o_proj(attn.transpose(1, 2).reshape(B, T, H * hd)) + residual
        return self.mlp(self.post_attention_layernorm(r)) + r


class Eagle3Head(nn.Module):
    """fc + one draft layer + final norm; the target's embedding and LM head are borrowed, frozen."""

    def __init__(self, cfg: Eagle3Config, embed_weight: Tensor, lm_head_weight: Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        n_aux = len(cfg.aux_layers)
        self.fc = nn.Linear(cfg.in_hidden * n_aux, cfg.hidden_size, bias=False)
        # Fixed per-input-dimension scale on the target features (1 = none). Training sets 1/RMS per dim, so
        # the few "massive activation" dims (|x| in the hundreds) do not swamp fc's updates; export folds it
        # into fc.weight, so checkpoints stay SGLang's plain `fc` and never carry it.
        self.register_buffer("aux_scale", torch.ones(cfg.in_hidden * n_aux), persistent=False)
        self.midlayer = Eagle3Layer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attach(embed_weight, lm_head_weight)

    @classmethod
    def for_target(cls, target: Any, aux_layers: tuple[int, ...] | None = None, seed: int = 0) -> "Eagle3Head":
        """A freshly initialised head sized for `target` (a `Target`), on its device, deterministic in `seed`."""
        model = target.model
        cfg = Eagle3Config.from_target(model.config, aux_layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = cls(cfg, model.get_input_embeddings().weight, model.get_output_embeddings().weight)
            for m in head.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        return head.to(target.device)

    def attach(self, embed_weight: Tensor, lm_head_weight: Tensor) -> None:
        """Borrow the target's embedding and LM head (detached: never trained, never in state_dict)."""
        object.__setattr__(self, "embed_weight", embed_weight.detach())
        full = lm_head_weight.detach()
        if self.cfg.draft_vocab:
            ids = torch.tensor(self.cfg.draft_vocab, dtype=torch.long, device=full.device)
            object.__setattr__(self, "draft_ids", ids)
            full = full[ids]
        else:
            object.__setattr__(self, "draft_ids", None)
        object.__setattr__(self, "lm_head_weight", full)

    # -- pieces -------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def embed(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.embed_weight).to(self.dtype)

    def fuse(self, aux: Tensor) -> Tensor:
        """Target features [..., n_aux*d] (low, mid, high concatenated) -> the draft hidden [..., d]."""
        return self.fc(aux.to(self.dtype) * self.aux_scale.to(self.dtype))

    def folded_fc_weight(self) -> Tensor:
        """fc.weight with `aux_scale` folded in: fc(x * s) == (W * s) x."""
        return self.fc.weight * self.aux_scale.to(self.fc.weight.dtype).unsqueeze(0)

    def logits_hidden(self, pre: Tensor) -> Tensor:
        """The normed hidden the LM head reads (pre-norm output in, as SGLang's final norm)."""
        return self.norm(pre)

    def to_target_ids(self, ids: Tensor) -> Tensor:
        """Draft-vocab ids -> target ids (identity for the full vocabulary)."""
        return ids if self.draft_ids is None else self.draft_ids[ids]

    def extend(
        self, tokens: Tensor, hidden: Tensor, positions: Tensor, past_k: Tensor, past_v: Tensor,
        past_valid: Tensor, new_valid: Tensor, layer: Any = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One draft-layer pass over a right-padded chunk with a per-row KV prefix.

        tokens/positions [B,C], hidden [B,C,d] (already fused), past k/v [B,Hkv,S,hd] with past_valid
        [B,S], new_valid [B,C]. Returns (pre [B,C,d], k [B,Hkv,C,hd], v) for the caller to keep. `layer`: what
        computes qkv/finish (default the draft layer; a `StaticAdapter` adds its deltas).
        """
        layer = layer if layer is not None else self.midlayer
        q, k, v = layer.qkv(self.embed(tokens), hidden, positions)
        C = tokens.shape[1]
        causal = torch.ones(C, C, dtype=torch.bool, device=tokens.device).tril()
        new_mask = causal.unsqueeze(0) & new_valid.unsqueeze(1)
        new_mask |= torch.eye(C, dtype=torch.bool, device=tokens.device).unsqueeze(0)  # padding rows: no NaN
        mask = torch.cat([past_valid.unsqueeze(1).expand(-1, C, -1), new_mask], dim=-1)
        attn = masked_attention(q, torch.cat([past_k, k], 2), torch.cat([past_v, v], 2), mask)
        return layer.finish(attn, hidden), k, v

    def ttt_forward(self, tokens: Tensor, aux: Tensor, valid: Tensor, steps: int, layer: Any = None) -> list[Tensor]:
        """EAGLE-3 training-time test: `steps` unrolled draft passes over whole sequences.

        tokens [B, T+steps-1]: step i at index t reads token tokens[:, t+i] (the token after position t+i);
        aux [B,T,n*d] target features at positions 0..T-1; valid [B,T]. Step 0 attends causally to step-0
        keys; step i>0 additionally sees only its own chain's keys (the diagonal of steps 1..i) and feeds on
        the previous step's own output, exactly the attention pattern of drafting i tokens past position t.
        Returns the normed hidden [B,T,d] of every step (step i predicts the token at t+2+i). `layer` as in
        `extend`.
        """
        layer = layer if layer is not None else self.midlayer
        B, T = valid.shape
        h = self.fuse(aux)
        positions = torch.arange(T, device=aux.device).unsqueeze(0).expand(B, T)
        mask0 = torch.ones(T, T, dtype=torch.bool, device=aux.device).tril().unsqueeze(0) & valid.unsqueeze(1)
        mask0 = mask0 | torch.eye(T, dtype=torch.bool, device=aux.device).unsqueeze(0)
        scale = self.cfg.head_dim ** -0.5
        groups = self.cfg.num_heads // self.cfg.num_kv_heads
        keys: list[Tensor] = []
        values: list[Tensor] = []
        outs: list[Tensor] = []
        for i in range(steps):
            q, k, v = layer.qkv(self.embed(tokens[:, i : i + T]), h, positions + i)
            keys.append(repeat_kv(k, groups))
            values.append(repeat_kv(v, groups))
            s0 = (q @ keys[0].transpose(-1, -2)) * scale
            s0 = s0.masked_fill(~mask0.unsqueeze(1), float("-inf"))
            diag = [(q * kj).sum(-1, keepdim=True) * scale for kj in keys[1:]]
            p = torch.softmax(torch.cat([s0, *diag], dim=-1).float(), dim=-1).to(q.dtype)
            attn = p[..., :T] @ values[0]
            for j, vj in enumerate(values[1:]):
                attn = attn + p[..., T + j : T + j + 1] * vj
            pre = layer.finish(attn, h)
            outs.append(self.logits_hidden(pre))
            h = pre
        return outs

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def lm_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """Float32 logits of the frozen LM head (used by training losses)."""
    return hidden.float() @ weight.float().T


def config_fingerprint(cfg: Eagle3Config) -> str:
    """Short stable id of a head layout (checkpoint compatibility checks)."""
    import hashlib

    return hashlib.sha256(json.dumps(cfg.to_json(), sort_keys=True).encode()).hexdigest()[:12]



def restrict_draft_vocab(head: Eagle3Head, ids: Sequence[int]) -> Eagle3Head:
    """Let the head draft only over `ids` (SGLang's reduced draft vocabulary, exported as d2t/t2d): argmax over
    a subset equals the full argmax whenever that lies in it, and each draft step reads len(ids) LM-head rows
    instead of the whole vocabulary. Training is unaffected (it can use the full vocabulary)."""
    ids = sorted(set(int(i) for i in ids))
    if not ids or ids[0] < 0 or ids[-1] >= head.cfg.vocab_size:
        raise ValueError(f"draft vocabulary must be non-empty ids in [0, {head.cfg.vocab_size})")
    full = head.lm_head_weight if head.draft_ids is None else None
    if full is None:
        raise ValueError("the head already has a reduced vocabulary")
    head.cfg = dataclasses.replace(head.cfg, draft_vocab=tuple(ids))
    head.attach(head.embed_weight, full)
    return head

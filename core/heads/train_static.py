"""Training the static EAGLE-3 head by self-distillation, resumably and deterministically.

1. Record: the target answers the training prompts greedily through the reference engine (`none` policy);
   a recording drafter receives the hidden states of the head's aux layers plus the final normed state
   (-1, from which the target's own next-token distribution is recomputed at train time instead of storing
   49k logits per token). Samples go to sharded safetensors under a cache dir keyed by model, the prompt
   slice's token ids, the generation budget, the layers and the seed; finished shards survive a crash.
2. Train: EAGLE-3 training-time test (`Eagle3Head.ttt_forward`): T unrolled draft steps on the head's own
   hidden states, loss = soft cross-entropy to the target's distribution at each step (weight 0.8**step),
   AdamW with warmup + cosine LR, grad-norm clipping. The data order and the LR are functions of the step
   number, so a run resumed from its checkpoint (head + AdamW moments + step) is bit-identical to one
   that never stopped.
3. Export: the final head is written in SGLang's EAGLE-3 format (also our own load format).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from adaspec.core import fsio
from adaspec.core.engine.engine import SpecEngine
from adaspec.core.step import FixedPolicy
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.heads.eagle3 import Eagle3Head, lm_logits, restrict_draft_vocab
from adaspec.core.engine.recording import model_fingerprint, record_greedy
from adaspec.core.heads.export_sglang import export_sglang, load_sglang

_STORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DATA_FORMAT = 1


@dataclass
class StaticTrainArgs:
    """Everything a `train_static` run depends on (the CLI maps its options 1:1 onto these)."""

    out_dir: Path
    cache_dir: Path
    prompts_file: Path | None = None  # JSONL {"prompt": ...}; default: the shared alpaca.jsonl
    prompt_offset: int = 0
    prompt_limit: int = 512
    chat_template: bool = True
    max_new_tokens: int = 256
    gen_batch_size: int = 8
    aux_layers: tuple[int, ...] | None = None  # None: SGLang's default for the target's depth
    ttt_steps: int = 4
    epochs: float = 2.0
    max_steps: int | None = None  # overrides epochs
    batch_seqs: int = 2
    lr: float = 5e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    loss_on_prompt: bool = False
    save_every: int = 200
    seed: int = 0
    storage_dtype: str = "bfloat16"
    shard_size: int = 64
    eval_prompts: int = 16  # held-out prompts right after the training slice; 0 = skip
    eval_k: int = 4
    eval_max_new_tokens: int = 64
    resume: bool = True
    show_progress: bool = True
    #: >0: export/evaluate the head drafting over this many ids (the most frequent in the recorded answers,
    #: then the lowest ids, which in BPE are the earliest merges); 0 keeps the full vocabulary.
    draft_vocab: int = 0
    export_dtype: str = "float32"
    #: Scale each target-feature dim by 1/its RMS over the data while training (folded into fc on export).
    normalize_aux: bool = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


# -- 1. recording ---------------------------------------------------------------------------------------------


def dataset_key(target: Any, prompts: Sequence[Sequence[int]], layers: Sequence[int], max_new_tokens: int,
                seed: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"model": target.name, "weights": model_fingerprint(target), "layers": list(layers),
                         "max_new_tokens": max_new_tokens, "seed": seed, "format": DATA_FORMAT}).encode())
    for p in prompts:
        h.update(json.dumps(list(p)).encode())
    return h.hexdigest()[:20]


def record_dataset(
    target: Any, prompts: Sequence[Sequence[int]], layers: Sequence[int], data_dir: Path,
    max_new_tokens: int, batch_size: int = 8, shard_size: int = 64, storage_dtype: str = "bfloat16",
    show_progress: bool = True,
) -> Path:
    """Record the target's greedy answers + hidden states into `data_dir/shard-*.safetensors` (resumable)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    meta_path = data_dir / "dataset.json"
    if meta_path.is_file():
        return data_dir
    layers = tuple(sorted(set(layers)))
    dtype = _STORE_DTYPES[storage_dtype]
    shards = [prompts[i : i + shard_size] for i in range(0, len(prompts), shard_size)]
    with _progress(show_progress) as prog:
        task = prog.add_task("recording target answers", total=len(prompts))
        for si, chunk in enumerate(shards):
            path = data_dir / f"shard-{si:05d}.safetensors"
            if path.is_file():
                prog.advance(task, len(chunk))
                continue
            ((_, answers),) = record_greedy(target, chunk, layers, max_new_tokens, dtype, batch_size, len(chunk))
            tensors: dict[str, Tensor] = {}
            prompt_lens = []
            for j, (tokens, plen, hidden) in enumerate(answers):
                tensors[f"tokens.{j}"] = torch.tensor(tokens, dtype=torch.int32)
                tensors[f"hidden.{j}"] = hidden.contiguous()
                prompt_lens.append(plen)
            fsio.save_safetensors(tensors, path, {"prompt_lens": json.dumps(prompt_lens)})
            prog.advance(task, len(chunk))
    meta = {"format": DATA_FORMAT, "layers": list(layers), "samples": len(prompts), "shards": len(shards),
            "storage_dtype": storage_dtype, "max_new_tokens": max_new_tokens}
    fsio.write_json(meta_path, meta)
    return data_dir


@dataclass
class Sample:
    tokens: Tensor  # [T] int64: prompt + answer
    prompt_len: int
    hidden: Tensor  # [T-1, len(layers), d]


class DistillData:
    """Read access to a recorded dataset (one shard open at a time; shards are memory-mapped)."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.meta = json.loads((data_dir / "dataset.json").read_text())
        self.layers: tuple[int, ...] = tuple(self.meta["layers"])
        self.index: list[tuple[Path, int, int]] = []
        for si in range(self.meta["shards"]):
            path = data_dir / f"shard-{si:05d}.safetensors"
            with safe_open(str(path), framework="pt") as f:
                lens = json.loads(f.metadata()["prompt_lens"])
            self.index += [(path, j, plen) for j, plen in enumerate(lens)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Sample:
        path, j, plen = self.index[i]
        with safe_open(str(path), framework="pt") as f:
            return Sample(f.get_tensor(f"tokens.{j}").long(), plen, f.get_tensor(f"hidden.{j}"))


# -- 2. training ----------------------------------------------------------------------------------------------
@dataclass
class TTTBatch:
    aux: Tensor  # [B, n, n_aux*d] target features at positions 0..n-1
    final: Tensor  # [B, n, d] target final normed hidden (its distribution at each position)
    tokens: Tensor  # [B, n+steps-1]: index t+i holds token t+1+i
    valid: Tensor  # [B, n] positions with features
    loss_mask: Tensor  # [B, steps, n]: step i at t predicts a token we train on


def make_batch(samples: Sequence[Sample], layers: Sequence[int], aux_layers: Sequence[int], steps: int,
               loss_on_prompt: bool) -> TTTBatch:
    """Pad samples into one TTT batch; step i at index t reads token t+1+i and learns the target at t+1+i."""
    aux_idx = [list(layers).index(l) for l in aux_layers]
    fin_idx = list(layers).index(-1)
    B, n = len(samples), max(s.hidden.shape[0] for s in samples)
    d = samples[0].hidden.shape[-1]
    aux = torch.zeros(B, n, len(aux_idx) * d)
    final = torch.zeros(B, n, d)
    tokens = torch.zeros(B, n + steps - 1, dtype=torch.long)
    valid = torch.zeros(B, n, dtype=torch.bool)
    loss_mask = torch.zeros(B, steps, n, dtype=torch.bool)
    t = torch.arange(n)
    for b, s in enumerate(samples):
        m = s.hidden.shape[0]  # positions with hidden: 0..m-1, tokens 0..m
        aux[b, :m] = s.hidden[:, aux_idx].float().reshape(m, -1)
        final[b, :m] = s.hidden[:, fin_idx].float()
        k = min(m, n + steps - 1)
        tokens[b, :k] = s.tokens[1 : k + 1]
        valid[b, :m] = True
        for i in range(steps):
            ok = t + 1 + i <= m - 1  # the target's distribution at t+1+i is known
            if not loss_on_prompt:
                ok &= t + 2 + i >= s.prompt_len  # the predicted token is an answer token
            loss_mask[b, i] = ok
    return TTTBatch(aux, final, tokens, valid, loss_mask)


def ttt_loss(head: Eagle3Head, batch: TTTBatch, steps: int, decay: float = 0.8) -> tuple[Tensor, dict[str, float]]:
    """Weighted soft cross-entropy of every unrolled step against the target's own distribution."""
    dev = head.fc.weight.device
    outs = head.ttt_forward(batch.tokens.to(dev), batch.aux.to(dev), batch.valid.to(dev), steps)
    with torch.no_grad():
        target_p = torch.softmax(lm_logits(batch.final.to(dev), head.lm_head_weight), dim=-1)
    total = torch.zeros((), device=dev)
    wsum, stats = 0.0, {}
    for i, hid in enumerate(outs):
        b, t = batch.loss_mask[:, i].to(dev).nonzero(as_tuple=True)
        if not len(b):
            continue
        pm = target_p[b, t + 1 + i]  # the target's distribution for the token step i predicts at t
        logq = torch.log_softmax(lm_logits(hid[b, t], head.lm_head_weight), dim=-1)
        total = total + (decay**i) * -(pm * logq).sum(-1).mean()
        wsum += decay**i
        stats[f"acc{i}"] = float((logq.argmax(-1) == pm.argmax(-1)).float().mean())
    return total / max(wsum, 1e-9), stats


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of `base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@dataclass
class TrainState:
    step: int = 0
    total_steps: int = 0
    losses: list[float] = field(default_factory=list)


class StaticTrainer:
    """Owns head + AdamW + step; `run(n)` trains, `save`/`load` make it resumable bit-for-bit."""

    def __init__(self, head: Eagle3Head, data: DistillData, args: StaticTrainArgs) -> None:
        self.head, self.data, self.args = head, data, args
        self.opt = torch.optim.AdamW(head.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                     weight_decay=args.weight_decay)
        per_epoch = math.ceil(len(data) / args.batch_seqs)
        total = args.max_steps if args.max_steps is not None else math.ceil(args.epochs * per_epoch)
        self.state = TrainState(0, max(1, total))

    def batch_indices(self, step: int) -> list[int]:
        """The samples of `step`: consecutive slices of per-epoch seeded permutations."""
        N, bs = len(self.data), self.args.batch_seqs
        out = []
        for g in range(step * bs, step * bs + bs):
            epoch, pos = divmod(g, N)
            perm = torch.randperm(N, generator=torch.Generator().manual_seed(self.args.seed * 1_000_003 + epoch))
            out.append(int(perm[pos]))
        return out

    def train_step(self) -> dict[str, float]:
        a = self.args
        samples = [self.data[i] for i in self.batch_indices(self.state.step)]
        batch = make_batch(samples, self.data.layers, self.head.cfg.aux_layers, a.ttt_steps, a.loss_on_prompt)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.state.step, self.state.total_steps, a.lr, a.warmup_steps)
        self.head.train()
        loss, stats = ttt_loss(self.head, batch, a.ttt_steps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.head.parameters(), a.grad_clip)
        self.opt.step()
        self.head.eval()
        self.state.step += 1
        self.state.losses.append(float(loss.detach()))
        return {"loss": float(loss.detach()), **stats}

    def run(self, until: int | None = None, ckpt_dir: Path | None = None) -> None:
        until = self.state.total_steps if until is None else min(until, self.state.total_steps)
        with _progress(self.args.show_progress) as prog:
            task = prog.add_task("training EAGLE-3 head", total=self.state.total_steps,
                                 completed=self.state.step)
            while self.state.step < until:
                stats = self.train_step()
                prog.update(task, advance=1, description=f"training EAGLE-3 head loss={stats['loss']:.3f} "
                            f"acc0={stats.get('acc0', 0):.2f}")
                if ckpt_dir is not None and self.state.step % self.args.save_every == 0:
                    self.save(ckpt_dir)
        if ckpt_dir is not None:
            self.save(ckpt_dir)

    def save(self, ckpt_dir: Path) -> None:
        """Atomically replace `ckpt_dir` with head (SGLang format) + AdamW state + trainer.json."""
        with fsio.atomic_dir(ckpt_dir) as tmp:
            export_sglang(self.head, tmp)
            sd = self.opt.state_dict()
            tensors = {f"state.{pid}.{k}": v.detach().cpu().contiguous() for pid, st in sd["state"].items()
                       for k, v in st.items()}
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            meta = {"state": asdict(self.state), "param_groups": sd["param_groups"], "args": self.args.to_json(),
                    "dataset": str(self.data.dir)}
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, ckpt_dir: Path, target: Any, data: DistillData, args: StaticTrainArgs) -> "StaticTrainer":
        head = load_sglang(ckpt_dir, target)
        trainer = cls(head, data, args)
        meta = json.loads((ckpt_dir / "trainer.json").read_text())
        flat = load_file(str(ckpt_dir / "optimizer.safetensors"))
        state: dict[int, dict[str, Tensor]] = {}
        for name, t in flat.items():
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = t.to(head.fc.weight.device)
        groups = meta["param_groups"]
        for g in groups:
            g["betas"] = tuple(g["betas"])
        trainer.opt.load_state_dict({"state": dict(sorted(state.items())), "param_groups": groups})
        trainer.state = TrainState(**meta["state"])
        return trainer


# -- 3. the whole run and its evaluation ------------------------------------------------------------------
def load_prompt_ids(target: Any, args: StaticTrainArgs, offset: int, limit: int) -> list[list[int]]:
    from adaspec.core.datasets import load_prompts, shared_data_dir

    path = args.prompts_file or shared_data_dir() / "alpaca.jsonl"
    rows = load_prompts(path, limit=limit, offset=offset)
    return [target.encode(r.prompt, chat=args.chat_template) for r in rows]


def train_static(args: StaticTrainArgs, target: Any, prompt_ids: Sequence[Sequence[int]] | None = None,
                 eval_prompt_ids: Sequence[Sequence[int]] | None = None) -> Path:
    """Record (cached), train (resumable) and export the static head; returns the final SGLang-format dir.

    `prompt_ids` overrides the prompts file slice (tests, tokenizer-less targets). Writes
    `out_dir/checkpoint` (resumable), `out_dir/final` (the head) and `out_dir/eval.json` (tau, if evaluated).
    """
    torch.manual_seed(args.seed)
    prompts = list(prompt_ids) if prompt_ids is not None else load_prompt_ids(
        target, args, args.prompt_offset, args.prompt_limit)
    head = Eagle3Head.for_target(target, args.aux_layers, seed=args.seed)
    layers = tuple(sorted(set(head.cfg.aux_layers) | {-1}))
    key = dataset_key(target, prompts, layers, args.max_new_tokens, args.seed)
    data_dir = record_dataset(target, prompts, layers, Path(args.cache_dir) / "distill" / f"{target.name}-{key}",
                              args.max_new_tokens, args.gen_batch_size, args.shard_size, args.storage_dtype,
                              args.show_progress)
    data = DistillData(data_dir)
    out = Path(args.out_dir)
    ckpt = out / "checkpoint"
    if args.resume and (ckpt / "trainer.json").is_file():
        trainer = StaticTrainer.load(ckpt, target, data, args)  # the checkpoint carries its draft vocabulary
    else:
        if args.draft_vocab:  # train on the reduced vocabulary too (EAGLE-3's d2t): the target's distribution
            # renormalised over it, at a fraction of the LM-head cost per position
            restrict_draft_vocab(head, choose_draft_vocab(data, args.draft_vocab, head.cfg.vocab_size))
        if args.normalize_aux:
            head.aux_scale.copy_(aux_feature_scale(data, head.cfg.aux_layers))
        trainer = StaticTrainer(head, data, args)
    trainer.run(ckpt_dir=ckpt)
    final = export_sglang(trainer.head, out / "final", dtype=_STORE_DTYPES[args.export_dtype])
    if eval_prompt_ids is None and args.eval_prompts and prompt_ids is None:
        eval_prompt_ids = load_prompt_ids(target, args, args.prompt_offset + args.prompt_limit, args.eval_prompts)
    if eval_prompt_ids:
        report = evaluate_tau(target, trainer.head, eval_prompt_ids, args.eval_k, args.eval_max_new_tokens,
                              args.gen_batch_size)
        (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return final


def aux_feature_scale(data: DistillData, aux_layers: Sequence[int], samples: int = 64) -> Tensor:
    """1 / RMS of every target-feature dim (aux layers concatenated) over an even spread of samples."""
    idx = [data.layers.index(layer) for layer in aux_layers]
    step = max(1, len(data) // samples)
    rows = torch.cat([data[i].hidden[:, idx].float().flatten(1) for i in range(0, len(data), step)])
    return 1.0 / rows.pow(2).mean(0).sqrt().clamp(min=1e-3)


def choose_draft_vocab(data: DistillData, size: int, vocab_size: int) -> list[int]:
    """`size` target ids: those the target emitted most in the recorded answers, then the lowest ids."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for i in range(len(data)):
        sample = data[i]
        counts += torch.bincount(sample.tokens[sample.prompt_len :], minlength=vocab_size)
    seen = [int(t) for t in torch.argsort(counts, descending=True, stable=True) if counts[t] > 0][:size]
    chosen = set(seen)
    for t in range(vocab_size):
        if len(chosen) >= size:
            break
        chosen.add(t)
    return sorted(chosen)


def evaluate_tau(target: Any, head: Eagle3Head | Path, prompts: Sequence[Sequence[int]], k: int = 4,
                 max_new_tokens: int = 64, batch_size: int = 4) -> dict[str, float]:
    """Greedy tau (tokens per target forward, prefill counted) and draft acceptance of the head via the engine."""
    from adaspec.core.drafters.eagle3 import Eagle3Drafter

    if isinstance(head, (str, Path)):
        head = load_sglang(head, target)
    drafter = Eagle3Drafter(head)
    engine = SpecEngine(target, [drafter], batch_size=batch_size)
    res = engine.generate([list(p) for p in prompts], SamplingParams(max_new_tokens=max_new_tokens),
                          FixedPolicy(drafter.name, k))
    recs = [r for g in res for r in g.records if r.drafted]
    drafted = sum(r.drafted for r in recs)
    accepted = sum(r.accepted for r in recs)
    return {
        "tau": sum(len(g.output_tokens) for g in res) / max(1, sum(g.target_forwards for g in res)),
        "acceptance": accepted / max(1, drafted),
        "mean_accepted_per_step": accepted / max(1, len(recs)),
        "k": float(k),
        "prompts": float(len(prompts)),
    }


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=False)


"""BatchKV's row bookkeeping against a layout-free model: whatever the layout (padding, holes, a pending
select folded into a merge or a compaction), each row's valid slots hold exactly its committed tokens' keys
and values, in order."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from adaspec.core.engine.kv import BatchKV

H, D, LAYERS = 2, 3, 2


def _token_kv(tag: float, n: int) -> torch.Tensor:
    """[n, H, D] distinct values per token so any misplaced slot shows."""
    return tag + torch.arange(n * H * D, dtype=torch.float32).reshape(n, H, D) / 1000


def _append(kv: BatchKV, model: list[list[torch.Tensor]], chunks: list[torch.Tensor], keep: list[int],
            width: int) -> None:
    """What a forward + commit does: append C right-padded slots per row, keep the first keep[i]."""
    B = len(chunks)
    new = torch.zeros(B, H, width, D)
    for i, c in enumerate(chunks):
        new[i, :, : c.shape[0]] = c.transpose(0, 1)
    cache = kv.cache
    for layer_index in range(LAYERS):
        cache.update(new + layer_index, new - layer_index, layer_index)
    kv.commit(torch.tensor(keep), width)
    for i, c in enumerate(chunks):
        model[i].extend(c[: keep[i]])


def _check(kv: BatchKV, model: list[list[torch.Tensor]]) -> None:
    assert kv.batch_size == len(model)
    assert kv.lengths.tolist() == [len(m) for m in model]
    layers = kv.cache.layers  # materialises any pending select
    for i, toks in enumerate(model):
        want = torch.stack(toks).transpose(0, 1) if toks else torch.zeros(H, 0, D)  # [H, n, D]
        for layer_index, layer in enumerate(layers):
            got_k = layer.keys[i][:, kv.valid[i]]
            got_v = layer.values[i][:, kv.valid[i]]
            torch.testing.assert_close(got_k, want + layer_index, rtol=0, atol=0)
            torch.testing.assert_close(got_v, want - layer_index, rtol=0, atol=0)


def _prefill(rng: random.Random, tag: float, rows: int) -> tuple[BatchKV, list[list[torch.Tensor]]]:
    kv = BatchKV(torch.device("cpu"))
    kv.cache = DynamicCache()
    kv.valid = torch.zeros(rows, 0, dtype=torch.bool)
    kv.lengths = torch.zeros(rows, dtype=torch.long)
    model: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    lens = [rng.randint(1, 9) for _ in range(rows)]
    chunks = [_token_kv(tag + i, n) for i, n in enumerate(lens)]
    _append(kv, model, chunks, lens, max(lens))
    return kv, model


@pytest.mark.parametrize("seed", range(12))
def test_random_select_merge_compact_sequences_keep_every_rows_tokens(seed):
    rng = random.Random(seed)
    kv, model = _prefill(rng, 100.0, rng.randint(1, 5))
    tag = 200.0
    for _ in range(30):
        op = rng.choice(["decode", "decode", "select", "merge", "compact"])
        if op == "decode" and kv.batch_size:
            width = rng.randint(1, 6)
            chunks = [_token_kv(tag + i, width) for i in range(kv.batch_size)]
            keep = [rng.randint(1, width) for _ in range(kv.batch_size)]
            _append(kv, model, chunks, keep, width)
        elif op == "select" and kv.batch_size:
            keep_rows = sorted(rng.sample(range(kv.batch_size), rng.randint(0, kv.batch_size)))
            kv.select(torch.tensor(keep_rows, dtype=torch.long))
            model = [model[r] for r in keep_rows]
            if rng.random() < 0.5 and kv.batch_size > 1:  # a second select before anything reads the cache
                again = sorted(rng.sample(range(kv.batch_size), rng.randint(1, kv.batch_size)))
                kv.select(torch.tensor(again, dtype=torch.long))
                model = [model[r] for r in again]
        elif op == "merge":
            other, other_model = _prefill(rng, tag, rng.randint(1, 3))
            kv.merge(other)
            model += other_model
        elif op == "compact" and kv.batch_size:
            kv.compact()
            assert kv.slots == max(len(m) for m in model)
        tag += 100.0
        if rng.random() < 0.3:
            _check(kv, model)
    _check(kv, model)


def test_select_is_deferred_until_the_cache_is_read():
    rng = random.Random(0)
    kv, model = _prefill(rng, 100.0, 4)
    before = kv._cache.layers[0].keys
    kv.select(torch.tensor([0, 2]))
    assert kv._cache.layers[0].keys is before, "the copy should wait for the next reader"
    assert kv.batch_size == 2 and kv.lengths.tolist() == [len(model[0]), len(model[2])]
    other, other_model = _prefill(rng, 500.0, 1)
    kv.merge(other)  # the pending select is folded into the merge's copy
    _check(kv, [model[0], model[2]] + other_model)


def test_selecting_every_row_in_order_is_free():
    kv, _ = _prefill(random.Random(1), 100.0, 3)
    before = kv._cache.layers[0].keys
    kv.select(torch.arange(3))
    assert kv._rows is None and kv.cache.layers[0].keys is before

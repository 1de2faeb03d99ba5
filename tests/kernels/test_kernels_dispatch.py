"""Dispatch: env-driven backend choice, lazy triton import, and the flashinfer glue (with a fake sampler)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from adaspec.kernels import backend, dispatch, flashinfer_verify
from adaspec.kernels.reference import draft_topk_reference, greedy_verify_reference, rejection_verify_reference


def test_importing_the_package_does_not_import_triton():
    code = ("import sys, adaspec.kernels.dispatch as k; k.draft_topk; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_kernel_mode_parsing(monkeypatch):
    monkeypatch.delenv("ADASPEC_KERNELS", raising=False)
    assert backend.kernel_mode() == "auto"
    for raw, want in (("torch", "torch"), (" Triton ", "triton"), ("AUTO", "auto"), ("", "auto")):
        monkeypatch.setenv("ADASPEC_KERNELS", raw)
        assert backend.kernel_mode() == want
    monkeypatch.setenv("ADASPEC_KERNELS", "cuda")
    with pytest.raises(ValueError):
        backend.kernel_mode()


@pytest.fixture
def spy(monkeypatch):
    """Counts calls to the Triton entry points (patched where dispatch imports them from)."""
    from adaspec.kernels import triton_draft_head, triton_verify

    calls = {"draft": 0, "verify": 0}
    real_draft, real_verify = triton_draft_head.draft_topk_triton, triton_verify.greedy_verify_triton

    def draft(*a, **kw):
        calls["draft"] += 1
        return real_draft(*a, **kw)

    def verify(*a, **kw):
        calls["verify"] += 1
        return real_verify(*a, **kw)

    monkeypatch.setattr(triton_draft_head, "draft_topk_triton", draft)
    monkeypatch.setattr(triton_verify, "greedy_verify_triton", verify)
    return calls


def _inputs():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(3, 16, generator=g), torch.randn(500, 16, generator=g)
    draft = torch.randint(0, 2, (5, 4), generator=g)
    lens = torch.tensor([0, 1, 2, 3, 4])
    target = torch.randint(0, 2, (5, 5), generator=g)
    return hidden, weight, draft, lens, target


@pytest.mark.parametrize("mode,expect_triton", [("triton", 1), ("auto", 0), ("torch", 0)])
def test_dispatch_routes_cpu_tensors(triton_kernels, spy, monkeypatch, mode, expect_triton):
    monkeypatch.setenv("ADASPEC_KERNELS", mode)
    hidden, weight, draft, lens, target = _inputs()
    ids, probs = dispatch.draft_topk(hidden, weight, 3, 0.9)
    ref_ids, ref_probs = draft_topk_reference(hidden, weight, 3, 0.9)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-4, atol=1e-9)
    got = dispatch.greedy_verify(draft, lens, target)
    assert all(torch.equal(a, b) for a, b in zip(got, greedy_verify_reference(draft, lens, target)))
    assert spy == {"draft": expect_triton, "verify": expect_triton}


def test_forced_triton_fails_loudly_without_interpreter_or_triton(monkeypatch):
    monkeypatch.setenv("ADASPEC_KERNELS", "triton")
    hidden, weight, *_ = _inputs()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.draft_topk(hidden, weight, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    with pytest.raises(ImportError, match="pip install triton"):
        dispatch.draft_topk(hidden, weight, 2)
    monkeypatch.setenv("ADASPEC_KERNELS", "auto")
    assert dispatch.draft_topk(hidden, weight, 2)[0].shape == (3, 2)  # auto never needs triton


def test_forced_triton_rejects_k_beyond_kernel(triton_kernels, monkeypatch):
    hidden, weight, *_ = _inputs()
    monkeypatch.setenv("ADASPEC_KERNELS", "triton")
    with pytest.raises(ValueError):
        dispatch.draft_topk(hidden, weight, dispatch._TRITON_MAX_K + 1)
    assert dispatch._TRITON_MAX_K == triton_kernels[0].MAX_K


def _rejection_inputs(B=6, Kd=3, V=11, seed=0, lens=None):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(B, Kd + 1, V, generator=g), -1)
    q = torch.softmax(torch.randn(B, Kd, V, generator=g), -1)
    draft = torch.randint(0, V, (B, Kd), generator=g)
    lens = torch.full((B,), Kd) if lens is None else lens
    return draft, lens, p, q, torch.rand(B, Kd, generator=g), torch.rand(B, generator=g)


@pytest.mark.parametrize("mode", ["torch", "auto", "triton"])
def test_rejection_verify_on_cpu_is_the_reference(monkeypatch, mode):
    monkeypatch.setenv("ADASPEC_KERNELS", mode)
    args = _rejection_inputs(lens=torch.tensor([0, 1, 2, 3, 3, 1]))
    for q in (args[3], None):
        a = (*args[:3], q, *args[4:])
        got = dispatch.rejection_verify(*a)
        assert all(torch.equal(x, y) for x, y in zip(got, rejection_verify_reference(*a)))
        assert all(torch.equal(x, y) for x, y in zip(flashinfer_verify.rejection_verify_flashinfer(*a, allow_own_rng=True), got))


def _fake_flashinfer(legacy: bool):
    """A torch stand-in with flashinfer's contract: -1 padded [B, L+1] ids, accepted and emitted counts."""

    def run(draft_probs, draft_token_ids, uniform_samples, target_probs):
        assert draft_token_ids.dtype == torch.int32 and draft_probs.dtype == torch.float32
        B, L = draft_token_ids.shape
        assert target_probs.shape[:2] == (B, L + 1) and draft_probs.shape[:2] == (B, L)
        lens = torch.full((B,), L)
        acc, nxt, _ = rejection_verify_reference(
            draft_token_ids.long(), lens, target_probs, draft_probs, uniform_samples[:, :L], uniform_samples[:, L]
        )
        out = torch.full((B, L + 1), -1, dtype=torch.int32)
        for i in range(B):
            out[i, : acc[i]] = draft_token_ids[i, : acc[i]]
            out[i, acc[i]] = nxt[i]
        return out, torch.zeros(B, dtype=torch.int32), acc.int()

    if legacy:
        def chain_speculative_sampling(draft_probs, draft_token_ids, uniform_samples, target_probs):
            return run(draft_probs, draft_token_ids, uniform_samples, target_probs)
    else:
        state = torch.Generator().manual_seed(0)

        def chain_speculative_sampling(draft_probs, draft_token_ids, target_probs, generator=None):
            B, L = draft_token_ids.shape
            return run(draft_probs, draft_token_ids, torch.rand(B, L + 1, generator=state), target_probs)
    return chain_speculative_sampling


def test_flashinfer_glue_matches_reference_with_legacy_uniform_api():
    fn = _fake_flashinfer(legacy=True)
    draft, _, p, q, u, ru = _rejection_inputs(B=40, Kd=5, V=13, seed=3)
    for L in (1, 3, 5):
        lens = torch.full((40,), L)
        for dq in (q, None):
            got = flashinfer_verify.run_chain_sampler(fn, draft, lens, p, dq, u, ru)
            want = rejection_verify_reference(draft, lens, p, dq, u, ru)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (L, dq is None)


def test_flashinfer_glue_falls_back_when_lengths_vary():
    calls = []
    fake = _fake_flashinfer(legacy=True)

    def fn(*a):
        calls.append(1)
        return fake(*a)

    draft, _, p, q, u, ru = _rejection_inputs(B=8, Kd=4, V=9, seed=4)
    for lens in (torch.tensor([4, 4, 4, 3, 4, 4, 4, 4]), torch.zeros(8, dtype=torch.long)):
        got = flashinfer_verify.run_chain_sampler(fn, draft, lens, p, q, u, ru)
        assert all(torch.equal(a, b) for a, b in zip(got, rejection_verify_reference(draft, lens, p, q, u, ru)))
    assert calls == []


def test_flashinfer_glue_own_rng_api_is_exact_in_distribution():
    """Current flashinfer ignores our uniforms: check the adapted output still has the right law."""
    fn = _fake_flashinfer(legacy=False)
    assert not flashinfer_verify._takes_uniforms(fn)
    N, V = 100_000, 6
    g = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(V, generator=g), 0)
    q = torch.softmax(torch.randn(V, generator=g), 0)
    drafted = torch.multinomial(q, N, replacement=True, generator=g)
    acc, nxt, keep = flashinfer_verify.run_chain_sampler(
        fn, drafted[:, None], torch.ones(N, dtype=torch.long), p.expand(N, 2, V), q.expand(N, 1, V),
        torch.zeros(N, 1), torch.zeros(N),
    )
    assert torch.equal(keep, acc + 1)
    first = torch.where(acc >= 1, drafted, nxt)
    hist = torch.bincount(first, minlength=V).double() / N
    assert 0.5 * (hist - p.double()).abs().sum().item() < 0.01  # E[TV] ~ 2e-3 here


def test_flashinfer_wrapper_respects_reproducibility_guard(monkeypatch):
    """Without allow_own_rng an own-RNG flashinfer must not be used (even on CUDA); checked via the glue."""
    used = []
    fake = _fake_flashinfer(legacy=False)

    def chain_speculative_sampling(draft_probs, draft_token_ids, target_probs, generator=None):
        used.append(1)
        return fake(draft_probs, draft_token_ids, target_probs)

    monkeypatch.setattr(flashinfer_verify, "flashinfer_chain_sampler", lambda: chain_speculative_sampling)

    class FakeCuda(torch.Tensor):  # only `.is_cuda` matters for the routing decision
        @property
        def is_cuda(self):  # type: ignore[override]
            return True

    draft, lens, p, q, u, ru = _rejection_inputs(B=4, Kd=2, V=7, seed=6)
    p_cuda = p.as_subclass(FakeCuda)
    flashinfer_verify.rejection_verify_flashinfer(draft, lens, p_cuda, q, u, ru)
    assert used == []
    flashinfer_verify.rejection_verify_flashinfer(draft, lens, p_cuda, q, u, ru, allow_own_rng=True)
    assert used == [1]


def test_bench_help_and_timer():
    from adaspec.kernels import bench

    ms = bench.time_fn(lambda: torch.ones(10).sum(), torch.device("cpu"), reps=3, warmup=1)
    assert 0 <= ms < 1000
    out = subprocess.run([sys.executable, "-m", "adaspec.kernels.bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--reps" in out.stdout

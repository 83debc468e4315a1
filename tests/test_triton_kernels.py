"""Kernel-level tests of the Triton backend ``ra3.kernels`` that only it has: the launchers' own errors, the
fused-matmul design of the linear ops (against the reference and against the chunked design) and compilation of
every kernel for a GPU.

The contract of every launcher, shared with the native kernels of ra3._C, is tested once for all backends in
test_kernel_contracts.py. Without a GPU these run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1). Output buffers are poisoned with NaN first, so a result that is finite everywhere proves every
element was written; tiles are shrunk so every multi-tile loop and multi-program grid runs on small shapes. The
op-level tests of the triton backend (autograd, dispatch, dtypes) are the ``triton`` cases of test_ops_*.py.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install -e .[triton])", allow_module_level=True)

import test_vocab_softmax  # noqa: E402
from conftest import assert_close, require_backend  # noqa: E402
from kernel_helpers import (CODE, DTYPES, ENTROPY, EXACT_KL, LOGPROB, close, grad_state, nan_like,  # noqa: E402
                            run_stats, shrink_triton_blocks)
from ra3 import ops  # noqa: E402
from ra3.ops import kernel_abi as abi  # noqa: E402
from ra3.ops import reference  # noqa: E402


@pytest.fixture
def device():
    return require_backend("triton", "logprobs")


def test_launchers_reject_unknown_names_and_mismatched_dtypes(device):
    from ra3.kernels import launcher

    x = torch.zeros(4, device=device)
    with pytest.raises(ValueError, match="launcher"):
        launcher("no_such_kernel")
    with pytest.raises(TypeError, match="dtype"):  # float32 tensors under the float64 tag
        launcher("kl_estimator_fwd")(abi.KlEstimatorFwdArgs(dtype=abi.FLOAT64, estimator=3, lp=x, ref=x, n=4, out=x))


# --- the fused-matmul design -------------------------------------------------------------------------------------


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide tiles in the fused-matmul kernels: several token, vocabulary and hidden tiles, ragged edges."""
    from ra3.kernels import vocab_softmax_fused

    small = dict(BLOCK_N=16, BLOCK_V=16, BLOCK_H=16)
    monkeypatch.setattr(vocab_softmax_fused, "TILES", {torch.float32: small, torch.float64: small})
    return vocab_softmax_fused


@pytest.fixture
def fused(monkeypatch, small_tiles):
    """The linear ops on the fused-matmul design, with 16-wide tiles and the vocabulary in 3 splits where it has 3
    tiles (the merge kernel; fewer tiles, fewer splits)."""
    vocab_softmax_fused = small_tiles
    monkeypatch.setattr(vocab_softmax_fused, "_splits", lambda n_tiles, vocab_tiles, dev: 3)
    calls = []
    for name in ("vocab_softmax_fused_fwd", "vocab_softmax_fused_grad"):
        original = getattr(vocab_softmax_fused, name)

        def counted(*args, _original=original, _name=name, **kw):
            calls.append(_name)
            return _original(*args, **kw)
        monkeypatch.setattr(vocab_softmax_fused, name, counted)
    return calls


@pytest.mark.parametrize("dtype", test_vocab_softmax.DTYPES)
@pytest.mark.parametrize("shape", test_vocab_softmax.SHAPES)
@pytest.mark.parametrize("bias", (False, True))
def test_fused_linear_logprobs_matches_reference(fused, dtype, shape, bias):
    test_vocab_softmax.test_linear_logprobs_matches_reference("triton-fused", dtype, shape, bias, None)
    assert fused == ["vocab_softmax_fused_fwd", "vocab_softmax_fused_grad"], "the fused kernels did not run"


@pytest.mark.parametrize("dtype", test_vocab_softmax.DTYPES)
@pytest.mark.parametrize("bias", (False, True))
def test_fused_linear_entropy_matches_reference(fused, dtype, bias):
    test_vocab_softmax.test_linear_entropy_matches_reference("triton-fused", dtype, bias, None)
    assert fused == ["vocab_softmax_fused_fwd", "vocab_softmax_fused_grad"]


@pytest.mark.parametrize("dtype", test_vocab_softmax.DTYPES)
def test_fused_linear_exact_kl_matches_reference(fused, dtype):
    test_vocab_softmax.test_linear_exact_kl_matches_reference("triton-fused", dtype, None)
    assert fused == ["vocab_softmax_fused_fwd", "vocab_softmax_fused_grad"]


def test_fused_linear_large_logits_all_ignored_and_segments(fused):
    test_vocab_softmax.test_linear_logprobs_large_logits_and_all_ignored("triton-fused", None)
    test_vocab_softmax.test_linear_logprobs_segments("triton-fused", None)
    assert set(fused) == {"vocab_softmax_fused_fwd", "vocab_softmax_fused_grad"}


def test_fused_linear_gradcheck_float64(fused):
    test_vocab_softmax.test_gradcheck_float64("triton-fused", None)


def test_fused_linear_hidden_only_and_strided_inputs(fused, device):
    """Gradient w.r.t. hidden only (no weight gradient: the kernel skips grad_weight), from a strided hidden."""
    h = torch.randn(7, 30, device=device)[:, 3:19].requires_grad_()  # row stride 30
    weight = torch.randn(45, 16, device=device) / 4
    targets = torch.randint(0, 45, (7,), device=device)
    out = ops.linear_logprobs(h, weight, targets, temperature=1.7, backend="triton-fused")
    expected = reference.linear_logprobs(h.detach().double().cpu().requires_grad_(), weight.double().cpu(),
                                         targets.cpu(), temperature=1.7)
    assert_close(out, expected, torch.float32, "log-probs")
    (gh,) = torch.autograd.grad(out.sum(), h)
    h64 = h.detach().double().cpu().requires_grad_()
    (gh_want,) = torch.autograd.grad(reference.linear_logprobs(h64, weight.double().cpu(), targets.cpu(),
                                                               temperature=1.7).sum(), h64)
    assert_close(gh, gh_want, torch.float32, "grad hidden")
    assert fused == ["vocab_softmax_fused_fwd", "vocab_softmax_fused_grad"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [LOGPROB, ENTROPY, EXACT_KL])
@pytest.mark.parametrize("splits", [1, 3])
def test_fused_stats_write_every_output_and_match_chunks(small_tiles, device, monkeypatch, dtype, mode, splits):
    """The fused launcher writes its whole state (NaN-poisoned first) and agrees with the chunked walk over
    hidden @ weight.T (vocab_softmax_fwd, in 32-column blocks), for every mode, with and without vocabulary
    splits."""
    vocab_softmax_fused = small_tiles
    shrink_triton_blocks(monkeypatch)
    gen = torch.Generator().manual_seed(21 + mode)
    n, h, v = 19, 20, 53
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
    hidden, weight, bias = rnd(n, h), rnd(v, h) / 3, rnd(v)
    ref_hidden, ref_weight = rnd(n, 9), rnd(v, 9) / 2
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    targets[::4] = -1
    inv_temp = 1 / 0.8
    kl = mode == EXACT_KL
    state = [nan_like((n,), dtype, device) for _ in range(6)]
    m, s, a, mr, sr, tgt = state
    vocab_softmax_fused.vocab_softmax_fused_fwd(abi.VocabSoftmaxFusedFwdArgs(
        mode=mode, dtype=CODE[dtype], hidden=hidden, weight=weight, bias=bias, ref_hidden=ref_hidden if kl else None,
        ref_weight=ref_weight if kl else None, ref_bias=None, targets=targets, inv_temp=inv_temp, m=m, s=s, a=a, mr=mr,
        sr=sr, tgt=tgt), splits=splits)
    want = dict(zip("m s a mr sr tgt".split(), run_stats("triton", mode, dtype, hidden @ weight.T + bias,
                                                          ref_hidden @ ref_weight.T if kl else None, targets,
                                                          inv_temp, vc=10)))
    close(m + s.log(), want["m"] + want["s"].log(), dtype)
    if mode == LOGPROB:
        close(tgt, want["tgt"], dtype)
        assert tgt[targets < 0].eq(0).all()
    else:
        close(a / s, want["a"] / want["s"], dtype)
    if kl:
        close(mr + sr.log(), want["mr"] + want["sr"].log(), dtype)
    written = [m, s] + ([tgt] if mode == LOGPROB else [a]) + ([mr, sr] if kl else [])
    assert all(t.isfinite().all() for t in written)


@pytest.mark.parametrize("mode", [LOGPROB, ENTROPY, EXACT_KL])
def test_fused_grad_writes_every_output(small_tiles, device, mode):
    """The fused backward overwrites NaN-poisoned gradient buffers completely (it zeroes, then accumulates)."""
    vocab_softmax_fused = small_tiles
    n, h, v = 18, 20, 35
    hidden, weight, bias = torch.randn(n, h, device=device), torch.randn(v, h, device=device) / 3, \
        torch.randn(v, device=device)
    ref_hidden, ref_weight = torch.randn(n, 8, device=device), torch.randn(v, 8, device=device)
    targets = torch.randint(0, v, (n,), device=device)
    kl = mode == EXACT_KL
    x = (hidden.double() @ weight.double().T + bias.double()).cpu()
    y = (ref_hidden.double() @ ref_weight.double().T).cpu()
    m, logs, q_ent, q_kl = grad_state(x, y)
    q = {LOGPROB: None, ENTROPY: q_ent, EXACT_KL: q_kl}[mode]
    f = lambda t: None if t is None else t.float().to(device)  # noqa: E731
    gh, gw, gb = nan_like((n, h), torch.float32, device), nan_like((v, h), torch.float32, device), \
        nan_like((v,), torch.float32, device)
    vocab_softmax_fused.vocab_softmax_fused_grad(abi.VocabSoftmaxFusedGradArgs(
        mode=mode, dtype=abi.FLOAT32, hidden=hidden, weight=weight, bias=bias, ref_hidden=ref_hidden if kl else None,
        ref_weight=ref_weight if kl else None, ref_bias=None, targets=targets, inv_temp=1.0, m=f(m), logs=f(logs),
        q=f(q), g=torch.ones(n, device=device), grad_hidden=gh, grad_weight=gw, grad_bias=gb))
    assert gh.isfinite().all() and gw.isfinite().all() and gb.isfinite().all()
    h64, w64, b64 = (t.double().cpu().requires_grad_() for t in (hidden, weight, bias))
    z64 = h64 @ w64.T + b64
    value = {LOGPROB: lambda: torch.log_softmax(z64, -1).gather(1, targets.cpu()[:, None])[:, 0],
             ENTROPY: lambda: reference.entropy(z64),
             EXACT_KL: lambda: reference.exact_kl(z64, y)}[mode]()
    want = torch.autograd.grad(value.sum(), (h64, w64, b64))
    for got, exp, what in zip((gh, gw, gb), want, ("hidden", "weight", "bias")):
        close(got, exp, torch.float32, rtol=1e-4, atol=1e-5, msg=what)


# --- compiled for a GPU ------------------------------------------------------------------------------------------


def test_kernels_compile_for_cuda():
    """Every kernel variant that a float32 run launches compiles to a cubin for sm_90 (no GPU needed: Triton's
    bundled ptxas), catching what the interpreter never checks: loop-carried types, dot shapes, register limits."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no NVIDIA backend here")
    script = Path(__file__).resolve().parent.parent / "scripts" / "check_triton_compile.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 failed" in res.stdout


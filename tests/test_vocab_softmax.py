"""Softmax-over-vocabulary ops (log-probs, entropy, exact KL), every backend against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from conftest import ALL_BACKENDS, assert_close, assert_within_eager, eager_in, require_backend
from ra3 import ops
from ra3.ops import reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((1, 8, 5), (13, 16, 50), (33, 24, 129))  # (N, H, V); V not a multiple of the 7-column chunk


def _inputs(n, h, v, dtype, device, *, scale=1.0, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype)
    b = (torch.randn(v, generator=g)).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    up = torch.randn(n, generator=g, dtype=torch.float64)  # upstream gradient
    move = lambda t: None if t is None else t.to(device).requires_grad_(t.is_floating_point())  # noqa: E731
    return move(hidden), move(weight), move(b), targets.to(device), up.to(device)


def _grads(out, up, *tensors):
    live = [t for t in tensors if t is not None]
    return torch.autograd.grad((out.double() * up).sum(), live)


def _ref64(*tensors):
    return [None if t is None else t.detach().double().cpu().requires_grad_(t.is_floating_point()) for t in tensors]


def _check_grads(got, want, dtype, eager_fn, up, *tensors, names=("hidden", "weight", "bias")):
    """float32: within the fixed tolerance of the float64 gradients ``want``; bfloat16 / float16: at most
    EAGER_FACTOR times as far from them as torch eager's own gradients of ``eager_fn(*tensors)`` in that dtype."""
    if dtype not in (torch.bfloat16, torch.float16):
        for name, g1, g2 in zip(names, got, want):
            assert_close(g1, g2, dtype, f"grad {name}")
        return
    leaves = [None if t is None else t.detach().cpu().requires_grad_() for t in tensors]
    with eager_in(dtype):
        eager = _grads(eager_fn(*leaves), up.cpu(), *leaves)
    for name, g1, g2, g3 in zip(names, got, want, eager):
        assert g1.dtype == dtype
        assert_within_eager(g1, g2, g3, f"grad {name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", (False, True))
def test_linear_logprobs_matches_reference(backend, dtype, shape, bias, small_chunks):
    device = require_backend(backend, "logprobs")
    hidden, weight, b, targets, up = _inputs(*shape, dtype, device, bias=bias)
    targets[::3] = -100
    out = ops.linear_logprobs(hidden, weight, targets, bias=b, temperature=0.7, backend=backend)
    assert out.dtype == torch.float32
    h64, w64, b64 = _ref64(hidden, weight, b)
    expected = reference.linear_logprobs(h64, w64, targets.cpu(), bias=b64, temperature=0.7)
    assert_close(out, expected, torch.float32, "token log-probs")
    assert (out[::3] == 0).all()
    _check_grads(_grads(out, up, hidden, weight, b), _grads(expected, up.cpu(), h64, w64, b64), dtype,
                 lambda h, w, bb: reference.linear_logprobs(h, w, targets.cpu(), bias=bb, temperature=0.7), up,
                 hidden, weight, b)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_logprobs_from_logits_matches_reference(backend, dtype, small_chunks):
    device = require_backend(backend, "logprobs")
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(17, 40, generator=g) * 3).to(dtype).to(device).requires_grad_()
    targets = torch.randint(0, 40, (17,), generator=g).to(device)
    targets[4] = -1  # a custom ignore_index
    out = ops.logprobs(logits, targets, temperature=1.3, ignore_index=-1, backend=backend)
    (l64,) = _ref64(logits)
    expected = reference.logprobs(l64, targets.cpu(), temperature=1.3, ignore_index=-1)
    assert_close(out, expected, torch.float32, "log-probs")
    up = torch.randn(17, dtype=torch.float64, generator=g)
    _check_grads(_grads(out, up.to(device), logits), _grads(expected, up, l64), dtype,
                 lambda lg: reference.logprobs(lg, targets.cpu(), temperature=1.3, ignore_index=-1), up, logits,
                 names=("logits",))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_logprobs_from_strided_logits(backend, small_chunks):
    """A [N, V] view with a row stride wider than V (a slice of a bigger buffer) is read correctly."""
    device = require_backend(backend, "logprobs")
    big = torch.randn(9, 60, dtype=torch.float32, device=device)
    logits = big[:, 5:45]
    targets = torch.randint(0, 40, (9,), device=device)
    out = ops.logprobs(logits, targets, backend=backend)
    assert_close(out, reference.logprobs(logits.double().cpu(), targets.cpu()), torch.float32)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_linear_logprobs_large_logits_and_all_ignored(backend, small_chunks):
    device = require_backend(backend, "logprobs")
    hidden, weight, _, targets, _ = _inputs(6, 8, 30, torch.float32, device, scale=3e3)  # logits ~ 1e4
    out = ops.linear_logprobs(hidden, weight, targets, backend=backend)
    expected = reference.linear_logprobs(hidden.double().cpu(), weight.double().cpu(), targets.cpu())
    assert float(expected.detach().abs().max()) > 1e3
    assert_close(out, expected, torch.float32, "log-probs at |logits| ~ 1e4")
    ignored = torch.full_like(targets, -100)
    out = ops.linear_logprobs(hidden, weight, ignored, backend=backend)
    assert (out == 0).all()
    gh, gw = torch.autograd.grad(out.sum(), (hidden, weight))
    assert (gh == 0).all() and (gw == 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_linear_logprobs_segments(backend, small_chunks):
    device = require_backend(backend, "logprobs")
    hidden, weight, _, targets, _ = _inputs(12, 8, 20, torch.float32, device)
    seg = torch.tensor([3, 3, -1, 0, 0, 0, 3, -1, 1, 1, 3, 0], device=device)  # unordered, segment 2 and 4 empty
    res = ops.linear_logprobs(hidden, weight, targets, segment_ids=seg, num_segments=5, backend=backend)
    assert isinstance(res, ops.SegmentLogProbs)
    tok = reference.linear_logprobs(hidden.double().cpu(), weight.double().cpu(), targets.cpu())
    want = torch.stack([tok[seg.cpu() == k].sum() for k in range(5)])
    assert_close(res.token_logprobs, tok, torch.float32)
    assert_close(res.segment_logprobs, want, torch.float32, "segment sums")
    assert res.segment_logprobs[2] == 0 and res.segment_logprobs[4] == 0
    gw = torch.autograd.grad(res.segment_logprobs[3], weight)[0]
    w64 = weight.detach().double().cpu().requires_grad_()
    tok64 = reference.linear_logprobs(hidden.double().cpu(), w64, targets.cpu())
    gw_want = torch.autograd.grad(tok64[seg.cpu() == 3].sum(), w64)[0]
    assert_close(gw, gw_want, torch.float32, "grad of one segment")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", (False, True))
def test_linear_entropy_matches_reference(backend, dtype, bias, small_chunks):
    device = require_backend(backend, "entropy")
    hidden, weight, b, _, up = _inputs(11, 16, 45, dtype, device, scale=2.0, bias=bias)
    out = ops.linear_entropy(hidden, weight, bias=b, temperature=0.9, backend=backend)
    h64, w64, b64 = _ref64(hidden, weight, b)
    expected = reference.linear_entropy(h64, w64, bias=b64, temperature=0.9)
    assert_close(out, expected, torch.float32, "entropy")
    _check_grads(_grads(out, up, hidden, weight, b), _grads(expected, up.cpu(), h64, w64, b64), dtype,
                 lambda h, w, bb: reference.linear_entropy(h, w, bias=bb, temperature=0.9), up, hidden, weight, b)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_exact_kl_matches_reference(backend, dtype, small_chunks):
    device = require_backend(backend, "exact_kl")
    hidden, weight, b, _, up = _inputs(10, 16, 37, dtype, device, scale=2.0, bias=True)
    ref_hidden, ref_weight, ref_b, _, _ = _inputs(10, 12, 37, dtype, device, scale=2.0, bias=True, seed=5)
    out = ops.linear_exact_kl(hidden, weight, ref_hidden, ref_weight, bias=b, ref_bias=ref_b, temperature=1.1,
                              backend=backend)
    h64, w64, b64, rh, rw, rb = _ref64(hidden, weight, b, ref_hidden, ref_weight, ref_b)
    expected = reference.linear_exact_kl(h64, w64, rh, rw, bias=b64, ref_bias=rb, temperature=1.1)
    assert (expected > 0).all()
    assert_close(out, expected, torch.float32, "exact KL")
    _check_grads(_grads(out, up, hidden, weight, b), _grads(expected, up.cpu(), h64, w64, b64), dtype,
                 lambda h, w, bb: reference.linear_exact_kl(h, w, ref_hidden.cpu(), ref_weight.cpu(), bias=bb,
                                                            ref_bias=ref_b.cpu(), temperature=1.1),
                 up, hidden, weight, b)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_entropy_and_exact_kl_from_logits(backend, small_chunks):
    device = require_backend(backend, "entropy")
    logits = torch.randn(8, 30, device=device, requires_grad=True)
    ref_logits = torch.randn(8, 30, device=device)
    ent = ops.entropy(logits, backend=backend)
    kl = ops.exact_kl(logits, ref_logits, backend=backend)
    l64 = logits.detach().double().cpu().requires_grad_()
    ent_want = reference.entropy(l64)
    kl_want = reference.exact_kl(l64, ref_logits.double().cpu())
    assert_close(ent, ent_want, torch.float32, "entropy")
    assert_close(kl, kl_want, torch.float32, "exact KL")
    g = torch.autograd.grad((ent + 2 * kl).sum(), logits)[0]
    g_want = torch.autograd.grad((ent_want + 2 * kl_want).sum(), l64)[0]
    assert_close(g, g_want, torch.float32, "grad logits")
    assert ops.exact_kl(logits, logits.detach(), backend=backend).abs().max() < 1e-5


@pytest.mark.parametrize("backend", ("torch", "cpu", "triton"))
def test_gradcheck_float64(backend, small_chunks):
    device = require_backend(backend, "logprobs")
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 5, dtype=torch.float64, generator=g).to(device).requires_grad_()
    weight = torch.randn(9, 5, dtype=torch.float64, generator=g).to(device).requires_grad_()
    bias = torch.randn(9, dtype=torch.float64, generator=g).to(device).requires_grad_()
    targets = torch.tensor([0, 8, -100, 3], device=device)
    ref_hidden = torch.randn(4, 5, dtype=torch.float64, generator=g).to(device)
    ref_weight = weight.detach().clone()
    assert torch.autograd.gradcheck(
        lambda h, w, b: ops.linear_logprobs(h, w, targets, bias=b, temperature=0.8, backend=backend),
        (hidden, weight, bias))
    assert torch.autograd.gradcheck(lambda h, w, b: ops.linear_entropy(h, w, bias=b, backend=backend),
                                    (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w: ops.linear_exact_kl(h, w, ref_hidden, ref_weight, backend=backend), (hidden, weight))


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_native_ops_pass_opcheck(backend, small_chunks):
    """The custom ops are well-formed for torch.compile: schema, fake tensors, autograd registration."""
    device = require_backend(backend, "logprobs")
    from ra3.ops.vocab_softmax import cross_entropy_op, vocab_softmax_op
    from ra3.ops.vocab_softmax_walk import ENTROPY, EXACT_KL, LOGPROB

    hidden = torch.randn(5, 6, device=device, requires_grad=True)
    weight = torch.randn(20, 6, device=device, requires_grad=True)
    targets = torch.tensor([1, 2, -1, 19, 0], device=device)
    torch.library.opcheck(vocab_softmax_op, (backend, LOGPROB, hidden, weight, None, None, None, None, targets, 1.0,
                                             1.0, 0.0, False))
    torch.library.opcheck(vocab_softmax_op, (backend, LOGPROB, hidden, weight, None, None, None, None, targets, 0.5,
                                             2.0, 3.0, False))  # scale and soft-cap
    torch.library.opcheck(vocab_softmax_op, (backend, ENTROPY, hidden, None, None, None, None, None, None, 0.5, 1.0,
                                             0.0, False))
    ref = torch.randn(5, 20, device=device)
    torch.library.opcheck(vocab_softmax_op, (backend, EXACT_KL, hidden @ weight.detach().T, None, None, ref, None,
                                             None, None, 0.8, 1.0, 0.0, False))
    torch.library.opcheck(cross_entropy_op, (backend, hidden, weight, None, targets, 1.0, 1.0, 0.0, False, True,
                                             True))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_linear_logprobs_under_torch_compile(backend):
    device = require_backend(backend, "logprobs")
    hidden = torch.randn(6, 8, device=device, requires_grad=True)
    weight = torch.randn(30, 8, device=device, requires_grad=True)
    targets = torch.randint(0, 30, (6,), device=device)

    def loss(h, w):
        return -ops.linear_logprobs(h, w, targets, backend=backend).mean()

    compiled = torch.compile(loss, backend="aot_eager")
    eager_val = loss(hidden, weight)
    comp_val = compiled(hidden, weight)
    assert_close(comp_val, eager_val, torch.float32, "compiled loss")
    g1 = torch.autograd.grad(eager_val, weight)[0]
    g2 = torch.autograd.grad(comp_val, weight)[0]
    assert_close(g2, g1, torch.float32, "compiled grad")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("upstream", (2.5, 1.0))  # 1: the saved gradients are handed on without a scaled copy
def test_linear_cross_entropy_matches_reference(backend, dtype, reduction, upstream, monkeypatch):
    device = require_backend(backend, "logprobs")
    from ra3.ops import vocab_softmax_walk

    # token chunks of 3 rows, a ragged last one
    monkeypatch.setattr(vocab_softmax_walk, "ce_rows", lambda vocab, device: 3)
    hidden, weight, b, targets, _ = _inputs(13, 16, 50, dtype, device, bias=True)
    targets[[1, 5]] = -100
    loss = ops.linear_cross_entropy(hidden, weight, targets, bias=b, temperature=0.8, reduction=reduction,
                                    backend=backend)
    h64, w64, b64 = _ref64(hidden, weight, b)
    lp = reference.linear_logprobs(h64, w64, targets.cpu(), bias=b64, temperature=0.8)
    want = -lp.sum() / (11 if reduction == "mean" else 1)
    assert loss.dim() == 0
    assert_close(loss, want, torch.float32, "loss")
    up = torch.tensor(upstream, dtype=torch.float64)
    _check_grads(_grads(loss, up, hidden, weight, b), _grads(want, up, h64, w64, b64), dtype,
                 lambda h, w, bb: reference.linear_cross_entropy(h, w, targets.cpu(), bias=bb, temperature=0.8,
                                                                 reduction=reduction), up, hidden, weight, b)
    with torch.no_grad():
        assert_close(ops.linear_cross_entropy(hidden, weight, targets, bias=b, temperature=0.8, reduction=reduction,
                                              backend=backend), want, torch.float32, "no-grad loss")

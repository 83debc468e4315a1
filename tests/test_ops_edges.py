"""The ops on every edge, on every backend, against values worked out here (Python floats, ``math``), forward and
backward:

- a -inf logit or bias entry (a masked vocabulary entry) has probability 0: entropy, exact KL and log-probs are
  those of the vocabulary without it, its gradient is exactly 0 and every other gradient is finite; a whole
  vocabulary chunk (or Triton tile, or split) of -inf entries included;
- policy_loss tokens of mask weight 0 holding -inf, +inf or NaN in logprobs / old_logprobs / ref_logprobs (and
  huge per-token advantages) change nothing, forward or backward;
- empty inputs: policy_loss with B = 0 (or T = 0, or no token of weight) is 0 under every aggregation; the
  vocabulary ops with N = 0 return [0] results that back-propagate zero gradients;
- policy_loss sends a gradient to logprobs only, never to old_logprobs, advantages, ref_logprobs or mask.

``triton-fused`` is the backend with the fused-matmul design of the linear ops, here with 16-wide tiles and the
vocabulary in splits.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import ALL_BACKENDS, assert_close, require_backend
from ra3 import ops
from ra3.ops import reference

F32, F64 = torch.float32, torch.float64
INF = math.inf
VARIANTS = (*ALL_BACKENDS, "triton-fused")


@pytest.fixture
def variant_backend(request, monkeypatch, small_chunks):
    """(backend name, its device) for the ``variant`` parameter, with 7-column vocabulary chunks; for
    'triton-fused', the fused-matmul linear ops with 16-wide tiles and up to 3 vocabulary splits."""
    variant, op = request.param
    backend = variant
    device = require_backend(backend, op)
    if variant == "triton-fused":
        from ra3.kernels import vocab_softmax_fused

        small = dict(BLOCK_N=16, BLOCK_V=16, BLOCK_H=16)
        monkeypatch.setattr(vocab_softmax_fused, "TILES", {F32: small, F64: small})
        monkeypatch.setattr(vocab_softmax_fused, "_splits", lambda n_tiles, vocab_tiles, dev: 3)
    return backend, device


def _variants(op, variants=VARIANTS):
    return pytest.mark.parametrize("variant_backend", [(v, op) for v in variants], ids=list(variants),
                                   indirect=True)


# --- closed forms on Python floats ------------------------------------------------------------------------------

def _log_softmax(row, temperature=1.0):
    """log softmax(row / T) with -inf entries as -inf (probability 0), on Python floats."""
    z = [x / temperature for x in row]
    top = max(z)
    lse = top + math.log(sum(math.exp(x - top) for x in z if x != -INF))
    return [x - lse if x != -INF else -INF for x in z]


def _entropy(row, temperature=1.0):
    """(H, dH/drow): H = -sum_{p>0} p log p, dH/dx_j = -p_j (log p_j + H) / T, 0 where p_j = 0."""
    lp = _log_softmax(row, temperature)
    h = -sum(math.exp(v) * v for v in lp if v != -INF)
    grad = [-math.exp(v) * (v + h) / temperature if v != -INF else 0.0 for v in lp]
    return h, grad


def _kl(row, ref_row, temperature=1.0):
    """(KL, dKL/drow): KL = sum_{p>0} p (log p - log q), dKL/dx_j = p_j (log p_j - log q_j - KL) / T."""
    lp, lq = _log_softmax(row, temperature), _log_softmax(ref_row, temperature)
    k = sum(math.exp(a) * (a - b) for a, b in zip(lp, lq) if a != -INF)
    grad = [math.exp(a) * (a - b - k) / temperature if a != -INF else 0.0 for a, b in zip(lp, lq)]
    return k, grad


def _logprob(row, target, temperature=1.0):
    """(log p_t, d log p_t / drow) = (.., (onehot_t - p) / T), 0 where p_j = 0."""
    lp = _log_softmax(row, temperature)
    grad = [((j == target) - (math.exp(v) if v != -INF else 0.0)) / temperature for j, v in enumerate(lp)]
    return lp[target], grad


def _rows(fn, rows, *more, up=None, temperature=1.0):
    """fn per row -> (values [N], d sum(up * values) / drows [N, V]) as float64 tensors."""
    up = up or [1.0] * len(rows)
    out = [fn(r, *(m[i] for m in more), temperature) for i, r in enumerate(rows)]
    return (torch.tensor([v for v, _ in out], dtype=F64),
            torch.tensor([[u * g for g in gs] for u, (_, gs) in zip(up, out)], dtype=F64))


def _exact(t, dtype):
    """A list of float values as ``dtype`` exactly, and back as float64 lists: the inputs the kernel sees."""
    return torch.tensor(t, dtype=F64).to(dtype).double().tolist()


def _assert_zero_where_masked(grad, masked, what):
    g = grad.detach().cpu()
    assert torch.isfinite(g).all(), f"{what}: non-finite gradient"
    assert (g[masked] == 0).all(), f"{what}: gradient reaches a -inf entry"


# --- 1. -inf logits and bias entries ----------------------------------------------------------------------------

# Rows over V = 10: two live entries (the issue's [0, 1, -inf]); the whole first 7-column chunk masked; one -inf in
# the middle of finite values; nothing masked.
LOGIT_ROWS = [
    [0.0, 1.0] + [-INF] * 8,
    [-INF] * 7 + [0.5, -1.0, 2.0],
    [0.3, -0.7, 1.1, -INF, 0.2, -1.4, 0.9, 0.0, -0.2, 0.6],
    [0.1, 0.4, -0.3, 1.2, -0.8, 0.5, -0.1, 0.7, 0.0, -0.6],
]
# Reference rows: -inf only where the policy row is -inf too (elsewhere the KL would be infinite), and finite
# where the policy is masked in rows 1 and 2 (a policy-only mask: those terms are 0).
REF_ROWS = [
    [0.4, -0.2] + [-INF] * 8,
    [0.1, -0.5, 0.2, 0.0, 0.3, -1.0, 0.6, -0.4, 0.8, 0.5],
    [-0.1, 0.2, 0.5, 0.7, -0.3, 0.4, -0.6, 0.1, 0.9, -0.8],
    [0.0, -0.4, 0.2, 0.6, -0.1, 0.3, 0.5, -0.7, 0.2, 0.1],
]
UP = [1.0, -0.5, 2.0, 0.75]  # upstream gradient per row
TARGETS = [1, 9, 4, 3]  # each on a live entry


def _logits(rows, dtype, device):
    return torch.tensor(rows, dtype=F64).to(dtype).to(device).requires_grad_()


def _backprop(out, x, up):
    return torch.autograd.grad((out.double() * torch.tensor(up, dtype=F64, device=out.device)).sum(), x)


@_variants("entropy", ALL_BACKENDS)
def test_entropy_of_0_1_minus_inf_is_that_of_0_1_exactly(variant_backend):
    """The issue's case: entropy([0, 1, -inf]) == entropy([0, 1]) bit for bit, its gradient (s, -s, 0)."""
    backend, device = variant_backend
    x3 = torch.tensor([[0.0, 1.0, -INF]], device=device, requires_grad=True)
    x2 = torch.tensor([[0.0, 1.0]], device=device, requires_grad=True)
    h3, h2 = ops.entropy(x3, backend=backend), ops.entropy(x2, backend=backend)
    assert torch.equal(h3, h2), f"{h3.item()!r} != {h2.item()!r}"
    g3, = torch.autograd.grad(h3.sum(), x3)
    g2, = torch.autograd.grad(h2.sum(), x2)
    assert torch.equal(g3[:, :2], g2) and g3[0, 2] == 0, (g3, g2)
    p = 1 / (1 + math.e)  # softmax([0, 1]) = (p, 1 - p)
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert_close(h3, torch.tensor([h], dtype=F64), F32, "entropy")
    # dH/dx_0 = -p (log p + H) = p (1 - p) (log(1 - p) - log p) = p (1 - p) * 1
    assert_close(g3, torch.tensor([[p * (1 - p), -p * (1 - p), 0.0]], dtype=F64), F32, "grad")


@_variants("entropy", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", (F32, F64))
@pytest.mark.parametrize("temperature", (1.0, 0.7))
def test_entropy_with_minus_inf_logits(variant_backend, dtype, temperature):
    backend, device = variant_backend
    rows = _exact(LOGIT_ROWS, dtype)
    x = _logits(rows, dtype, device)
    out = ops.entropy(x, temperature=temperature, backend=backend)
    want, want_grad = _rows(_entropy, rows, up=UP, temperature=temperature)
    assert_close(out, want, dtype, "entropy")
    grad, = _backprop(out, x, UP)
    _assert_zero_where_masked(grad, x.detach().cpu() == -INF, "entropy grad")
    assert_close(grad, want_grad, dtype, "entropy grad")


@_variants("exact_kl", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", (F32, F64))
@pytest.mark.parametrize("temperature", (1.0, 0.7))
def test_exact_kl_with_minus_inf_logits(variant_backend, dtype, temperature):
    backend, device = variant_backend
    rows, ref_rows = _exact(LOGIT_ROWS, dtype), _exact(REF_ROWS, dtype)
    x = _logits(rows, dtype, device)
    y = torch.tensor(ref_rows, dtype=dtype, device=device, requires_grad=True)
    out = ops.exact_kl(x, y, temperature=temperature, backend=backend)
    want, want_grad = _rows(_kl, rows, ref_rows, up=UP, temperature=temperature)
    assert_close(out, want, dtype, "kl")
    grad, ref_grad = torch.autograd.grad((out.double() * torch.tensor(UP, dtype=F64, device=device)).sum(), (x, y),
                                         allow_unused=True)
    assert ref_grad is None or (ref_grad == 0).all(), "exact_kl sends a gradient to ref_logits"
    _assert_zero_where_masked(grad, x.detach().cpu() == -INF, "kl grad")
    assert_close(grad, want_grad, dtype, "kl grad")


def test_exact_kl_of_a_row_against_itself_with_minus_inf_is_zero():
    """Same masked row on both sides: KL = 0 exactly on the reference (no -inf - -inf)."""
    x = torch.tensor(LOGIT_ROWS, dtype=F64, requires_grad=True)
    out = reference.exact_kl(x, x.detach())
    assert torch.equal(out, torch.zeros(len(LOGIT_ROWS), dtype=F64))
    grad, = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all() and (grad.abs() < 1e-15).all()


@_variants("logprobs", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", (F32, F64))
def test_logprobs_with_minus_inf_logits(variant_backend, dtype):
    backend, device = variant_backend
    rows = _exact(LOGIT_ROWS, dtype)
    x = _logits(rows, dtype, device)
    targets = torch.tensor(TARGETS, device=device)
    out = ops.logprobs(x, targets, temperature=0.7, backend=backend)
    want, want_grad = _rows(_logprob, rows, TARGETS, up=UP, temperature=0.7)
    assert_close(out, want, dtype, "logprobs")
    grad, = _backprop(out, x, UP)
    _assert_zero_where_masked(grad, x.detach().cpu() == -INF, "logprobs grad")
    assert_close(grad, want_grad, dtype, "logprobs grad")


# The linear ops: V = 24 with bias -inf on columns 0-15 and 20. That masks whole 7-column chunks (0-6, 7-13),
# the whole first 16-wide tile (the first vocabulary split of the fused design) and one column of a live chunk.
N_LIN, H_LIN, V_LIN = 5, 6, 24
MASKED_COLS = list(range(16)) + [20]
UP_LIN = [1.0, -0.5, 2.0, 0.75, -1.25]
TARGETS_LIN = [16, 23, 18, 21, 19]


def _linear_inputs(dtype, device, seed, mask_cols=MASKED_COLS):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N_LIN, H_LIN, generator=g, dtype=F64).to(dtype)
    w = (torch.randn(V_LIN, H_LIN, generator=g, dtype=F64) / H_LIN ** 0.5).to(dtype)
    b = torch.randn(V_LIN, generator=g, dtype=F64).to(dtype)
    b[mask_cols] = -INF
    return [t.to(device).requires_grad_() for t in (h, w, b)]


def _logits64(h, w, b):
    """hidden @ weight.T + bias in float64 from the (rounded) inputs; -inf columns stay -inf."""
    return (h.detach().double().cpu() @ w.detach().double().cpu().T + b.detach().double().cpu()).tolist()


def _linear_grads(dz, h, w):
    """From d(loss)/dlogits [N, V]: (d/dhidden, d/dweight, d/dbias) in float64."""
    h64, w64 = h.detach().double().cpu(), w.detach().double().cpu()
    return dz @ w64, dz.T @ h64, dz.sum(0)


def _check_linear_grads(got, want, dtype, what):
    for name, g, e in zip(("hidden", "weight", "bias"), got, want):
        assert_close(g, e, dtype, f"{what} grad {name}")
    for name, g in (("weight", got[1]), ("bias", got[2])):
        _assert_zero_where_masked(g, torch.tensor(MASKED_COLS), f"{what} grad {name}")


@_variants("entropy")
@pytest.mark.parametrize("dtype", (F32, F64))
def test_linear_entropy_with_minus_inf_bias(variant_backend, dtype):
    backend, device = variant_backend
    h, w, b = _linear_inputs(dtype, device, seed=1)
    out = ops.linear_entropy(h, w, bias=b, temperature=0.9, backend=backend)
    want, dz = _rows(_entropy, _logits64(h, w, b), up=UP_LIN, temperature=0.9)
    assert_close(out, want, dtype, "linear_entropy")
    got = _backprop(out, (h, w, b), UP_LIN)
    _check_linear_grads(got, _linear_grads(dz, h, w), dtype, "linear_entropy")


@_variants("exact_kl")
@pytest.mark.parametrize("dtype", (F32, F64))
@pytest.mark.parametrize("ref_mask", ("same", "none"))
def test_linear_exact_kl_with_minus_inf_bias(variant_backend, dtype, ref_mask):
    """The policy's bias masks MASKED_COLS; the reference's masks the same columns, or none."""
    backend, device = variant_backend
    h, w, b = _linear_inputs(dtype, device, seed=2)
    rh, rw, rb = _linear_inputs(dtype, device, seed=3, mask_cols=MASKED_COLS if ref_mask == "same" else [])
    out = ops.linear_exact_kl(h, w, rh, rw, bias=b, ref_bias=rb, temperature=0.9, backend=backend)
    want, dz = _rows(_kl, _logits64(h, w, b), _logits64(rh, rw, rb), up=UP_LIN, temperature=0.9)
    assert_close(out, want, dtype, "linear_exact_kl")
    got = torch.autograd.grad((out.double() * torch.tensor(UP_LIN, dtype=F64, device=device)).sum(),
                              (h, w, b, rh, rw, rb), allow_unused=True)
    _check_linear_grads(got[:3], _linear_grads(dz, h, w), dtype, "linear_exact_kl")
    for name, g in zip(("ref_hidden", "ref_weight", "ref_bias"), got[3:]):
        assert g is None or (g == 0).all(), f"linear_exact_kl sends a gradient to {name}"


@_variants("logprobs")
@pytest.mark.parametrize("dtype", (F32, F64))
def test_linear_logprobs_with_minus_inf_bias(variant_backend, dtype):
    backend, device = variant_backend
    h, w, b = _linear_inputs(dtype, device, seed=4)
    targets = torch.tensor(TARGETS_LIN, device=device)
    out = ops.linear_logprobs(h, w, targets, bias=b, temperature=0.9, backend=backend)
    want, dz = _rows(_logprob, _logits64(h, w, b), TARGETS_LIN, up=UP_LIN, temperature=0.9)
    assert_close(out, want, dtype, "linear_logprobs")
    _check_linear_grads(_backprop(out, (h, w, b), UP_LIN), _linear_grads(dz, h, w), dtype, "linear_logprobs")


@_variants("logprobs", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", (F32, F64))
def test_linear_cross_entropy_with_minus_inf_bias(variant_backend, dtype):
    backend, device = variant_backend
    h, w, b = _linear_inputs(dtype, device, seed=5)
    targets = torch.tensor(TARGETS_LIN, device=device)
    targets[2] = -100
    loss = ops.linear_cross_entropy(h, w, targets, bias=b, temperature=0.9, backend=backend)
    keep = [1.0 if t != -100 else 0.0 for t in targets.tolist()]
    lps, dz = _rows(_logprob, _logits64(h, w, b), TARGETS_LIN, up=[-k / sum(keep) for k in keep], temperature=0.9)
    loss_want = -sum(lp for lp, k in zip(lps.tolist(), keep) if k) / sum(keep)  # the ignored row's lp unused
    assert_close(loss, torch.tensor(loss_want, dtype=F64), dtype, "linear_cross_entropy")
    _check_linear_grads(torch.autograd.grad(loss, (h, w, b)), _linear_grads(dz, h, w), dtype, "linear_cross_entropy")


def test_reference_entropy_and_kl_unchanged_on_finite_inputs():
    """On finite logits (underflowing probabilities included) the reference gives what the plain formulas give."""
    g = torch.Generator().manual_seed(6)
    for dt in (F32, F64):
        x = torch.randn(6, 40, generator=g, dtype=F64).to(dt) * 3
        y = torch.randn(6, 40, generator=g, dtype=F64).to(dt) * 3
        x[0, :5] = -1e4  # p underflows to 0 while log p is finite
        logp = torch.log_softmax(x.to(reference.compute_dtype(x)), -1)
        logq = torch.log_softmax(y.to(reference.compute_dtype(y)), -1)
        assert torch.equal(reference.entropy(x), -(logp.exp() * logp).sum(-1))
        assert torch.equal(reference.exact_kl(x, y), (logp.exp() * (logp - logq)).sum(-1))


# --- 2. policy_loss: padding at positions of mask weight 0 -------------------------------------------------------

CLIP_LOW, CLIP_HIGH, KL_COEF = 0.2, 0.3, 0.1
# B = 3 sequences of T = 4; None marks a zero-weight (padding) position. Row 2 has no weight at all.
MASK_P = [[1.0, 1.0, 0.0, 0.0], [1.0, 0.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
LP_P = [[-0.5, -1.2, None, None], [-0.3, -2.0, -0.8, None], [None, None, None, None]]
# ratios exp(lp - old): row 0 (A = 1) 1.5 (clipped at 1.3) and 0.90; row 1 (A = -0.5) 1.05, then 0.6 and 0.67
# (both clipped at 0.8).
OLD_P = [[-0.5 - math.log(1.5), -1.2 + 0.1, None, None], [-0.3 - 0.05, -2.0 - math.log(0.6), -0.8 + 0.4, None],
         [None, None, None, None]]
REF_P = [[-0.4, -1.5, None, None], [-0.2, -1.7, -1.1, None], [None, None, None, None]]
ADV_P = [1.0, -0.5, 2.0]
FILL = 0.25  # what a padding position holds when that input is not the padded one


def _filled(rows, pad):
    return [[pad if v is None else v for v in r] for r in rows]


def _policy_expected(aggregation, kl, adv=ADV_P, mask=MASK_P):
    """(loss, clip_fraction, kl_mean, ratio_mean, d loss / d logprobs [B, T]) by hand, over live tokens only."""
    B, T = len(mask), len(mask[0])
    total = sum(map(sum, mask))
    row_w = [sum(r) for r in mask]
    loss_sum, stats, grad = [0.0] * B, [0.0, 0.0, 0.0], [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            w = mask[b][t]
            if w == 0:
                continue
            lp, old, ref = LP_P[b][t], OLD_P[b][t], REF_P[b][t]
            a = adv[b] if not isinstance(adv[b], list) else adv[b][t]
            r = math.exp(lp - old)
            clamped = min(max(r, 1 - CLIP_LOW), 1 + CLIP_HIGH)
            clipped = -clamped * a > -r * a
            loss, dloss, k = max(-r * a, -clamped * a), (0.0 if clipped else -r * a), 0.0
            if kl:
                d = lp - ref
                k = math.exp(-d) - 1 + d
                loss, dloss = loss + KL_COEF * k, dloss + KL_COEF * (1 - math.exp(-d))
            loss_sum[b] += w * loss
            grad[b][t] = w * dloss
            stats = [stats[0] + w * clipped, stats[1] + w * k, stats[2] + w * r]
    if aggregation == "token-mean":
        scale = [1 / total] * B
    elif aggregation == "seq-mean-token-sum":
        scale = [1 / B] * B
    else:
        scale = [1 / (B * rw) if rw > 0 else 0.0 for rw in row_w]
    loss = sum(s * l for s, l in zip(scale, loss_sum))
    grad = [[scale[b] * g for g in grad[b]] for b in range(B)]
    return (*(torch.tensor(v, dtype=F64) for v in (loss, *(s / total for s in stats))), torch.tensor(grad, dtype=F64))


AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
PADDED = ("logprobs", "old_logprobs", "ref_logprobs", "all")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("pad", (-INF, INF, math.nan), ids=("-inf", "+inf", "nan"))
@pytest.mark.parametrize("padded", PADDED)
@pytest.mark.parametrize("dtype", (F32, F64))
def test_policy_loss_ignores_padding(backend, aggregation, pad, padded, dtype):
    device = require_backend(backend, "policy_loss")

    def tensor(rows, name):
        return torch.tensor(_filled(rows, pad if padded in (name, "all") else FILL), dtype=dtype, device=device)

    lp = tensor(LP_P, "logprobs").requires_grad_()
    res = ops.policy_loss(lp, tensor(OLD_P, "old_logprobs"), torch.tensor(ADV_P, dtype=dtype, device=device),
                          torch.tensor(MASK_P, dtype=dtype, device=device), clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                          ref_logprobs=tensor(REF_P, "ref_logprobs"), kl_coef=KL_COEF, kl_estimator="k3",
                          aggregation=aggregation, backend=backend)
    grad, = torch.autograd.grad(res.loss * 3.0, lp)
    want = _policy_expected(aggregation, kl=True)
    for got, exp, what in zip((*res, grad / 3.0), want, ("loss", "clip_fraction", "kl_mean", "ratio_mean", "grad")):
        assert_close(got, exp, dtype, f"{padded}={pad} {aggregation}: {what}")
    assert (grad.cpu()[torch.tensor(MASK_P) == 0] == 0).all(), "a padding position gets a gradient"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_policy_loss_ignores_padding_with_per_token_advantages(backend, aggregation):
    """[B, T] advantages: huge (finite) values at padding positions, NaN log-probs there, no KL term."""
    device = require_backend(backend, "policy_loss")
    adv = [[a + 0.1 * t for t in range(4)] for a in ADV_P]
    adv_in = [[3e38 if MASK_P[b][t] == 0 else adv[b][t] for t in range(4)] for b in range(3)]
    adv = _exact(adv, F32)
    lp = torch.tensor(_filled(LP_P, math.nan), device=device).requires_grad_()
    res = ops.policy_loss(lp, torch.tensor(_filled(OLD_P, -INF), device=device), torch.tensor(adv_in, device=device),
                          torch.tensor(MASK_P, device=device) > 0.25, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                          aggregation=aggregation, backend=backend)
    grad, = torch.autograd.grad(res.loss, lp)
    bool_mask = [[1.0 if w > 0.25 else 0.0 for w in r] for r in MASK_P]  # every live token at weight 1
    want = _policy_expected(aggregation, kl=False, adv=adv, mask=bool_mask)
    for got, exp, what in zip((*res, grad), want, ("loss", "clip_fraction", "kl_mean", "ratio_mean", "grad")):
        assert_close(got, exp, F32, f"{aggregation}: {what}")


# --- 3. empty batches ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("shape", ((0, 4), (0, 0), (2, 0)), ids=("B0", "B0-T0", "T0"))
@pytest.mark.parametrize("kl", (False, True), ids=("no-kl", "k3"))
def test_policy_loss_empty_batch_is_zero(backend, aggregation, shape, kl):
    device = require_backend(backend, "policy_loss")
    lp = torch.zeros(shape, device=device, requires_grad=True)
    res = ops.policy_loss(lp, torch.zeros(shape, device=device), torch.zeros(shape[0], device=device),
                          torch.ones(shape, device=device), ref_logprobs=torch.zeros(shape, device=device),
                          kl_coef=KL_COEF if kl else 0.0, aggregation=aggregation, backend=backend)
    for name, value in zip(res._fields, res):
        assert value.shape == () and value.item() == 0, f"{name} = {value.item()!r}"
    grad, = torch.autograd.grad(res.loss, lp)
    assert grad.shape == lp.shape


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_policy_loss_without_any_weight_is_zero(backend, aggregation):
    """Every token of weight 0, holding NaN: the loss, the statistics and every gradient are 0."""
    device = require_backend(backend, "policy_loss")
    lp = torch.full((2, 3), math.nan, device=device, requires_grad=True)
    res = ops.policy_loss(lp, torch.full((2, 3), -INF, device=device), torch.ones(2, device=device),
                          torch.zeros(2, 3, device=device), ref_logprobs=torch.full((2, 3), INF, device=device),
                          kl_coef=KL_COEF, aggregation=aggregation, backend=backend)
    for name, value in zip(res._fields, res):
        assert value.item() == 0, f"{name} = {value.item()!r}"
    grad, = torch.autograd.grad(res.loss, lp)
    assert (grad == 0).all()


# --- 4. N = 0 in the vocabulary ops -----------------------------------------------------------------------------

def _zero_grads(out, inputs, what):
    grads = torch.autograd.grad(out.sum() * 2.0, inputs)  # raises if out carries no autograd
    for t, g in zip(inputs, grads):
        assert g.shape == t.shape and (g == 0).all(), f"{what}: non-zero gradient"


@_variants("logprobs")
@pytest.mark.parametrize("bias", (False, True))
def test_linear_logprob_ops_with_no_tokens(variant_backend, bias):
    backend, device = variant_backend
    h = torch.zeros(0, 6, device=device, requires_grad=True)
    w = torch.randn(9, 6, device=device, requires_grad=True)
    b = torch.randn(9, device=device, requires_grad=True) if bias else None
    inputs = [t for t in (h, w, b) if t is not None]
    tgt = torch.zeros(0, dtype=torch.long, device=device)
    out = ops.linear_logprobs(h, w, tgt, bias=b, backend=backend)
    assert out.shape == (0,)
    _zero_grads(out, inputs, "linear_logprobs")
    seg = ops.linear_logprobs(h, w, tgt, bias=b, segment_ids=tgt, num_segments=2, backend=backend)
    assert torch.equal(seg.segment_logprobs.cpu(), torch.zeros(2))
    _zero_grads(seg.segment_logprobs, inputs, "linear_logprobs segments")
    for reduction in ("mean", "sum"):
        loss = ops.linear_cross_entropy(h, w, tgt, bias=b, reduction=reduction, backend=backend)
        assert loss.shape == () and loss.item() == 0
        _zero_grads(loss, inputs, f"linear_cross_entropy {reduction}")


@_variants("entropy")
def test_linear_entropy_and_exact_kl_with_no_tokens(variant_backend):
    backend, device = variant_backend
    h = torch.zeros(0, 6, device=device, requires_grad=True)
    w = torch.randn(9, 6, device=device, requires_grad=True)
    b = torch.randn(9, device=device, requires_grad=True)
    _zero_grads(ops.linear_entropy(h, w, bias=b, backend=backend), [h, w, b], "linear_entropy")
    out = ops.linear_exact_kl(h, w, torch.zeros(0, 4, device=device), torch.randn(9, 4, device=device), bias=b,
                              backend=backend)
    _zero_grads(out, [h, w, b], "linear_exact_kl")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_logits_ops_with_no_tokens(backend):
    device = require_backend(backend, "logprobs")
    x = torch.zeros(0, 5, device=device, requires_grad=True)
    _zero_grads(ops.logprobs(x, torch.zeros(0, dtype=torch.long, device=device), backend=backend), [x], "logprobs")
    _zero_grads(ops.entropy(x, backend=backend), [x], "entropy")
    _zero_grads(ops.exact_kl(x, torch.zeros(0, 5, device=device), backend=backend), [x], "exact_kl")


# --- 5. policy_loss sends gradients to logprobs only --------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("adv_layout", ("seq", "token"))
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_policy_loss_gradient_reaches_logprobs_only(backend, adv_layout, aggregation):
    device = require_backend(backend, "policy_loss")
    lp = torch.tensor(_exact(_filled(LP_P, FILL), F32), device=device, requires_grad=True)
    old = torch.tensor(_filled(OLD_P, FILL), device=device, requires_grad=True)
    ref = torch.tensor(_filled(REF_P, FILL), device=device, requires_grad=True)
    adv_rows = ADV_P if adv_layout == "seq" else [[a] * 4 for a in ADV_P]
    adv = torch.tensor(adv_rows, device=device, requires_grad=True)
    mask = torch.tensor(MASK_P, device=device, requires_grad=True)
    res = ops.policy_loss(lp, old, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, ref_logprobs=ref,
                          kl_coef=KL_COEF, aggregation=aggregation, backend=backend)
    grads = torch.autograd.grad(res.loss, (lp, old, adv, ref, mask), allow_unused=True, retain_graph=True)
    for name, g in zip(("old_logprobs", "advantages", "ref_logprobs", "mask"), grads[1:]):
        assert g is None or (g == 0).all(), f"policy_loss sends a gradient to {name}: {g}"
    assert_close(grads[0], _policy_expected(aggregation, kl=True)[-1], F32, "grad logprobs")
    for name, stat in zip(res._fields[1:], res[1:]):  # the statistics carry no gradient to anything
        if stat.requires_grad:
            g = torch.autograd.grad(stat, (lp, old, adv, ref, mask), allow_unused=True, retain_graph=True)
            assert all(x is None or (x == 0).all() for x in g), f"{name} carries a gradient"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_policy_loss_statistics_when_the_total_weight_is_below_one(backend):
    """One token of weight 0.5, clipped: the statistics are means over the weights (clip fraction 1, the
    token's ratio and KL), not sums divided by max(total, 1)."""
    device = require_backend(backend, "policy_loss")
    lp = torch.tensor([[math.log(1.5), math.nan]], device=device, requires_grad=True)
    res = ops.policy_loss(lp, torch.tensor([[0.0, math.nan]], device=device), torch.tensor([1.0], device=device),
                          torch.tensor([[0.5, 0.0]], device=device), clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                          ref_logprobs=torch.tensor([[0.0, -INF]], device=device), kl_coef=KL_COEF,
                          backend=backend)
    d = math.log(1.5)
    k3 = math.exp(-d) - 1 + d
    for got, exp, what in zip(res, (-1.3 + KL_COEF * k3, 1.0, k3, 1.5), res._fields):
        assert_close(got, torch.tensor(exp, dtype=F64), F32, what)
    grad, = torch.autograd.grad(res.loss, lp)  # clipped: only the KL term's slope, 1 - exp(-d), on weight 0.5 / 0.5
    assert_close(grad, torch.tensor([[KL_COEF * (1 - math.exp(-d)), 0.0]], dtype=F64), F32, "grad")

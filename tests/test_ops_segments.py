"""Segment and mask edges on every backend, against float64 values computed here without calling into ra3.

segment_sum and the per-segment log-probs: every segment filled (the last id num_segments - 1 included), empty
segments in the middle and at the end, unordered ids, negative (ignored) ids. policy_loss: fractional float mask
weights (0.25, 0.5, 1, 0), a sequence with no weight, zero-weight tokens holding extreme or non-finite padding.
Forward and backward.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import ALL_BACKENDS, assert_close, require_backend
from ra3 import ops

F64 = torch.float64

# (ids, num_segments): the cases every segment op runs
SEGMENT_CASES = {
    "all-filled": ([2, 0, 1, 2, 1, 0, 2], 3),
    "last-only": ([4, 4, 4], 5),  # only the last segment holds anything
    "empty-middle": ([0, 0, 4, 4, 0, 4], 5),  # 1, 2, 3 empty; 4 = num_segments - 1 filled
    "unordered": ([3, 1, 0, 3, 2, 1, 0, 2], 4),
    "negative-ids": ([-1, 0, -5, 2, 2, -1, 0], 3),  # negatives in no segment; 1 empty, 2 (the last) filled
    "all-negative": ([-1, -1, -3], 2),
    "empty-tail": ([1, 0, 1], 4),  # 2, 3 empty
    "one-segment": ([0, 0, 0, 0], 1),
    # more ids than one Triton block (1024): the last segment is filled in the second block only
    "two-blocks": ([(i * 7) % 5 - 1 if i < 1030 else 4 for i in range(1100)], 5),
}


def _values(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=F64) + 0.25


def _segment_sums(values, ids, num_segments):
    """Python loop in float64: out[k] = sum of values[i] with ids[i] == k, negatives skipped."""
    out = [0.0] * num_segments
    for v, k in zip(values, ids):
        if k >= 0:
            out[k] += v
    return torch.tensor(out, dtype=F64)


def _segment_grad(up, ids):
    """d sum(out * up) / d values: up of the value's segment, 0 for a negative id."""
    return torch.tensor([up[k] if k >= 0 else 0.0 for k in ids], dtype=F64)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", list(SEGMENT_CASES))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_segment_sum_edges(backend, case, dtype):
    device = require_backend(backend, "segment_sum")
    ids, num = SEGMENT_CASES[case]
    values = _values(len(ids), seed=len(ids)).to(dtype)
    x = values.to(device).requires_grad_()
    out = ops.segment_sum(x, torch.tensor(ids, device=device), num, backend=backend)
    want = _segment_sums(values.double().tolist(), ids, num)
    assert out.shape == (num,)
    assert_close(out, want, dtype, f"{case} sums")
    for k in range(num):
        if k not in ids:
            assert out[k] == 0, f"{case}: empty segment {k} holds {float(out[k])}"
    assert out[num - 1] != 0 or (num - 1) not in ids, f"{case}: the last segment was dropped"
    up = torch.arange(1, num + 1, dtype=F64) * 0.5 - 1.25
    grad = torch.autograd.grad((out.double() * up.to(device)).sum(), x)[0]
    assert_close(grad, _segment_grad(up.tolist(), ids), dtype, f"{case} grad")


# --- per-segment log-probs -------------------------------------------------------------------------------------------

LOGPROB_CASES = {k: SEGMENT_CASES[k] for k in ("all-filled", "last-only", "empty-middle", "unordered",
                                                "negative-ids", "empty-tail")}
VOCAB, HIDDEN = 10, 3


def _logprob_inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, HIDDEN, generator=g, dtype=F64)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=F64)
    bias = torch.randn(VOCAB, generator=g, dtype=F64) * 0.5
    targets = torch.randint(0, VOCAB, (n,), generator=g)
    targets[1 % n] = -100  # an ignored token inside a segment
    return hidden, weight, bias, targets


def _expected_segment_logprobs(logits, targets, ids, num, temperature):
    """Token log-probs from torch.log_softmax in float64, summed per segment with a 0/1 matrix (differentiable)."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    keep = targets != -100
    tok = torch.where(keep, logp.gather(1, targets.clamp_min(0)[:, None])[:, 0], torch.zeros_like(logp[:, 0]))
    onehot = torch.tensor([[1.0 if k == s else 0.0 for k in ids] for s in range(num)], dtype=F64)
    return tok, onehot @ tok


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", list(LOGPROB_CASES))
def test_linear_logprobs_segments(backend, case, small_chunks):
    device = require_backend(backend, "logprobs")
    ids, num = LOGPROB_CASES[case]
    hidden, weight, bias, targets = _logprob_inputs(len(ids), seed=num)
    h, w, b = (t.float().to(device).requires_grad_() for t in (hidden, weight, bias))
    res = ops.linear_logprobs(h, w, targets.to(device), bias=b, temperature=0.8,
                              segment_ids=torch.tensor(ids, device=device), num_segments=num, backend=backend)
    h64, w64, b64 = (t.float().double().requires_grad_() for t in (hidden, weight, bias))
    tok, seg = _expected_segment_logprobs(h64 @ w64.T + b64, targets, ids, num, 0.8)
    assert_close(res.token_logprobs, tok, torch.float32, f"{case} token logprobs")
    assert_close(res.segment_logprobs, seg, torch.float32, f"{case} segment logprobs")
    for k in range(num):
        if k not in ids:
            assert res.segment_logprobs[k] == 0, f"{case}: empty segment {k}"
    up = torch.linspace(-1.0, 2.0, num, dtype=F64)
    got = torch.autograd.grad((res.segment_logprobs.double() * up.to(device)).sum(), (h, w, b))
    exp = torch.autograd.grad((seg * up).sum(), (h64, w64, b64))
    for g_got, g_exp, what in zip(got, exp, ("hidden", "weight", "bias")):
        assert_close(g_got, g_exp, torch.float32, f"{case} grad {what}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", ("all-filled", "empty-middle", "negative-ids"))
def test_logprobs_segments(backend, case, small_chunks):
    device = require_backend(backend, "logprobs")
    ids, num = SEGMENT_CASES[case]
    hidden, weight, _, targets = _logprob_inputs(len(ids), seed=7)
    logits = (hidden @ weight.T).float()
    x = logits.to(device).requires_grad_()
    res = ops.logprobs(x, targets.to(device), temperature=1.5, segment_ids=torch.tensor(ids, device=device),
                       num_segments=num, backend=backend)
    x64 = logits.double().requires_grad_()
    tok, seg = _expected_segment_logprobs(x64, targets, ids, num, 1.5)
    assert_close(res.token_logprobs, tok, torch.float32, f"{case} token logprobs")
    assert_close(res.segment_logprobs, seg, torch.float32, f"{case} segment logprobs")
    up = torch.linspace(0.5, -1.5, num, dtype=F64)
    g_got = torch.autograd.grad((res.segment_logprobs.double() * up.to(device)).sum(), x)[0]
    g_exp = torch.autograd.grad((seg * up).sum(), x64)[0]
    assert_close(g_got, g_exp, torch.float32, f"{case} grad logits")


# --- policy loss with fractional mask weights ------------------------------------------------------------------------
# Ratios chosen away from the clip edges (0.8 and 1.28) so float32 rounding cannot flip a token's clipped state.
RATIOS = [[1.5, 0.5, 1.1, 0.7, 1.35], [0.6, 1.2, 3.0, 0.9, 1.4], [1.0, 0.5, 2.0, 0.95, 1.05]]
OLD = [[-0.5, -1.0, -2.0, -0.1, -0.7], [-1.5, -0.3, -0.2, -0.9, -1.1], [-0.4, -0.6, -0.8, -1.0, -1.2]]
REF = [[-0.9, -1.4, -1.6, 0.2, -0.2], [-1.0, -0.5, -3.0, -0.6, -1.5], [-0.3, -0.9, -0.5, -0.8, -1.0]]
ADV_SEQ = [1.5, -0.75, 2.0]
ADV_TOK = [[1.5, -0.5, 2.0, 1.0, -1.0], [-0.75, 0.25, -3.0, 1.5, -2.0], [2.0, 2.0, -1.0, 0.5, 0.1]]
# Fractional weights; row 2 has no weight at all; the 0-weight token in row 0 has a ratio far out of the range and
# the one in row 1 a huge per-token advantage, so a kernel that reads a 0 weight as 1 gets a very different loss.
MASK = [[0.25, 0.5, 1.0, 0.0, 0.75], [1.0, 0.25, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
CLIP_LOW, CLIP_HIGH, KL_COEF = 0.2, 0.28, 0.3


def _lp():
    return [[o + math.log(r) for o, r in zip(orow, rrow)] for orow, rrow in zip(OLD, RATIOS)]


def _expected_policy(lp, old, adv, ref, mask, aggregation, kl):
    """(loss, clip_fraction, kl_mean, ratio_mean, grad) in float64 from Python lists; mask entries are weights."""
    B, T = len(lp), len(lp[0])
    loss_tok, dloss, clipped, kls, ratios = ([[0.0] * T for _ in range(B)] for _ in range(5))
    for b in range(B):
        for t in range(T):
            a = adv[b][t] if isinstance(adv[b], list) else adv[b]
            r = math.exp(lp[b][t] - old[b][t])
            unclipped = -r * a
            clipped_term = -min(max(r, 1 - CLIP_LOW), 1 + CLIP_HIGH) * a
            is_clipped = clipped_term > unclipped
            d = lp[b][t] - ref[b][t]
            k, dk = {None: (0.0, 0.0), "k1": (d, 1.0), "k2": (0.5 * d * d, d),
                     "k3": (math.exp(-d) - 1 + d, 1 - math.exp(-d))}[kl]
            loss_tok[b][t] = max(unclipped, clipped_term) + KL_COEF * k
            dloss[b][t] = (0.0 if is_clipped else unclipped) + KL_COEF * dk
            clipped[b][t], kls[b][t], ratios[b][t] = float(is_clipped), k, r
    row_w = [sum(row) for row in mask]
    total = sum(row_w)
    if aggregation == "token-mean":
        scale = [1 / total] * B
    elif aggregation == "seq-mean-token-sum":
        scale = [1 / B] * B
    else:  # a row without weight contributes 0 (its sum is 0) but still counts in B
        scale = [1 / (B * w) if w > 0 else 0.0 for w in row_w]

    def masked_mean(vals):
        return sum(mask[b][t] * vals[b][t] for b in range(B) for t in range(T)) / total

    loss = sum(scale[b] * mask[b][t] * loss_tok[b][t] for b in range(B) for t in range(T))
    grad = [[scale[b] * mask[b][t] * dloss[b][t] for t in range(T)] for b in range(B)]
    return (torch.tensor(loss, dtype=F64), torch.tensor(masked_mean(clipped), dtype=F64),
            torch.tensor(masked_mean(kls), dtype=F64), torch.tensor(masked_mean(ratios), dtype=F64),
            torch.tensor(grad, dtype=F64))


def _as_floats(t):
    return t.double().tolist()


def _run_policy(backend, device, dtype, lp, adv, mask, aggregation, kl):
    x = torch.tensor(lp, dtype=dtype, device=device).requires_grad_()
    res = ops.policy_loss(x, torch.tensor(OLD, dtype=dtype, device=device),
                          torch.tensor(adv, dtype=dtype, device=device), torch.tensor(mask, dtype=dtype, device=device),
                          clip_low=CLIP_LOW, clip_high=CLIP_HIGH, aggregation=aggregation,
                          ref_logprobs=None if kl is None else torch.tensor(REF, dtype=dtype, device=device),
                          kl_coef=0.0 if kl is None else KL_COEF, kl_estimator=kl or "k3", backend=backend)
    return res, torch.autograd.grad(res.loss * 2.0, x)[0] / 2.0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("aggregation", ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"))
@pytest.mark.parametrize("kl", (None, "k3", "k2"), ids=("no-kl", "k3", "k2"))
@pytest.mark.parametrize("adv_layout", ("seq", "token"))
def test_policy_loss_fractional_mask(backend, aggregation, kl, adv_layout):
    device = require_backend(backend, "policy_loss")
    dtype = torch.float32
    adv = ADV_SEQ if adv_layout == "seq" else ADV_TOK
    lp = _as_floats(torch.tensor(_lp(), dtype=dtype))  # the float32 inputs, exactly, as float64 lists
    old, ref = _as_floats(torch.tensor(OLD, dtype=dtype)), _as_floats(torch.tensor(REF, dtype=dtype))
    adv32 = _as_floats(torch.tensor(adv, dtype=dtype))
    want = _expected_policy(lp, old, adv32, ref, MASK, aggregation, kl)
    res, grad = _run_policy(backend, device, dtype, _lp(), adv, MASK, aggregation, kl)
    for got, exp, what in zip((*res, grad), want, ("loss", "clip_fraction", "kl_mean", "ratio_mean", "grad")):
        assert_close(got, exp, dtype, f"{aggregation} {kl} {adv_layout}: {what}")
    assert (grad[2] == 0).all() and grad[0, 3] == 0 and grad[1, 2] == 0  # no weight, no gradient


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("aggregation", ("token-mean", "seq-mean-token-mean"))
def test_policy_loss_fractional_mask_float64(backend, aggregation):
    device = require_backend(backend, "policy_loss")
    want = _expected_policy(_lp(), OLD, ADV_TOK, REF, MASK, aggregation, "k3")
    res, grad = _run_policy(backend, device, F64, _lp(), ADV_TOK, MASK, aggregation, "k3")
    for got, exp, what in zip((*res, grad), want, ("loss", "clip_fraction", "kl_mean", "ratio_mean", "grad")):
        assert_close(got, exp, F64, f"{aggregation} float64: {what}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_policy_loss_mask_weight_scales_a_token(backend):
    """One token at weight 0.5 counts as half a token: token-mean = (l0 + 0.5 l1) / 1.5, for any backend."""
    device = require_backend(backend, "policy_loss")
    lp = [[math.log(1.1), math.log(0.9)]]  # inside the clip range: l = -r A
    x = torch.tensor(lp, device=device).requires_grad_()
    res = ops.policy_loss(x, torch.zeros(1, 2, device=device), torch.tensor([[2.0, -1.0]], device=device),
                          torch.tensor([[1.0, 0.5]], device=device), backend=backend)
    l0, l1 = -1.1 * 2.0, -0.9 * -1.0
    assert_close(res.loss, torch.tensor((l0 + 0.5 * l1) / 1.5, dtype=F64), torch.float32, "loss")
    assert_close(res.ratio_mean, torch.tensor((1.1 + 0.5 * 0.9) / 1.5, dtype=F64), torch.float32, "ratio_mean")
    grad = torch.autograd.grad(res.loss, x)[0]
    assert_close(grad, torch.tensor([[l0 / 1.5, 0.5 * l1 / 1.5]], dtype=F64), torch.float32, "grad")


PADDING = {"-inf": -math.inf, "nan": math.nan, "+30": 30.0}
# Every backend, the torch reference included, selects zero-weight tokens away before any arithmetic.
PADDING_CASES = [pytest.param(backend, padding, id=f"{padding}-{backend}")
                 for padding in PADDING for backend in ALL_BACKENDS]


@pytest.mark.parametrize(("backend", "padding"), PADDING_CASES)
def test_policy_loss_zero_weight_padding_is_ignored(backend, padding):
    """Tokens of weight 0 holding padding log-probs (-inf, NaN, a huge value) change nothing, forward or backward."""
    device = require_backend(backend, "policy_loss")
    lp = _lp()
    for b in range(3):
        for t in range(5):
            if MASK[b][t] == 0:
                lp[b][t] = PADDING[padding]
    want = _expected_policy(_as_floats(torch.tensor(_lp())), _as_floats(torch.tensor(OLD)), ADV_SEQ,
                            _as_floats(torch.tensor(REF)), MASK, "token-mean", "k3")
    res, grad = _run_policy(backend, device, torch.float32, lp, ADV_SEQ, MASK, "token-mean", "k3")
    for got, exp, what in zip((*res, grad), want, ("loss", "clip_fraction", "kl_mean", "ratio_mean", "grad")):
        assert_close(got, exp, torch.float32, f"padding {padding}: {what}")

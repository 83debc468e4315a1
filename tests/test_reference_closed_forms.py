"""The reference ops (``ra3.ops.reference``, which is also the ``torch`` backend) against closed forms derived by hand.

Every backend test compares with ``reference``, so a wrong reference formula would pass them all. Here each expected
value is written out from the math (small explicit numbers, ``math.log`` / ``math.exp`` on Python floats), never by
calling into ra3, and the gradients are checked three ways: a hand-derived derivative, a central finite difference
written here, and ``torch.autograd.gradcheck``.
"""
from __future__ import annotations

import math

import pytest
import torch

from ra3 import ops
from ra3.ops import reference

F64 = torch.float64
TOL = 1e-12  # float64 closed forms: the only error is rounding


def _t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def _close(actual, expected, what="", tol=TOL):
    """Elementwise |actual - expected| <= tol * (1 + |expected|); ``expected`` a float or (nested) list of floats."""
    a = torch.as_tensor(actual, dtype=F64) if isinstance(actual, float) else actual.detach().double()
    e = torch.as_tensor(expected, dtype=F64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err = ((a - e).abs() / (1 + e.abs())).max().item() if e.numel() else 0.0
    assert err <= tol, f"{what}: got {a.tolist()}, expected {e.tolist()} (relative error {err:.3e})"


def _central_difference(f, x, h=1e-6):
    """d sum(f(x)) / dx by central differences, one coordinate at a time, in float64 (no autograd)."""
    x = x.detach().clone()
    grad = torch.zeros_like(x)
    flat, gflat = x.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        orig = flat[i].item()
        flat[i] = orig + h
        hi = float(f(x).sum())
        flat[i] = orig - h
        lo = float(f(x).sum())
        flat[i] = orig
        gflat[i] = (hi - lo) / (2 * h)
    return grad


def _autograd(f, x):
    x = x.detach().clone().requires_grad_()
    return torch.autograd.grad(f(x).sum(), x)[0]


# Each reference op reached two ways: the module function, and the public op with backend="torch".
KL_IMPLS = {
    "reference": lambda lp, ref, est: reference.kl(lp, ref, est),
    "ops-torch": lambda lp, ref, est: ops.kl(lp, ref, est, backend="torch"),
}


# --- KL estimators ---------------------------------------------------------------------------------------------------
# kl(logprobs, ref_logprobs): logprobs are the policy's (the sampling distribution pi), ref_logprobs the reference's.
# With log r = ref - logprobs (r = pi_ref / pi): k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r.

@pytest.mark.parametrize("impl", KL_IMPLS)
def test_kl_estimators_closed_form(impl):
    lp = [-0.5, -2.0, -1.0, -0.25]
    ref = [-1.5, -1.0, -1.0, -3.0]
    got = {est: KL_IMPLS[impl](_t(lp), _t(ref), est) for est in ("k1", "k2", "k3")}
    k1 = [p - q for p, q in zip(lp, ref)]
    _close(got["k1"], k1, "k1")
    _close(got["k2"], [0.5 * d * d for d in k1], "k2")
    k3 = [math.exp(q - p) - 1 - (q - p) for p, q in zip(lp, ref)]
    _close(got["k3"], k3, "k3")
    # The numbers spelled out: d = +1 gives e^-1 (0.3679), d = -1 gives e - 2 (0.7183), d = 0 gives 0.
    _close(got["k3"][:3], [math.exp(-1.0), math.e - 2.0, 0.0], "k3 spelled out")


@pytest.mark.parametrize("impl", KL_IMPLS)
def test_kl_k3_is_not_symmetric_in_its_arguments(impl):
    """k3 with the policy and the reference swapped is a different number: the argument order is part of the spec."""
    lp, ref = _t([-0.5]), _t([-1.5])  # d = logprobs - ref_logprobs = 1
    got = KL_IMPLS[impl](lp, ref, "k3")
    _close(got, [math.exp(-1.0) - 1 + 1], "k3(pi, pi_ref)")  # exp(-d) - 1 + d = 0.3679
    swapped = math.exp(1.0) - 1 - 1  # what exp(d) - 1 - d would give: 0.7183
    assert abs(float(got[0]) - swapped) > 0.3


@pytest.mark.parametrize("impl", KL_IMPLS)
def test_kl_estimators_average_to_the_exact_kl(impl):
    """Averaged over tokens drawn from pi (here: weighted by pi over the whole support), k1 and k3 give KL(pi||ref)."""
    p = [0.5, 0.3, 0.2]
    q = [0.2, 0.2, 0.6]
    kl_pq = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # 0.2332...
    kl_qp = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    assert abs(kl_pq - kl_qp) > 0.01  # the direction matters for these numbers
    lp, lq = _t([math.log(x) for x in p]), _t([math.log(x) for x in q])
    for est in ("k1", "k3"):
        expectation = float((_t(p) * KL_IMPLS[impl](lp, lq, est)).sum())
        _close(expectation, kl_pq, f"E_pi[{est}]")


def test_kl_estimators_hand_gradients():
    """d k1/d lp = 1, d k2/d lp = d, d k3/d lp = 1 - exp(-d); each minus that for ref_logprobs."""
    lp, ref = _t([-0.5, -2.0, -0.1]), _t([-1.5, -1.0, -0.7])
    d = [p - q for p, q in zip(lp.tolist(), ref.tolist())]
    want = {"k1": [1.0] * 3, "k2": d, "k3": [1 - math.exp(-x) for x in d]}
    for est, w in want.items():
        a, b = lp.clone().requires_grad_(), ref.clone().requires_grad_()
        ga, gb = torch.autograd.grad(reference.kl(a, b, est).sum(), (a, b))
        _close(ga, w, f"{est} d/dlogprobs")
        _close(gb, [-x for x in w], f"{est} d/dref_logprobs")


# --- group advantages ------------------------------------------------------------------------------------------------

def _by_hand(rewards, groups, mode, eps):
    """Group-relative advantages from plain Python lists: std (GRPO, unbiased std, eps outside the sqrt), mean, rloo."""
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(rewards[i])
    out = []
    for r, g in zip(rewards, groups):
        xs = members[g]
        n, m = len(xs), sum(xs) / len(xs)
        if mode == "none":
            out.append(r)
        elif mode == "mean":
            out.append(r - m)
        elif mode == "rloo":
            out.append(r - (sum(xs) - r) / (n - 1) if n > 1 else 0.0)
        else:
            std = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
            out.append((r - m) / (std + eps))
    return out


GROUP_IMPLS = {
    "reference": lambda r, ids, n, mode, eps: reference.group_advantages(r, ids, n, mode, eps),
    "ops-torch-group_ids": lambda r, ids, n, mode, eps: ops.group_advantages(r, group_ids=ids, normalize=mode,
                                                                            eps=eps, backend="torch"),
}


@pytest.mark.parametrize("impl", GROUP_IMPLS)
@pytest.mark.parametrize("mode", ("std", "mean", "rloo", "none"))
def test_group_advantages_closed_form_group_ids(impl, mode):
    rewards = [1.0, 0.0, 3.0, 2.0, 5.0, 0.5, 7.0, 4.0]
    groups = [2, 0, 2, 0, 1, 2, 3, 0]  # unordered, unequal sizes; groups 1 and 3 hold one sample each
    got = GROUP_IMPLS[impl](_t(rewards), torch.tensor(groups), 4, mode, 0.5)
    _close(got, _by_hand(rewards, groups, mode, 0.5), mode)
    if mode in ("std", "mean", "rloo"):
        assert got[4] == 0 and got[6] == 0  # a sample alone in its group has no advantage


@pytest.mark.parametrize("mode", ("std", "mean", "rloo", "none"))
def test_group_advantages_closed_form_group_size(mode):
    rewards = [1.0, 2.0, 4.0, 0.0, 0.0, 3.0, 2.0, 2.0, 2.0]
    got = ops.group_advantages(_t(rewards), group_size=3, normalize=mode, eps=1e-6, backend="torch")
    _close(got, _by_hand(rewards, [0, 0, 0, 1, 1, 1, 2, 2, 2], mode, 1e-6), mode)


def test_group_advantages_spelled_out():
    """Group [1, 2, 4]: mean 7/3, centred [-4/3, -1/3, 5/3], unbiased var (16 + 1 + 25) / 9 / 2 = 7/3."""
    r = _t([1.0, 2.0, 4.0])
    ids = torch.zeros(3, dtype=torch.long)
    centred = [-4 / 3, -1 / 3, 5 / 3]
    std = math.sqrt(7 / 3)
    _close(reference.group_advantages(r, ids, 1, "mean", 0.5), centred, "mean")
    _close(reference.group_advantages(r, ids, 1, "rloo", 0.5), [1 - 3.0, 2 - 2.5, 4 - 1.5], "rloo")
    _close(reference.group_advantages(r, ids, 1, "std", 0.5), [c / (std + 0.5) for c in centred], "std")
    _close(reference.group_advantages(r, ids, 1, "none", 0.5), [1.0, 2.0, 4.0], "none")


@pytest.mark.parametrize("impl", GROUP_IMPLS)
def test_group_advantages_eps_is_added_to_the_std_not_the_variance(impl):
    """(r - mean) / (std + eps), not (r - mean) / sqrt(var + eps): with eps = 0.5 the two differ by ~17%."""
    r = _t([1.0, 2.0, 4.0])
    got = GROUP_IMPLS[impl](r, torch.zeros(3, dtype=torch.long), 1, "std", 0.5)
    outside = [c / (math.sqrt(7 / 3) + 0.5) for c in (-4 / 3, -1 / 3, 5 / 3)]
    inside = [c / math.sqrt(7 / 3 + 0.5) for c in (-4 / 3, -1 / 3, 5 / 3)]
    _close(got, outside, "eps outside the sqrt")
    assert abs(float(got[2]) - inside[2]) > 0.1


def test_group_advantages_equal_rewards_give_zero_not_nan():
    """A group whose rewards are all equal has std 0: 0 / (0 + eps) = 0 for eps > 0, and mean / rloo are 0 outright.

    (With eps = 0 such a group's std advantages are 0 / 0 = NaN on every backend; the wrappers accept eps = 0.)
    """
    r = _t([3.0, 3.0, 3.0, 1.0, 2.0])
    ids = torch.tensor([0, 0, 0, 1, 1])
    for mode, eps in (("std", 0.5), ("std", 1e-6), ("mean", 0.0), ("rloo", 0.0)):
        got = reference.group_advantages(r, ids, 2, mode, eps)
        assert (got[:3] == 0).all(), (mode, eps, got)
    _close(reference.group_advantages(r, ids, 2, "std", 0.0)[3:], [-0.5 / math.sqrt(0.5), 0.5 / math.sqrt(0.5)])


# --- policy loss -----------------------------------------------------------------------------------------------------
# Two sequences of four tokens, old_logprobs = 0 so the ratio is exp(logprobs); clip_low 0.2, clip_high 0.3 (range
# [0.8, 1.3]). Per token, loss = max(-r A, -clip(r) A); the clipped branch is active (no gradient) when it is larger.
#   row 0, A = +1: r 1.5 -> -1.3 clipped (high side) | 0.5 -> -0.5 | 1.25 -> -1.25 (would clip if clip_high were 0.2)
#                  | 1.0 masked out
#   row 1, A = -2: r 0.5 -> 1.6 clipped (low side) | 1.5 -> 3.0 | 0.75 -> 1.6 clipped (not if clip_low were 0.3)
#                  | 0.9 -> 1.8
RATIOS = [[1.5, 0.5, 1.25, 1.0], [0.5, 1.5, 0.75, 0.9]]
ADV = [1.0, -2.0]
MASK = [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
PER_TOKEN = [[-1.3, -0.5, -1.25, -1.0], [1.6, 3.0, 1.6, 1.8]]
CLIPPED = [[True, False, False, False], [True, False, True, False]]
REF = [[-0.1, -1.0, 0.3, 5.0], [-0.5, 0.2, -0.6, 0.0]]  # ref logprobs for the KL term; the masked one is extreme
KL_COEF = 0.1


def _lp():
    return _t([[math.log(r) for r in row] for row in RATIOS])


def _k3(lp, ref):
    return math.exp(ref - lp) - 1 + lp - ref


def _expected_policy(aggregation, with_kl):
    """(loss, clip_fraction, kl_mean, ratio_mean, d loss / d logprobs) by hand."""
    lp = [[math.log(r) for r in row] for row in RATIOS]
    kl = [[_k3(lp[b][t], REF[b][t]) if with_kl else 0.0 for t in range(4)] for b in range(2)]
    tok = [[PER_TOKEN[b][t] + KL_COEF * kl[b][t] for t in range(4)] for b in range(2)]
    # d per-token / d lp: -r A where unclipped, 0 where clipped; KL term k3' = 1 - exp(ref - lp)
    dtok = [[(0.0 if CLIPPED[b][t] else -RATIOS[b][t] * ADV[b])
             + (KL_COEF * (1 - math.exp(REF[b][t] - lp[b][t])) if with_kl else 0.0) for t in range(4)]
            for b in range(2)]
    total = sum(map(sum, MASK))  # 7 tokens
    if aggregation == "token-mean":
        scale = [1 / total, 1 / total]
    elif aggregation == "seq-mean-token-sum":
        scale = [1 / 2, 1 / 2]
    else:
        scale = [1 / (2 * sum(MASK[b])) for b in range(2)]
    loss = sum(scale[b] * MASK[b][t] * tok[b][t] for b in range(2) for t in range(4))
    grad = [[scale[b] * MASK[b][t] * dtok[b][t] for t in range(4)] for b in range(2)]
    clip_fraction = sum(MASK[b][t] * CLIPPED[b][t] for b in range(2) for t in range(4)) / total
    kl_mean = sum(MASK[b][t] * kl[b][t] for b in range(2) for t in range(4)) / total
    ratio_mean = sum(MASK[b][t] * RATIOS[b][t] for b in range(2) for t in range(4)) / total
    return loss, clip_fraction, kl_mean, ratio_mean, grad


def _policy(impl, lp, aggregation, with_kl, **kw):
    args = (lp, torch.zeros(2, 4, dtype=F64), _t(ADV), _t(MASK))
    kw = dict(clip_low=0.2, clip_high=0.3, aggregation=aggregation, ref_logprobs=_t(REF) if with_kl else None,
              kl_coef=KL_COEF if with_kl else 0.0, kl_estimator="k3", **kw)
    if impl == "reference":
        return reference.policy_loss(*args, **kw)
    return tuple(ops.policy_loss(*args, backend="torch", **kw))


AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def test_policy_loss_table_spelled_out():
    """The hand table above, as totals: 7 masked tokens, rows sum to -3.05 and 8.0, 3 of them clipped."""
    loss, clip_fraction, kl_mean, ratio_mean, _ = _expected_policy("token-mean", False)
    assert abs(loss - 4.95 / 7) < 1e-12 and abs(clip_fraction - 3 / 7) < 1e-12 and kl_mean == 0
    assert abs(ratio_mean - 6.9 / 7) < 1e-12
    assert abs(_expected_policy("seq-mean-token-mean", False)[0] - (-3.05 / 3 + 8.0 / 4) / 2) < 1e-12


@pytest.mark.parametrize("impl", ("reference", "ops-torch"))
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("with_kl", (False, True), ids=("no-kl", "kl"))
def test_policy_loss_closed_form(impl, aggregation, with_kl):
    lp = _lp().requires_grad_()
    loss, clip_fraction, kl_mean, ratio_mean = _policy(impl, lp, aggregation, with_kl)
    e_loss, e_clip, e_kl, e_ratio, e_grad = _expected_policy(aggregation, with_kl)
    _close(loss, e_loss, "loss")
    _close(clip_fraction, e_clip, "clip_fraction")
    _close(kl_mean, e_kl, "kl_mean")
    _close(ratio_mean, e_ratio, "ratio_mean")
    _close(torch.autograd.grad(loss, lp)[0], e_grad, "d loss / d logprobs")


def test_policy_loss_clip_sides_are_not_interchangeable():
    """clip_low bounds the ratio from below, clip_high from above: swapping them changes the loss of the table."""
    lp = _lp()
    loss = _policy("reference", lp, "token-mean", False)[0]
    swapped = reference.policy_loss(lp, torch.zeros(2, 4, dtype=F64), _t(ADV), _t(MASK), clip_low=0.3,
                                    clip_high=0.2)[0]
    _close(loss, 4.95 / 7, "clip_low 0.2, clip_high 0.3")
    # swapped: row 0 r 1.25 clips to -1.2, r 1.5 to -1.2; row 1 r 0.5 clips to 1.4, r 0.75 no longer clips (1.5)
    _close(swapped, (-1.2 - 0.5 - 1.2 + 1.4 + 3.0 + 1.5 + 1.8) / 7, "clip_low 0.3, clip_high 0.2")


def test_policy_loss_per_token_advantages_closed_form():
    """advantages [B, T] equal to the per-row ones give the same loss; a changed masked entry changes nothing."""
    lp = _lp()
    adv = _t([[1.0, 1.0, 1.0, 100.0], [-2.0, -2.0, -2.0, -2.0]])
    loss = reference.policy_loss(lp, torch.zeros(2, 4, dtype=F64), adv, _t(MASK), clip_low=0.2, clip_high=0.3)[0]
    _close(loss, 4.95 / 7, "per-token advantages")


def test_policy_loss_empty_mask_is_zero():
    lp = _lp().requires_grad_()
    for aggregation in AGGREGATIONS:
        res = reference.policy_loss(lp, torch.zeros(2, 4, dtype=F64), _t(ADV), torch.zeros(2, 4, dtype=F64),
                                    aggregation=aggregation)
        assert [float(x.detach()) for x in res] == [0.0, 0.0, 0.0, 0.0], aggregation
        assert (torch.autograd.grad(res[0], lp)[0] == 0).all()


# --- entropy, log-softmax / logprobs, exact KL over the vocabulary ---------------------------------------------------
# Logits T * log(w) at temperature T give softmax probabilities w / sum(w), whatever T.

def _weights_logits(rows, temperature):
    return _t([[temperature * math.log(w) for w in row] for row in rows])


W = [[1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]


@pytest.mark.parametrize("temperature", (1.0, 0.5, 2.0))
def test_logprobs_closed_form(temperature):
    logits = _weights_logits(W, temperature)
    targets = torch.tensor([2, 0, -100])  # the last row is ignored
    want = [math.log(3 / 10), math.log(5 / 8), 0.0]
    _close(reference.logprobs(logits, targets, temperature=temperature), want, "reference")
    _close(ops.logprobs(logits, targets, temperature=temperature, backend="torch"), want, "ops")
    # shifting a row's logits changes nothing, however large the shift (a stable log-softmax)
    _close(reference.logprobs(logits + 1000.0, targets, temperature=temperature), want, "shifted")


def test_logprobs_ignore_index_and_linear_closed_form():
    """linear_logprobs: logits = hidden @ weight.T + bias, with a custom ignore_index."""
    hidden = _t([[1.0, 0.0], [0.0, 2.0]])
    weight = _t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    bias = _t([0.0, 0.0, -1.0])
    # logits row 0: [1, 0, 0]; row 1: [0, 2, 1]
    want = [math.log(math.e / (math.e + 2)), 0.0]
    got = reference.linear_logprobs(hidden, weight, torch.tensor([0, 7]), bias=bias, ignore_index=7)
    _close(got, want, "linear_logprobs")
    got = ops.linear_logprobs(hidden, weight, torch.tensor([2, 1]), bias=bias, backend="torch")
    z = math.exp(0) + math.exp(2) + math.exp(1)
    _close(got, [math.log(1 / (math.e + 2)), math.log(math.exp(2) / z)], "linear_logprobs targets 2, 1")


@pytest.mark.parametrize("temperature", (1.0, 0.5, 2.0))
def test_entropy_closed_form(temperature):
    logits = _weights_logits(W, temperature)
    want = [-sum(w / sum(row) * math.log(w / sum(row)) for w in row) for row in W]
    _close(want[2], math.log(4), "uniform over 4 by hand")
    _close(reference.entropy(logits, temperature=temperature), want, "reference")
    _close(ops.entropy(logits, temperature=temperature, backend="torch"), want, "ops")


def test_entropy_temperature_divides_the_logits():
    """Logits [0, log 3]: at T = 1, p = [1/4, 3/4]; at T = 2, logits [0, log 3 / 2], p = [1, sqrt 3] / (1 + sqrt 3)."""
    logits = _t([[0.0, math.log(3)]])
    p = [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]
    _close(reference.entropy(logits, temperature=2.0), [-sum(x * math.log(x) for x in p)], "T = 2")
    _close(reference.entropy(logits), [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))], "T = 1")


@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_exact_kl_closed_form(temperature):
    P = [[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]
    Q = [[1.0, 1.0, 2.0], [1.0, 2.0, 1.0]]
    want = []
    for p, q in zip(P, Q):
        p = [x / sum(p) for x in p]
        q = [x / sum(q) for x in q]
        want.append(sum(a * math.log(a / b) for a, b in zip(p, q)))
    backwards = [sum(b / sum(q) * math.log((b / sum(q)) / (a / sum(p))) for a, b in zip(p, q)) for p, q in zip(P, Q)]
    assert abs(want[0] - backwards[0]) > 1e-3  # KL(pi || pi_ref) != KL(pi_ref || pi) here
    logits, ref = _weights_logits(P, temperature), _weights_logits(Q, temperature)
    _close(reference.exact_kl(logits, ref, temperature=temperature), want, "reference")
    _close(ops.exact_kl(logits, ref, temperature=temperature, backend="torch"), want, "ops")
    _close(reference.exact_kl(logits, logits, temperature=temperature), [0.0, 0.0], "KL(p || p)")


def test_segment_sum_closed_form():
    values = _t([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
    ids = torch.tensor([3, 0, -1, 3, 1, -2, 0])  # unordered, negatives in no segment, segment 2 and 4 empty
    want = [2.0 + 64.0, 16.0, 0.0, 1.0 + 8.0, 0.0]
    _close(reference.segment_sum(values, ids, 5), want, "reference")
    _close(ops.segment_sum(values, ids, 5, backend="torch"), want, "ops")
    x = values.clone().requires_grad_()
    g = torch.autograd.grad((reference.segment_sum(x, ids, 5) * _t([1.0, 2.0, 3.0, 4.0, 5.0])).sum(), x)[0]
    _close(g, [4.0, 1.0, 0.0, 4.0, 2.0, 0.0, 1.0], "d / d values = the weight of the value's segment")


# --- gradients: hand-derived, finite differences, gradcheck -----------------------------------------------------------

LOGITS = _t([[0.3, -1.2, 2.0, 0.5, -0.4], [1.0, 1.0, -2.0, 0.0, 0.7], [-0.5, 0.2, 0.1, 3.0, -1.0]])
REF_LOGITS = _t([[0.0, 0.5, 1.0, -0.5, 0.2], [-1.0, 2.0, 0.0, 0.3, 0.1], [0.4, -0.2, 0.8, 1.5, 0.0]])
TARGETS = torch.tensor([2, -100, 0])
UP = _t([0.7, -1.3, 2.1])  # an upstream gradient, so rows are weighted differently


def _softmax_rows(z):
    return [[math.exp(v - max(row)) / sum(math.exp(u - max(row)) for u in row) for v in row] for row in z]


@pytest.mark.parametrize("temperature", (1.0, 1.7))
def test_vocab_ops_hand_gradients(temperature):
    """d logp_y / dz = (onehot_y - p) / T;  dH / dz = -p (log p + H) / T;  dKL(p||q) / dz = p (log p/q - KL) / T."""
    z = (LOGITS / temperature).tolist()
    zq = (REF_LOGITS / temperature).tolist()
    P, Q = _softmax_rows(z), _softmax_rows(zq)
    want_lp, want_h, want_kl = [], [], []
    for i, (p, q) in enumerate(zip(P, Q)):
        u, y = UP[i].item(), TARGETS[i].item()
        h = -sum(a * math.log(a) for a in p)
        kl = sum(a * math.log(a / b) for a, b in zip(p, q))
        want_lp.append([0.0] * 5 if y < 0 else [u * ((j == y) - p[j]) / temperature for j in range(5)])
        want_h.append([u * -p[j] * (math.log(p[j]) + h) / temperature for j in range(5)])
        want_kl.append([u * p[j] * (math.log(p[j] / q[j]) - kl) / temperature for j in range(5)])
    T = temperature
    _close(_autograd(lambda x: reference.logprobs(x, TARGETS, temperature=T) * UP, LOGITS), want_lp, "logprobs")
    _close(_autograd(lambda x: reference.entropy(x, temperature=T) * UP, LOGITS), want_h, "entropy")
    _close(_autograd(lambda x: reference.exact_kl(x, REF_LOGITS, temperature=T) * UP, LOGITS), want_kl, "exact_kl")


FD_TOL = 1e-7  # central differences with h = 1e-6 in float64: truncation ~1e-12, rounding ~1e-10


def _fd_cases():
    """Smooth scalar-per-row functions of one float64 tensor, each with the point to differentiate at."""
    old = torch.zeros(2, 4, dtype=F64)
    return {
        "logprobs": (lambda x: reference.logprobs(x, TARGETS, temperature=1.7) * UP, LOGITS),
        "entropy": (lambda x: reference.entropy(x, temperature=0.6) * UP, LOGITS),
        "exact_kl": (lambda x: reference.exact_kl(x, REF_LOGITS, temperature=1.3) * UP, LOGITS),
        "kl-k3-logprobs": (lambda x: reference.kl(x, _t([-1.0, 0.5, -0.2]), "k3") * UP, _t([-0.3, -1.1, 0.4])),
        "kl-k3-ref": (lambda x: reference.kl(_t([-1.0, 0.5, -0.2]), x, "k3") * UP, _t([-0.3, -1.1, 0.4])),
        "segment_sum": (lambda x: reference.segment_sum(x, torch.tensor([1, -1, 0, 1]), 3) * _t([2.0, 3.0, 5.0]),
                        _t([0.5, 1.0, -2.0, 4.0])),
        "group_advantages-std": (lambda x: reference.group_advantages(x, torch.tensor([0, 1, 0, 0, 1]), 2, "std", 0.5)
                                 * _t([1.0, -2.0, 0.5, 3.0, 1.5]), _t([1.0, 0.0, 3.0, 2.5, 2.0])),
        **{f"policy_loss-{agg}": ((lambda a: lambda x: reference.policy_loss(
            x, old, _t(ADV), _t(MASK), clip_low=0.2, clip_high=0.3, ref_logprobs=_t(REF), kl_coef=KL_COEF,
            aggregation=a)[0])(agg), _lp()) for agg in AGGREGATIONS},
    }


@pytest.mark.parametrize("case", list(_fd_cases()))
def test_autograd_matches_finite_differences(case):
    f, x = _fd_cases()[case]
    _close(_autograd(f, x), _central_difference(f, x), f"{case}: autograd vs central differences", tol=FD_TOL)


@pytest.mark.parametrize("case", list(_fd_cases()))
def test_gradcheck(case):
    f, x = _fd_cases()[case]
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(),))


@pytest.mark.parametrize("estimator", ("k1", "k2", "k3"))
def test_gradcheck_kl_both_arguments(estimator):
    a = _t([-0.3, -1.1, 0.4]).requires_grad_()
    b = _t([-1.0, 0.5, -0.2]).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: reference.kl(x, y, estimator), (a, b))


@pytest.mark.parametrize("mode", ("std", "mean", "rloo"))
def test_gradcheck_group_advantages(mode):
    r = _t([1.0, 0.0, 3.0, 2.5, 2.0, -1.0]).requires_grad_()
    ids = torch.tensor([0, 1, 0, 0, 1, 2])  # group 2 holds one sample
    assert torch.autograd.gradcheck(lambda x: reference.group_advantages(x, ids, 3, mode, 0.5), (r,))

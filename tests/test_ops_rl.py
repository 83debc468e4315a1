"""Memory-bound RL ops (segment sums, KL estimators, group advantages, policy loss) against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from conftest import ALL_BACKENDS, assert_close, require_backend
from ra3 import ops
from ra3.ops import reference

DTYPES = (torch.float32, torch.bfloat16)


def _leaf(t, device):
    return t.detach().to(device).requires_grad_()


def _grad(out, x, up):
    return torch.autograd.grad((out.double() * up).sum(), x)[0]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_sum(backend, dtype):
    device = require_backend(backend, "segment_sum")
    g = torch.Generator().manual_seed(0)
    values = torch.randn(200, generator=g).to(dtype)
    ids = torch.randint(-2, 9, (200,), generator=g)  # negatives ignored, unordered
    ids[ids == 4] = 5  # segment 4 is empty
    x = _leaf(values, device)
    out = ops.segment_sum(x, ids.to(device), 11, backend=backend)  # 9, 10 empty as well
    x64 = values.double().requires_grad_()
    want = reference.segment_sum(x64, ids, 11)
    assert_close(out, want, torch.float32, "sums")
    assert out[4] == 0 and out[9] == 0 and out[10] == 0
    up = torch.randn(11, dtype=torch.float64, generator=g)
    assert_close(_grad(out, x, up.to(device)), _grad(want, x64, up), dtype, "grad")
    empty = ops.segment_sum(torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device), 3,
                            backend=backend)
    assert empty.shape == (3,) and (empty == 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("estimator", ("k1", "k2", "k3"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_estimators(backend, estimator, dtype):
    device = require_backend(backend, "kl")
    g = torch.Generator().manual_seed(1)
    lp = (-torch.rand(7, 9, generator=g) * 3).to(dtype)
    ref = (-torch.rand(7, 9, generator=g) * 3).to(dtype)
    a, b = _leaf(lp, device), _leaf(ref, device)
    out = ops.kl(a, b, estimator, backend=backend)
    a64, b64 = lp.double().requires_grad_(), ref.double().requires_grad_()
    want = reference.kl(a64, b64, estimator)
    if estimator == "k3":
        assert (want >= 0).all()
    assert_close(out, want, torch.float32, estimator)
    up = torch.randn(7, 9, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((out.double() * up.to(device)).sum(), (a, b))
    exp = torch.autograd.grad((want * up).sum(), (a64, b64))
    assert_close(got[0], exp[0], dtype, "grad logprobs")
    assert_close(got[1], exp[1], dtype, "grad ref_logprobs")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("normalize", ("std", "mean", "rloo", "none", "batch-std"))
def test_group_advantages(backend, normalize):
    device = require_backend(backend, "group_advantages")
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(24, generator=g)
    rewards[8:12] = 1.0  # a group whose rewards are all equal
    x = _leaf(rewards, device)
    out = ops.group_advantages(x, group_size=4, normalize=normalize, backend=backend)
    ids = torch.arange(24) // 4
    x64 = rewards.double().requires_grad_()
    want = reference.group_advantages(x64, ids, 6, normalize, 1e-6)
    assert_close(out, want, torch.float32, normalize)
    if normalize != "none":
        assert (out[8:12] == 0).all()
        assert out.detach().view(6, 4).sum(1).abs().max() < 1e-5  # advantages are centred per group
    up = torch.randn(24, dtype=torch.float64, generator=g)
    assert_close(_grad(out, x, up.to(device)), _grad(want, x64, up), torch.float32, "grad")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_group_advantages_with_group_ids(backend):
    device = require_backend(backend, "group_advantages")
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0, 5.0, 0.5, 7.0])
    gids = torch.tensor([2, 0, 2, 0, 1, 2, 3])  # unequal groups, group 1 and 3 of size one
    out = ops.group_advantages(rewards.to(device), group_ids=gids.to(device), backend=backend)
    want = reference.group_advantages(rewards.double(), gids, 4, "std", 1e-6)
    assert_close(out, want, torch.float32)
    assert out[4] == 0 and out[6] == 0
    manual = (rewards[[0, 2, 5]] - rewards[[0, 2, 5]].mean()) / (rewards[[0, 2, 5]].std() + 1e-6)
    assert_close(out[[0, 2, 5]], manual.double(), torch.float32, "GRPO by hand")
    rloo = ops.group_advantages(rewards.to(device), group_ids=gids.to(device), normalize="rloo", backend=backend)
    assert abs(float(rloo[1]) - (0.0 - 2.0)) < 1e-6  # r minus the mean of the others


def test_group_advantages_gradcheck():
    for backend in ("torch", "cpu"):
        device = require_backend(backend, "group_advantages")
        r = torch.randn(9, dtype=torch.float64, device=device, requires_grad=True)
        for normalize in ("std", "mean", "rloo", "batch-std"):
            assert torch.autograd.gradcheck(
                lambda x: ops.group_advantages(x, group_size=3, normalize=normalize, backend=backend), (r,))


def _policy_inputs(B, T, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 2
    lp = (old + torch.randn(B, T, generator=g) * 0.4).to(dtype)  # ratios on both sides of the clip range
    ref = (old + torch.randn(B, T, generator=g) * 0.3).to(dtype)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False  # a sequence with no tokens
    return lp, old.to(dtype), adv, mask, ref


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("aggregation", ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"))
@pytest.mark.parametrize("with_ref", (False, True))
@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_loss(backend, aggregation, with_ref, dtype):
    device = require_backend(backend, "policy_loss")
    lp, old, adv, mask, ref = _policy_inputs(5, 11, dtype)
    x = _leaf(lp, device)
    kw = dict(clip_low=0.2, clip_high=0.28, aggregation=aggregation, kl_estimator="k3",
              ref_logprobs=ref.to(device) if with_ref else None, kl_coef=0.1 if with_ref else 0.0)
    res = ops.policy_loss(x, old.to(device), adv.to(device), mask.to(device), backend=backend, **kw)
    x64 = lp.double().requires_grad_()
    want = reference.policy_loss(x64, old.double(), adv.double(), mask, **{
        **kw, "ref_logprobs": ref.double() if with_ref else None})
    assert res.loss.dim() == 0
    assert_close(res.loss, want[0], torch.float32, "loss")
    for got, exp, what in zip(res[1:], want[1:], ("clip_fraction", "kl_mean", "ratio_mean")):
        assert_close(got, exp, torch.float32, what)
    assert 0 < float(res.clip_fraction) < 1
    g_got = torch.autograd.grad(res.loss * 3.0, x)[0]
    g_want = torch.autograd.grad(want[0] * 3.0, x64)[0]
    assert_close(g_got, g_want, dtype, "grad logprobs")
    assert (g_got[1] == 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_policy_loss_per_token_advantages_and_empty_mask(backend):
    device = require_backend(backend, "policy_loss")
    lp, old, _, mask, _ = _policy_inputs(3, 6, torch.float32, seed=4)
    adv = torch.randn(3, 6)
    x = _leaf(lp, device)
    res = ops.policy_loss(x, old.to(device), adv.to(device), mask.to(device), backend=backend)
    x64 = lp.double().requires_grad_()
    want = reference.policy_loss(x64, old.double(), adv.double(), mask)
    assert_close(res.loss, want[0], torch.float32)
    assert_close(torch.autograd.grad(res.loss, x)[0], torch.autograd.grad(want[0], x64)[0], torch.float32)
    none = ops.policy_loss(x, old.to(device), adv.to(device), torch.zeros(3, 6, device=device), backend=backend)
    assert float(none.loss) == 0 and float(none.clip_fraction) == 0
    assert (torch.autograd.grad(none.loss, x)[0] == 0).all()


def test_policy_loss_gradcheck():
    for backend in ("torch", "cpu"):
        device = require_backend(backend, "policy_loss")
        lp, old, adv, mask, ref = (t.double().to(device) for t in _policy_inputs(3, 4, torch.float64, seed=6))
        lp.requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x: ops.policy_loss(x, old, adv, mask, ref_logprobs=ref, kl_coef=0.3, backend=backend,
                                      aggregation="seq-mean-token-mean").loss, (lp,))


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_custom_ops_pass_opcheck(backend):
    """The RL custom ops are well-formed for torch.compile: schema, fake tensors, autograd registration."""
    device = require_backend(backend, "kl")
    from ra3.ops.group_advantages import _group_adv_op
    from ra3.ops.kl import _kl_op
    from ra3.ops.policy_loss import _policy_loss_op
    from ra3.ops.segment_sum import _segment_sum_op

    g = torch.Generator().manual_seed(9)
    x = torch.randn(12, generator=g).to(device).requires_grad_()
    ids = torch.tensor([0, 2, 2, -1, 1, 0, 0, 3, 1, 2, -1, 0], device=device)
    torch.library.opcheck(_segment_sum_op, (backend, x, ids, 5))
    torch.library.opcheck(_kl_op, (backend, x, torch.randn(12, generator=g).to(device), 3))
    for normalize in (2, 4):  # std, batch-std
        torch.library.opcheck(_group_adv_op, (backend, x, torch.arange(12, device=device) // 4, 3, normalize, 1e-6))
    lp, old, adv, mask, ref = (t.to(device) for t in _policy_inputs(3, 4, torch.float32))
    # (ratio level, surrogate, aggregation, normaliser): token PPO seq-mean-token-mean, GSPO CISPO token-sum / 7
    for variant in ((0, 0, 2, 0.0), (1, 1, 3, 7.0)):
        torch.library.opcheck(_policy_loss_op, (backend, lp.requires_grad_(), old, adv, mask.float(), ref, 0.1, 3,
                                                0.2, 0.28, *variant))

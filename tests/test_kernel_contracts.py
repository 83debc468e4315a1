"""The kernel contract, once for every native backend: each kernel of ra3._C (``cpu``, and ``cuda`` where a GPU
is present) and of ra3.kernels (``triton``; without a GPU in Triton's interpreter, tests/conftest.py sets
TRITON_INTERPRET=1) against a float64 PyTorch formula, called exactly as ra3/ops calls it:
``ra3.ops.kernel_abi.call(backend, device, args)`` with the kernel's argument NamedTuple, tensors for pointers.

Each test poisons the output buffers with NaN first and checks that every element was written, and uses
strided chunks of wider matrices (pointer offsets, ``ld*`` != chunk width), in-place chunks, targets outside the
chunk, ignored and negative ids, -inf logits, empty segments and groups of one. Triton's blocks are shrunk so
every multi-block loop and multi-program grid runs on small shapes. The backend-specific kernel tests are in
test_native_build.py (build info, exports, the vectorised exp) and test_triton_kernels.py (the fused-matmul
design, launcher errors, compilation for sm_90); the op-level tests (autograd, dispatch) in test_ops_*.py.
"""
from __future__ import annotations

import importlib.util
import math
from typing import NamedTuple

import pytest
import torch
from conftest import require_backend
from kernel_helpers import (CODE, DTYPES, ENTROPY, EXACT_KL, LOGPROB, close, grad_state, nan_like, run_stats,
                            shrink_triton_blocks, softmax_reference)

from ra3.ops import kernel_abi as abi

KERNEL_BACKENDS = ("cpu", "cuda", "triton")


class Kernels(NamedTuple):
    """The kernels of one backend on its device: ``kern(args)`` is ``kernel_abi.call``."""
    backend: str
    device: torch.device

    def __call__(self, args):
        return abi.call(self.backend, self.device, args)


@pytest.fixture(params=KERNEL_BACKENDS)
def kern(request, monkeypatch):
    backend = request.param
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed (pip install -e .[triton])")
    elif importlib.util.find_spec("ra3._C") is None:
        pytest.skip("ra3._C is not built (RA3_NO_NATIVE=1 or a pure-Python install); build it with "
                    "`pip install -e .`")
    else:
        from ra3 import _C  # noqa: F401, PLC0415  (a built module that fails to import must fail, not skip)
    device = require_backend(backend)
    if backend == "triton":
        shrink_triton_blocks(monkeypatch)
    return Kernels(backend, device)


# --- softmax over vocabulary chunks ----------------------------------------------------------------------------

N, V, PAD = 7, 300, 5  # logits live in columns [PAD, PAD + V) of an [N, V + 2 * PAD] matrix


def _logits(dtype, seed, device, neg_inf=False):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(N, V + 2 * PAD, generator=g, dtype=torch.float64) * 3
    if neg_inf:
        wide[0, PAD:PAD + 140] = -math.inf  # row 0: the whole first chunk is -inf (the state must stay empty)
        wide[1, PAD + 7::11] = -math.inf  # row 1: scattered masked vocabulary entries
    wide = wide.to(dtype).to(device)
    return wide, wide[:, PAD:PAD + V]


def _targets(device):
    # Negative: ignored (-100, the usual ignore_index, and -1, what ra3/ops maps it to); the others fall in the
    # first, middle and last chunk, including both chunk edges.
    return torch.tensor([3, -100, 127, 128, 299, 200, -1], dtype=torch.int64, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vc", [128, 300, 37])
@pytest.mark.parametrize("neg_inf", [False, True])
def test_vocab_softmax_fwd_matches_logsumexp(kern, dtype, vc, neg_inf):
    inv_temp = 1 / 0.7
    _, z = _logits(dtype, 0, kern.device, neg_inf)
    _, r = _logits(dtype, 1, kern.device)
    targets = _targets(kern.device)
    x, y = z.double().cpu() * inv_temp, r.double().cpu() * inv_temp
    lse, logp, ent, kl, lse_r = softmax_reference(x, y)

    m, s, _, _, _, tgt = run_stats(kern.backend, LOGPROB, dtype, z, None, targets, inv_temp, vc)
    close(m + s.log(), lse, dtype)
    keep = targets.cpu() >= 0
    close(tgt.cpu()[keep], x[keep, targets.cpu()[keep]], dtype)
    assert tgt.cpu()[~keep].eq(0).all(), "tgt of an ignored row must stay untouched"

    m, s, a, _, _, _ = run_stats(kern.backend, ENTROPY, dtype, z, None, targets, inv_temp, vc)
    gm, _, q_ent, _ = grad_state(x)
    close(m, gm, dtype)
    close(a / s, q_ent, dtype)  # relative to the max: a = sum exp(x - m) * (x - m)
    close(s.log() - a / s, ent, dtype)

    m, s, a, mr, sr, _ = run_stats(kern.backend, EXACT_KL, dtype, z, r, targets, inv_temp, vc)
    close(mr + sr.log(), lse_r, dtype)
    close(a / s - (m + s.log()) + (mr + sr.log()), kl, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [8, 40])  # one vector/block; several 32-column Triton blocks, a ragged last one
def test_vocab_softmax_fwd_all_neg_inf_chunk_leaves_state(kern, dtype, width):
    dev = kern.device
    z = torch.full((2, width), -math.inf, dtype=dtype, device=dev)
    m = torch.tensor([-math.inf, 1.5], dtype=dtype, device=dev)
    s = torch.tensor([0.0, 2.0], dtype=dtype, device=dev)
    a = torch.tensor([0.0, 3.0], dtype=dtype, device=dev)
    kern(abi.VocabSoftmaxFwdArgs(mode=ENTROPY, dtype=CODE[dtype], z=z, ldz=width, r=None, ldr=0, n=2, vc=width,
                                 v_offset=0, inv_temp=1.0, targets=None, m=m, s=s, a=a, mr=None, sr=None, tgt=None))
    assert m[0] == -math.inf and s.tolist() == [0.0, 2.0] and a.tolist() == [0.0, 3.0] and m[1] == 1.5


def _run_grad(kern, mode, dtype, z_wide, r_wide, targets, inv_temp, vc, m, logs, q, g, in_place):
    """Gradient chunks written into a NaN-poisoned wider matrix (or into a copy of z, in place)."""
    out_wide = z_wide.clone() if in_place else nan_like((N, V + 3 * PAD), dtype, z_wide.device)
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        z = (out_wide if in_place else z_wide)[:, PAD + v0:PAD + v1]
        out = z if in_place else out_wide[:, 2 * PAD + v0:2 * PAD + v1]
        r = r_wide[:, PAD + v0:PAD + v1] if r_wide is not None else None
        kern(abi.VocabSoftmaxGradArgs(mode=mode, dtype=CODE[dtype], z=z, ldz=z.stride(0), r=r,
                                      ldr=0 if r is None else r.stride(0), out=out, ldo=out.stride(0), n=N, vc=v1 - v0,
                                      v_offset=v0, inv_temp=inv_temp, targets=targets, m=m, logs=logs, q=q, g=g))
    off = PAD if in_place else 2 * PAD
    return out_wide, out_wide[:, off:off + V]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_place", [False, True])
def test_softmax_grad_matches_autograd(kern, dtype, in_place):
    inv_temp, vc = 1 / 1.3, 128
    z_wide, z = _logits(dtype, 2, kern.device)
    r_wide, r = _logits(dtype, 3, kern.device)
    targets = _targets(kern.device)
    g = torch.randn(N, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g[targets.cpu() < 0] = 0  # ra3/ops zeroes the upstream gradient of ignored rows
    z64 = z.double().cpu().requires_grad_()
    x, y = z64 * inv_temp, r.double().cpu() * inv_temp
    lse, logp, ent, kl, lse_r = softmax_reference(x, y)
    keep = targets.cpu() >= 0
    picked = torch.zeros(N, dtype=torch.float64)
    picked[keep] = logp[keep, targets.cpu()[keep]]
    expected = {mode: torch.autograd.grad((g * val).sum(), z64, retain_graph=True)[0]
                for mode, val in ((LOGPROB, picked), (ENTROPY, ent), (EXACT_KL, kl))}
    c = lambda t: t.detach().to(dtype).to(kern.device).contiguous()  # noqa: E731
    m, logs, q_ent, q_kl = grad_state(x.detach(), y)
    for mode, q in ((LOGPROB, None), (ENTROPY, c(q_ent)), (EXACT_KL, c(q_kl))):
        out_wide, out = _run_grad(kern, mode, dtype, z_wide, r_wide if mode == EXACT_KL else None, targets,
                                  inv_temp, vc, c(m), c(logs), q, c(g), in_place)
        close(out, expected[mode], dtype, msg=f"mode {mode}")
        if not in_place:  # columns outside the chunks must not be touched
            assert out_wide[:, :2 * PAD].isnan().all() and out_wide[:, 2 * PAD + V:].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_grad_masked_vocabulary_gives_zero_not_nan(kern, dtype):
    z_wide, z = _logits(dtype, 5, kern.device, neg_inf=True)
    r_wide, r = _logits(dtype, 6, kern.device)
    x, y = z.double().cpu(), r.double().cpu()
    lse, logp, ent, kl, lse_r = softmax_reference(x, y)
    g = torch.ones(N, dtype=dtype, device=kern.device)
    c = lambda t: t.to(dtype).to(kern.device).contiguous()  # noqa: E731
    p = logp.exp()
    m, logs, q_ent, q_kl = grad_state(x, y)
    for mode, q, expected in (
            (ENTROPY, c(q_ent), -p * (logp + ent[:, None])),
            (EXACT_KL, c(q_kl), p * (logp - (y - lse_r[:, None]) - kl[:, None]))):
        _, out = _run_grad(kern, mode, dtype, z_wide, r_wide if mode == EXACT_KL else None, _targets(kern.device),
                           1.0, 128, c(m), c(logs), q, g, False)
        assert not out.isnan().any()
        masked = z.isinf()
        assert out[masked].eq(0).all()
        close(out, torch.where(masked.cpu(), torch.zeros_like(expected), expected), dtype)


# --- segment sums ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_sum_fwd_bwd(kern, dtype):
    gen = torch.Generator().manual_seed(7)
    n, num_segments = 1000, 9
    values = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    ids = torch.randint(-2, num_segments, (n,), generator=gen)  # -2, -1: no segment
    ids[ids == 4] = 7  # segment 4 stays empty
    out = nan_like((num_segments,), dtype, kern.device)
    kern(abi.SegmentSumFwdArgs(dtype=CODE[dtype], values=values.to(kern.device), ids=ids.to(kern.device), n=n,
                               num_segments=num_segments, out=out))
    keep = ids >= 0
    expected = torch.zeros(num_segments, dtype=torch.float64).index_add_(0, ids[keep], values[keep].double())
    close(out, expected, dtype)
    assert out[4] == 0

    grad_out = torch.randn(num_segments, generator=gen, dtype=torch.float64).to(dtype)
    grad = nan_like((n,), dtype, kern.device)
    kern(abi.SegmentSumBwdArgs(dtype=CODE[dtype], grad_out=grad_out.to(kern.device), ids=ids.to(kern.device), n=n,
                               grad_values=grad))
    expected = torch.where(keep, grad_out[ids.clamp_min(0)], torch.zeros((), dtype=dtype))
    assert torch.equal(grad.cpu(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_sum_fwd_no_tokens_zero_fills(kern, dtype):
    out = nan_like((3,), dtype, kern.device)
    empty_v = torch.zeros(0, dtype=dtype, device=kern.device)
    empty_i = torch.zeros(0, dtype=torch.int64, device=kern.device)
    kern(abi.SegmentSumFwdArgs(dtype=CODE[dtype], values=empty_v, ids=empty_i, n=0, num_segments=3, out=out))
    assert out.eq(0).all()


# --- KL estimators ---------------------------------------------------------------------------------------------

KL_FORMULAS = {1: lambda d: d, 2: lambda d: d * d / 2, 3: lambda d: torch.exp(-d) - 1 + d}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", [1, 2, 3])
def test_kl_estimator_fwd_bwd(kern, dtype, estimator):
    gen = torch.Generator().manual_seed(estimator)
    n = 513
    lp = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.5 - 2).to(dtype)
    ref = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.5 - 2).to(dtype)
    lp[:4] = ref[:4]  # d = 0 exactly
    ref[4:10] = 0.0
    lp[4:10] = torch.tensor([1e-3, -1e-3, 0.4999, -0.5001, 30.0, -30.0], dtype=dtype)  # tiny d, the polynomial's
    # edge, and far from 0
    lp64 = lp.double().requires_grad_()
    k = KL_FORMULAS[estimator](lp64 - ref.double())
    out = nan_like((n,), dtype, kern.device)
    kern(abi.KlEstimatorFwdArgs(dtype=CODE[dtype], estimator=estimator, lp=lp.to(kern.device), ref=ref.to(kern.device),
                                n=n, out=out))
    close(out, k.detach(), dtype, atol=1e-6 if dtype == torch.float32 else 1e-14)
    assert out[:4].eq(0).all()
    if estimator == 3:  # relative accuracy where d is tiny: expm1(-d) + d, not exp(-d) - 1 + d (off by ~10%)
        d = lp[4:6].double()
        close(out[4:6], torch.expm1(-d) + d, dtype, rtol=3e-3 if dtype == torch.float32 else 1e-9, atol=0)

    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    (expected,) = torch.autograd.grad((k * g.double()).sum(), lp64)
    grad = nan_like((n,), dtype, kern.device)
    kern(abi.KlEstimatorBwdArgs(dtype=CODE[dtype], estimator=estimator, lp=lp.to(kern.device), ref=ref.to(kern.device),
                                g=g.to(kern.device), n=n, grad_lp=grad))
    close(grad, expected, dtype)


# --- group advantages ------------------------------------------------------------------------------------------

NORMALIZE = {"none": abi.NORM_NONE, "mean": abi.NORM_MEAN, "std": abi.NORM_STD, "rloo": abi.NORM_RLOO,
             "batch-std": abi.NORM_BATCH_STD}


def _group_adv_reference(r, gids, num_groups, normalize, eps):
    """Straightforward per-group loop in float64 (autograd-able). batch-std: every group is scaled by the std of
    all rewards, which the kernel also leaves in every group's std."""
    out = torch.zeros_like(r)
    means, stds = torch.zeros(num_groups, dtype=r.dtype), torch.zeros(num_groups, dtype=r.dtype)
    batch_sd = r.std(unbiased=True)
    for k in range(num_groups):
        idx = (gids == k).nonzero().flatten()
        if len(idx) == 0:
            continue
        rk = r[idx]
        c = len(idx)
        mu = rk.mean()
        sd = rk.std(unbiased=True) if c > 1 else torch.zeros((), dtype=r.dtype)
        if normalize == "batch-std":
            sd = batch_sd
        means[k], stds[k] = mu.detach(), sd.detach()
        if normalize == "none":
            val = rk
        elif normalize == "mean":
            val = rk - mu
        elif normalize in ("std", "batch-std"):
            val = (rk - mu) / (sd + eps)
        else:
            val = (rk - mu) * c / (c - 1) if c > 1 else torch.zeros_like(rk)
        out = out.index_put((idx,), val)
    if normalize == "batch-std":
        stds[:] = batch_sd.detach()  # empty groups included
    return out, means, stds


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", list(NORMALIZE))
def test_group_adv_fwd_bwd(kern, dtype, normalize):
    gen = torch.Generator().manual_seed(11)
    # Groups: 0 has 4 samples, 1 has one (size-1 group), 2 is empty, 3 has 3 equal rewards (sd = 0), 4 has 5,
    # then 40 more samples spread over groups 5-6 so the scatters span several (Triton) programs.
    gids = torch.cat([torch.tensor([0, 3, 0, 1, 4, 4, 0, 3, 4, 4, 0, 3, 4]), 5 + torch.arange(40) % 2])
    num_groups, n, eps = 7, gids.numel(), 1e-6
    rewards = torch.randn(n, generator=gen, dtype=torch.float64)
    rewards[gids == 3] = 0.25
    rewards = rewards.to(dtype)
    r64 = rewards.double().requires_grad_()
    expected, means, stds = _group_adv_reference(r64, gids, num_groups, normalize, eps)

    dev = kern.device
    out, mean, std = nan_like((n,), dtype, dev), nan_like((num_groups,), dtype, dev), \
        nan_like((num_groups,), dtype, dev)
    kern(abi.GroupAdvFwdArgs(dtype=CODE[dtype], rewards=rewards.to(dev), gids=gids.to(dev), n=n, num_groups=num_groups,
                             normalize=NORMALIZE[normalize], eps=eps, out=out, mean=mean, std_dev=std))
    close(out, expected.detach(), dtype)
    close(mean, means, dtype)
    close(std, stds, dtype)
    assert mean[2] == 0 and (normalize == "batch-std" or (std[2] == 0 and std[1] == 0 and std[3] == 0))

    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    (expected_grad,) = torch.autograd.grad((expected * g.double()).sum(), r64)
    grad = nan_like((n,), dtype, dev)
    kern(abi.GroupAdvBwdArgs(dtype=CODE[dtype], rewards=rewards.to(dev), gids=gids.to(dev), n=n, num_groups=num_groups,
                             normalize=NORMALIZE[normalize], eps=eps, mean=mean, std_dev=std, g=g.to(dev), grad_r=grad))
    # The sd = 0 group's autograd gradient goes through std's undefined derivative at 0; the contract drops it.
    ok = (gids != 3) | (normalize == "batch-std")
    close(grad.cpu()[ok], expected_grad[ok], dtype, rtol=1e-4 if dtype == torch.float32 else 1e-10)
    if normalize == "std":
        g3 = g[gids == 3].double()
        close(grad.cpu()[gids == 3], (g3 - g3.mean()) / eps, dtype, rtol=1e-4 if dtype == torch.float32 else 1e-10)
    assert not grad.isnan().any()


# --- policy loss -----------------------------------------------------------------------------------------------

AGGREGATION = {"token-mean": abi.TOKEN_MEAN, "seq-mean-token-sum": abi.SEQ_MEAN_TOKEN_SUM,
               "seq-mean-token-mean": abi.SEQ_MEAN_TOKEN_MEAN, "token-sum-norm": abi.TOKEN_SUM_NORM}
AGG_NORM = 17.5  # the divisor of aggregation 3
# (ratio_level, surrogate) -> (clip_low, clip_high): token / sequence (GSPO) ratios, PPO / CISPO surrogates; the
# sequence ratios get a narrow range, so some sequences are clipped.
VARIANTS = {(0, 0): (0.2, 0.28), (1, 0): (0.02, 0.03), (0, 1): (0.2, 0.28), (1, 1): (0.02, 0.03)}


def _policy_loss_reference(lp, old, adv, mask, ref, kl_coef, estimator, clip_low, clip_high, aggregation,
                           ratio_level=0, surrogate=0):
    """float64, autograd-able; tokens with mask 0 contribute nothing, whatever lp holds there (the contract).
    ratio_level 1: each token's ratio is sg(s) exp(lp - sg(lp)), s = exp(mask-weighted mean of lp - old over the
    row), 1 for a row without weight; surrogate 1: -sg(clamp(ratio)) A lp."""
    B = lp.shape[0]
    a = adv if adv.dim() == 2 else adv[:, None]
    if ratio_level == 1:
        w = mask.sum(1)
        d = torch.where(mask > 0, mask * (lp - old), torch.zeros_like(lp)).detach().sum(1)
        s = torch.where(w != 0, torch.exp(d / torch.where(w != 0, w, torch.ones_like(w))), torch.ones_like(w))
        ratio = s[:, None] * torch.exp(lp - lp.detach())
    else:
        ratio = torch.exp(lp - old)
    unclipped = -ratio * a
    clamped = ratio.clamp(1 - clip_low, 1 + clip_high)
    clipped = -clamped * a
    if surrogate == 1:
        is_clipped = (ratio < 1 - clip_low) | (ratio > 1 + clip_high)
        per_token = -clamped.detach() * a * lp
    else:
        is_clipped = clipped > unclipped
        per_token = torch.maximum(unclipped, clipped)
    kl = KL_FORMULAS[estimator](lp - ref) if (ref is not None and kl_coef != 0) else torch.zeros_like(lp)
    per_token = torch.where(mask > 0, per_token + kl_coef * kl, torch.zeros_like(lp))
    total = mask.sum()
    if aggregation == "token-mean":
        loss = (per_token * mask).sum() / total if total > 0 else (per_token * mask).sum() * 0
    elif aggregation == "seq-mean-token-sum":
        loss = (per_token * mask).sum() / B
    elif aggregation == "token-sum-norm":
        loss = (per_token * mask).sum() / AGG_NORM
    else:
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp_min(torch.finfo(lp.dtype).tiny)).sum() / B
    denom = total if total > 0 else torch.ones(())
    kl = torch.where(mask > 0, kl, torch.zeros_like(kl))
    ratio = torch.where(mask > 0, ratio, torch.zeros_like(ratio))
    stats = torch.stack([(is_clipped * mask).sum() / denom, (kl * mask).detach().sum() / denom,
                         (ratio * mask).detach().sum() / denom, total])
    if not total > 0:
        stats[:3] = 0
    return loss, stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggregation", list(AGGREGATION))
@pytest.mark.parametrize("adv_per_token,with_ref,estimator", [(False, False, 3), (True, True, 3), (False, True, 1),
                                                                (True, True, 2)])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_policy_loss_fwd(kern, dtype, aggregation, adv_per_token, with_ref, estimator, variant):
    gen = torch.Generator().manual_seed(13)
    B, T = 20, 37  # 2 blocks of rows in the (Triton) reduction, 3 blocks of tokens per row
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    old = rnd(B, T) * 0.3 - 1.5
    lp = old + rnd(B, T) * 0.3  # ratios both inside and outside [0.8, 1.28]
    adv = rnd(B, T) if adv_per_token else rnd(B)
    mask = (torch.rand(B, T, generator=gen) > 0.3).double() * (1 + torch.rand(B, T, generator=gen, dtype=torch.float64))
    mask[3, :5] = 0.5  # weights below 1 as well as above
    mask[2] = 0  # a sequence without tokens
    lp[mask == 0] = math.nan  # padding the kernel must never read
    lp[2, 0] = math.inf  # garbage under the mask must not leak (ratio would be inf)
    ref = old + rnd(B, T) * 0.2 if with_ref else None
    # kl_coef != 0 without a reference: the kernel must not read ref (the contract reads it only when both are set)
    kl_coef = 0.1
    c = lambda t: None if t is None else t.to(dtype).to(kern.device).contiguous()  # noqa: E731
    lp_d, old_d, adv_d, mask_d, ref_d = map(c, (lp, old, adv, mask, ref))

    # The reference sees exactly the (cast) values the kernel sees.
    lp64 = lp_d.double().cpu().requires_grad_()
    clip_low, clip_high = VARIANTS[variant]
    loss, stats = _policy_loss_reference(lp64, old_d.double().cpu(), adv_d.double().cpu(), mask_d.double().cpu(),
                                         None if ref_d is None else ref_d.double().cpu(), kl_coef, estimator,
                                         clip_low, clip_high, aggregation, *variant)
    (grad_expected,) = torch.autograd.grad(loss, lp64)
    grad_expected = torch.where(mask > 0, grad_expected, torch.zeros_like(grad_expected))
    dev = kern.device
    loss_out, grad, stats_out = nan_like((1,), dtype, dev), nan_like((B, T), dtype, dev), nan_like((4,), dtype, dev)
    ratio_level, surrogate = variant
    kern(abi.PolicyLossFwdArgs(dtype=CODE[dtype], B=B, T=T, lp=lp_d, old=old_d, adv=adv_d,
                               adv_per_token=int(adv_per_token), mask=mask_d, ref=ref_d, kl_coef=kl_coef,
                               kl_estimator=estimator, clip_low=clip_low, clip_high=clip_high, ratio_level=ratio_level,
                               surrogate=surrogate, aggregation=AGGREGATION[aggregation], agg_norm=AGG_NORM,
                               loss_out=loss_out, grad_lp=grad, stats_out=stats_out))
    assert 0 < float(stats.detach()[0]) < 1  # both branches of the clip run
    close(loss_out[0], loss.detach(), dtype)
    close(grad, grad_expected, dtype)
    close(stats_out, stats.detach(), dtype)
    assert (grad[2] == 0).all() and (grad.cpu()[mask == 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggregation", list(AGGREGATION))
def test_policy_loss_fwd_all_masked_is_zero(kern, dtype, aggregation):
    B, T = 2, 5
    dev = kern.device
    lp, old = torch.zeros(B, T, dtype=dtype, device=dev), torch.zeros(B, T, dtype=dtype, device=dev)
    adv, mask = torch.ones(B, dtype=dtype, device=dev), torch.zeros(B, T, dtype=dtype, device=dev)
    loss, grad, stats = nan_like((1,), dtype, dev), nan_like((B, T), dtype, dev), nan_like((4,), dtype, dev)
    kern(abi.PolicyLossFwdArgs(dtype=CODE[dtype], B=B, T=T, lp=lp, old=old, adv=adv, adv_per_token=0, mask=mask,
                               ref=None, kl_coef=0.0, kl_estimator=3, clip_low=0.2, clip_high=0.2,
                               ratio_level=abi.RATIO_SEQUENCE, surrogate=abi.SURROGATE_PPO,
                               aggregation=AGGREGATION[aggregation], agg_norm=0.0, loss_out=loss, grad_lp=grad,
                               stats_out=stats))
    assert loss[0] == 0 and grad.eq(0).all() and stats.eq(0).all()


# --- bad tags --------------------------------------------------------------------------------------------------


def test_bad_tags_raise_value_error_naming_the_argument(kern):
    x = torch.zeros(4, device=kern.device)
    kl = abi.KlEstimatorFwdArgs(dtype=abi.FLOAT32, estimator=1, lp=x, ref=x, n=4, out=x)
    with pytest.raises(ValueError, match="dtype"):
        kern(kl._replace(dtype=abi.BFLOAT16))  # not a compute dtype
    with pytest.raises(ValueError, match="estimator"):
        kern(kl._replace(estimator=4))
    with pytest.raises(ValueError, match="mode"):
        kern(abi.VocabSoftmaxFwdArgs(mode=3, dtype=abi.FLOAT32, z=x[None], ldz=4, r=None, ldr=0, n=1, vc=4, v_offset=0,
                                     inv_temp=1.0, targets=None, m=x[:1], s=x[:1], a=x[:1], mr=None, sr=None, tgt=None))
    with pytest.raises(ValueError, match="normalize"):
        kern(abi.GroupAdvFwdArgs(dtype=abi.FLOAT32, rewards=x, gids=None, n=0, num_groups=1, normalize=7, eps=1e-6,
                                 out=x, mean=x, std_dev=x))
    with pytest.raises(ValueError, match="normalize"):
        kern(abi.GroupAdvBwdArgs(dtype=abi.FLOAT32, rewards=x, gids=None, n=0, num_groups=1, normalize=5, eps=1e-6,
                                 mean=x, std_dev=x, g=x, grad_r=x))
    policy = abi.PolicyLossFwdArgs(dtype=abi.FLOAT32, B=1, T=4, lp=x[None], old=x[None], adv=x[:1], adv_per_token=0,
                                   mask=x[None], ref=None, kl_coef=0.0, kl_estimator=3, clip_low=0.2, clip_high=0.2,
                                   ratio_level=abi.RATIO_TOKEN, surrogate=abi.SURROGATE_PPO,
                                   aggregation=abi.TOKEN_MEAN, agg_norm=1.0, loss_out=x[:1], grad_lp=x[None],
                                   stats_out=x)
    for bad in (dict(aggregation=5), dict(ratio_level=2), dict(surrogate=2)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            kern(policy._replace(**bad))

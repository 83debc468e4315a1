"""Kernel-level tests of the Triton backend ``ra3.kernels``: every launcher against a float64 PyTorch formula,
called exactly as ra3/ops calls it (the C ABI's arguments, tensors in place of pointers), and the fused-matmul
design of the linear ops against the reference and against the chunked design.

Without a GPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1). Output buffers are
poisoned with NaN first, so a result that is finite everywhere proves every element was written; block sizes
are shrunk so every multi-block loop and multi-program grid runs on small shapes. The op-level tests of the
triton backend (autograd, dispatch, dtypes) are the ``triton`` cases of test_ops_*.py.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install -e .[triton])", allow_module_level=True)

import test_ops_vocab  # noqa: E402
from conftest import assert_close, require_backend  # noqa: E402
from ra3 import ops  # noqa: E402
from ra3.ops import _vocab_chunks, reference  # noqa: E402

DTYPES = (torch.float32, torch.float64)
CODE = {torch.float32: 0, torch.float64: 1}
TOL = {torch.float32: dict(rtol=3e-5, atol=3e-5), torch.float64: dict(rtol=1e-11, atol=1e-12)}
LOGPROB, ENTROPY, EXACT_KL = 0, 1, 2


@pytest.fixture
def device():
    return require_backend("triton", "logprobs")


def close(actual, expected, dtype, **kw):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **{**TOL[dtype], **kw})


def nan_like(shape, dtype, device):
    return torch.full(shape, math.nan, dtype=dtype, device=device)


# --- softmax over vocabulary chunks ----------------------------------------------------------------------------

N, V, PAD = 6, 300, 5  # logits live in columns [PAD, PAD + V) of an [N, V + 2 * PAD] matrix


@pytest.fixture
def sv(monkeypatch):
    """ra3.kernels.softmax_vocab with 32-column blocks, so a chunk spans several blocks (and a ragged last one)."""
    from ra3.kernels import softmax_vocab

    monkeypatch.setattr(softmax_vocab, "MAX_BLOCK_V", {torch.float32: 32, torch.float64: 32})
    return softmax_vocab


def _logits(dtype, seed, device, neg_inf=False):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(N, V + 2 * PAD, generator=g, dtype=torch.float64) * 3
    if neg_inf:
        wide[0, PAD:PAD + 140] = -math.inf  # row 0: the whole first chunk is -inf (the state must stay empty)
        wide[1, PAD + 7::11] = -math.inf  # row 1: scattered masked vocabulary entries
    wide = wide.to(dtype).to(device)
    return wide, wide[:, PAD:PAD + V]


def _targets(device):
    # -1: ignored (ra3/ops maps ignore_index to -1); others in the first, middle and last chunk, on chunk edges.
    return torch.tensor([3, -1, 127, 128, 299, 200], dtype=torch.int64, device=device)


def _run_stats(sv, mode, dtype, z_wide, r_wide, targets, inv_temp, vc):
    """Walks the vocabulary in chunks of vc, as ra3/ops/_vocab_chunks.py does, and returns the running state."""
    dev = z_wide.device
    m = torch.full((N,), -math.inf, dtype=dtype, device=dev)
    s, a, tgt = (torch.zeros(N, dtype=dtype, device=dev) for _ in range(3))
    mr = torch.full((N,), -math.inf, dtype=dtype, device=dev) if mode == EXACT_KL else None
    sr = torch.zeros(N, dtype=dtype, device=dev) if mode == EXACT_KL else None
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        z = z_wide[:, PAD + v0:PAD + v1]
        r = r_wide[:, PAD + v0:PAD + v1] if r_wide is not None else None
        sv.softmax_stats_fwd(mode, CODE[dtype], z, z.stride(0), r, 0 if r is None else r.stride(0), N, v1 - v0, v0,
                             inv_temp, targets, m, s, a if mode != LOGPROB else None, mr, sr, tgt)
    return m, s, a, mr, sr, tgt


def _reference(x, y=None):
    """float64 log-softmax statistics of x (and y): lse, logp, entropy, KL(p || q), with 0 * -inf read as 0."""
    lse = torch.logsumexp(x, -1)
    logp = x - lse[:, None]
    p = logp.exp()
    ent = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    if y is None:
        return lse, logp, ent, None, None
    lse_r = torch.logsumexp(y, -1)
    logq = y - lse_r[:, None]
    kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
    return lse, logp, ent, kl, lse_r


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vc", [128, 300, 37])
@pytest.mark.parametrize("neg_inf", [False, True])
def test_softmax_stats_fwd_matches_logsumexp(sv, device, dtype, vc, neg_inf):
    inv_temp = 1 / 0.7
    z_wide, z = _logits(dtype, 0, device, neg_inf)
    r_wide, r = _logits(dtype, 1, device)
    targets = _targets(device)
    x, y = z.double().cpu() * inv_temp, r.double().cpu() * inv_temp
    lse, logp, ent, kl, lse_r = _reference(x, y)

    m, s, _, _, _, tgt = _run_stats(sv, LOGPROB, dtype, z_wide, None, targets, inv_temp, vc)
    close(m + s.log(), lse, dtype)
    keep = targets.cpu() >= 0
    close(tgt.cpu()[keep], x[keep, targets.cpu()[keep]], dtype)
    assert tgt[~keep.to(device)].eq(0).all(), "tgt of an ignored row must stay untouched"

    m, s, a, _, _, _ = _run_stats(sv, ENTROPY, dtype, z_wide, None, targets, inv_temp, vc)
    close(m + s.log() - a / s, ent, dtype)

    m, s, a, mr, sr, _ = _run_stats(sv, EXACT_KL, dtype, z_wide, r_wide, targets, inv_temp, vc)
    close(mr + sr.log(), lse_r, dtype)
    close(a / s - (m + s.log()) + (mr + sr.log()), kl, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_stats_fwd_all_neg_inf_chunk_leaves_state(sv, device, dtype):
    z = torch.full((2, 40), -math.inf, dtype=dtype, device=device)
    m = torch.tensor([-math.inf, 1.5], dtype=dtype, device=device)
    s = torch.tensor([0.0, 2.0], dtype=dtype, device=device)
    a = torch.tensor([0.0, 3.0], dtype=dtype, device=device)
    sv.softmax_stats_fwd(ENTROPY, CODE[dtype], z, 40, None, 0, 2, 40, 0, 1.0, None, m, s, a, None, None, None)
    assert m[0] == -math.inf and s.tolist() == [0.0, 2.0] and a.tolist() == [0.0, 3.0] and m[1] == 1.5


def _run_grad(sv, mode, dtype, z_wide, r_wide, targets, inv_temp, vc, lse, lse_r, aux, g, in_place):
    """Gradient chunks written into a NaN-poisoned wider matrix (or into a copy of z, in place)."""
    out_wide = z_wide.clone() if in_place else nan_like((N, V + 3 * PAD), dtype, z_wide.device)
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        z = (out_wide if in_place else z_wide)[:, PAD + v0:PAD + v1]
        out = z if in_place else out_wide[:, 2 * PAD + v0:2 * PAD + v1]
        r = r_wide[:, PAD + v0:PAD + v1] if r_wide is not None else None
        sv.softmax_grad(mode, CODE[dtype], z, z.stride(0), r, 0 if r is None else r.stride(0), out, out.stride(0), N,
                        v1 - v0, v0, inv_temp, targets, lse, lse_r, aux, g)
    off = PAD if in_place else 2 * PAD
    return out_wide, out_wide[:, off:off + V]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_place", [False, True])
def test_softmax_grad_matches_autograd(sv, device, dtype, in_place):
    inv_temp, vc = 1 / 1.3, 128
    z_wide, z = _logits(dtype, 2, device)
    r_wide, r = _logits(dtype, 3, device)
    targets = _targets(device)
    g = torch.randn(N, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g[targets.cpu() < 0] = 0  # ra3/ops zeroes the upstream gradient of ignored rows
    z64 = z.double().cpu().requires_grad_()
    x, y = z64 * inv_temp, r.double().cpu() * inv_temp
    lse, logp, ent, kl, lse_r = _reference(x, y)
    keep = targets.cpu() >= 0
    picked = torch.zeros(N, dtype=torch.float64)
    picked[keep] = logp[keep, targets.cpu()[keep]]
    expected = {mode: torch.autograd.grad((g * val).sum(), z64, retain_graph=True)[0]
                for mode, val in ((LOGPROB, picked), (ENTROPY, ent), (EXACT_KL, kl))}
    c = lambda t: t.detach().to(dtype).to(device).contiguous()  # noqa: E731
    for mode, aux in ((LOGPROB, None), (ENTROPY, c(ent)), (EXACT_KL, c(kl))):
        out_wide, out = _run_grad(sv, mode, dtype, z_wide, r_wide if mode == EXACT_KL else None, targets, inv_temp,
                                  vc, c(lse), c(lse_r) if mode == EXACT_KL else None, aux, c(g), in_place)
        close(out, expected[mode], dtype, msg=f"mode {mode}")
        if not in_place:  # columns outside the chunks must not be touched
            assert out_wide[:, :2 * PAD].isnan().all() and out_wide[:, 2 * PAD + V:].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_grad_masked_vocabulary_gives_zero_not_nan(sv, device, dtype):
    z_wide, z = _logits(dtype, 5, device, neg_inf=True)
    r_wide, r = _logits(dtype, 6, device)
    x, y = z.double().cpu(), r.double().cpu()
    lse, logp, ent, kl, lse_r = _reference(x, y)
    g = torch.ones(N, dtype=dtype, device=device)
    c = lambda t: t.to(dtype).to(device).contiguous()  # noqa: E731
    p = logp.exp()
    for mode, aux, expected in (
            (ENTROPY, c(ent), -p * (logp + ent[:, None])),
            (EXACT_KL, c(kl), p * (logp - (y - lse_r[:, None]) - kl[:, None]))):
        _, out = _run_grad(sv, mode, dtype, z_wide, r_wide if mode == EXACT_KL else None, _targets(device), 1.0, 128,
                           c(lse), c(lse_r) if mode == EXACT_KL else None, aux, g, False)
        assert not out.isnan().any()
        masked = z.isinf()
        assert out[masked].eq(0).all()
        close(out, torch.where(masked.cpu(), torch.zeros_like(expected), expected), dtype)


# --- segment sums, KL estimators, group advantages, policy loss ------------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 elements in the memory-bound kernels: multi-program grids and multi-block row loops."""
    from ra3.kernels import group_advantages, kl_estimator, policy_loss, segment_sum

    for mod in (group_advantages, kl_estimator, policy_loss, segment_sum):
        monkeypatch.setattr(mod, "BLOCK", 16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_sum_fwd_bwd(device, small_blocks, dtype):
    from ra3.kernels.segment_sum import segment_sum_bwd, segment_sum_fwd

    gen = torch.Generator().manual_seed(7)
    n, num_segments = 300, 9
    values = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    ids = torch.randint(-2, num_segments, (n,), generator=gen)  # -2, -1: no segment
    ids[ids == 4] = 7  # segment 4 stays empty
    out = nan_like((num_segments,), dtype, device)
    segment_sum_fwd(CODE[dtype], values.to(device), ids.to(device), n, num_segments, out)
    keep = ids >= 0
    expected = torch.zeros(num_segments, dtype=torch.float64).index_add_(0, ids[keep], values[keep].double())
    close(out, expected, dtype)
    assert out[4] == 0

    grad_out = torch.randn(num_segments, generator=gen, dtype=torch.float64).to(dtype)
    grad = nan_like((n,), dtype, device)
    segment_sum_bwd(CODE[dtype], grad_out.to(device), ids.to(device), n, grad)
    expected = torch.where(keep, grad_out[ids.clamp_min(0)], torch.zeros((), dtype=dtype))
    assert torch.equal(grad.cpu(), expected)

    out = nan_like((3,), dtype, device)  # no tokens: every segment is 0
    segment_sum_fwd(CODE[dtype], values[:0].to(device), ids[:0].to(device), 0, 3, out)
    assert out.eq(0).all()


KL_FORMULAS = {1: lambda d: d, 2: lambda d: d * d / 2, 3: lambda d: torch.exp(-d) - 1 + d}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", [1, 2, 3])
def test_kl_estimator_fwd_bwd(device, small_blocks, dtype, estimator):
    from ra3.kernels.kl_estimator import kl_estimator_bwd, kl_estimator_fwd

    gen = torch.Generator().manual_seed(estimator)
    n = 213
    lp = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.5 - 2).to(dtype)
    ref = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.5 - 2).to(dtype)
    lp[:4] = ref[:4]  # d = 0 exactly
    ref[4:10] = 0.0
    lp[4:10] = torch.tensor([1e-3, -1e-3, 0.4999, -0.5001, 30.0, -30.0], dtype=dtype)  # tiny d, the polynomial's
    # edge, and far from 0
    lp64 = lp.double().requires_grad_()
    k = KL_FORMULAS[estimator](lp64 - ref.double())
    out = nan_like((n,), dtype, device)
    kl_estimator_fwd(CODE[dtype], estimator, lp.to(device), ref.to(device), n, out)
    close(out, k.detach(), dtype, atol=1e-6 if dtype == torch.float32 else 1e-14)
    assert out[:4].eq(0).all()
    if estimator == 3:  # relative accuracy where d is tiny: expm1(-d) + d, not exp(-d) - 1 + d (off by ~10%)
        d = lp[4:6].double()
        close(out[4:6], torch.expm1(-d) + d, dtype, rtol=3e-3 if dtype == torch.float32 else 1e-9, atol=0)

    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    (expected,) = torch.autograd.grad((k * g.double()).sum(), lp64)
    grad = nan_like((n,), dtype, device)
    kl_estimator_bwd(CODE[dtype], estimator, lp.to(device), ref.to(device), g.to(device), n, grad)
    close(grad, expected, dtype)


NORMALIZE = {"none": 0, "mean": 1, "std": 2, "rloo": 3}


def _group_adv_reference(r, gids, num_groups, normalize, eps):
    """Straightforward per-group loop in float64 (autograd-able)."""
    out = torch.zeros_like(r)
    means, stds = torch.zeros(num_groups, dtype=r.dtype), torch.zeros(num_groups, dtype=r.dtype)
    for k in range(num_groups):
        idx = (gids == k).nonzero().flatten()
        if len(idx) == 0:
            continue
        rk = r[idx]
        c = len(idx)
        mu = rk.mean()
        sd = rk.std(unbiased=True) if c > 1 else torch.zeros((), dtype=r.dtype)
        means[k], stds[k] = mu.detach(), sd.detach()
        if normalize == "none":
            val = rk
        elif normalize == "mean":
            val = rk - mu
        elif normalize == "std":
            val = (rk - mu) / (sd + eps)
        else:
            val = (rk - mu) * c / (c - 1) if c > 1 else torch.zeros_like(rk)
        out = out.index_put((idx,), val)
    return out, means, stds


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", list(NORMALIZE))
def test_group_adv_fwd_bwd(device, small_blocks, dtype, normalize):
    from ra3.kernels.group_advantages import group_adv_bwd, group_adv_fwd

    gen = torch.Generator().manual_seed(11)
    # Groups: 0 has 4 samples, 1 has one (size-1 group), 2 is empty, 3 has 3 equal rewards (sd = 0), 4 has 5,
    # then 40 more samples spread over groups 5-6 so the scatters span several programs.
    gids = torch.cat([torch.tensor([0, 3, 0, 1, 4, 4, 0, 3, 4, 4, 0, 3, 4]), 5 + torch.arange(40) % 2])
    num_groups, n, eps = 7, gids.numel(), 1e-6
    rewards = torch.randn(n, generator=gen, dtype=torch.float64)
    rewards[gids == 3] = 0.25
    rewards = rewards.to(dtype)
    r64 = rewards.double().requires_grad_()
    expected, means, stds = _group_adv_reference(r64, gids, num_groups, normalize, eps)

    out, mean, std = nan_like((n,), dtype, device), nan_like((num_groups,), dtype, device), \
        nan_like((num_groups,), dtype, device)
    group_adv_fwd(CODE[dtype], rewards.to(device), gids.to(device), n, num_groups, NORMALIZE[normalize], eps, out,
                  mean, std)
    close(out, expected.detach(), dtype)
    close(mean, means, dtype)
    close(std, stds, dtype)
    assert mean[2] == 0 and std[2] == 0 and std[1] == 0 and std[3] == 0

    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    (expected_grad,) = torch.autograd.grad((expected * g.double()).sum(), r64)
    grad = nan_like((n,), dtype, device)
    group_adv_bwd(CODE[dtype], rewards.to(device), gids.to(device), n, num_groups, NORMALIZE[normalize], eps, mean,
                  std, g.to(device), grad)
    # The sd = 0 group's autograd gradient goes through std's undefined derivative at 0; the contract drops it.
    ok = gids != 3
    close(grad.cpu()[ok], expected_grad[ok], dtype, rtol=1e-4 if dtype == torch.float32 else 1e-10)
    if normalize == "std":
        g3 = g[gids == 3].double()
        close(grad.cpu()[gids == 3], (g3 - g3.mean()) / eps, dtype, rtol=1e-4 if dtype == torch.float32 else 1e-10)
    assert not grad.isnan().any()


AGGREGATION = {"token-mean": 0, "seq-mean-token-sum": 1, "seq-mean-token-mean": 2}


def _policy_loss_reference(lp, old, adv, mask, ref, kl_coef, estimator, clip_low, clip_high, aggregation):
    B = lp.shape[0]
    a = adv if adv.dim() == 2 else adv[:, None]
    ratio = torch.exp(lp - old)
    unclipped = -ratio * a
    clipped = -ratio.clamp(1 - clip_low, 1 + clip_high) * a
    is_clipped = clipped > unclipped
    per_token = torch.maximum(unclipped, clipped)
    kl = KL_FORMULAS[estimator](lp - ref) if (ref is not None and kl_coef != 0) else torch.zeros_like(lp)
    per_token = torch.where(mask > 0, per_token + kl_coef * kl, torch.zeros_like(lp))
    total = mask.sum()
    if aggregation == "token-mean":
        loss = (per_token * mask).sum() / total if total > 0 else (per_token * mask).sum() * 0
    elif aggregation == "seq-mean-token-sum":
        loss = (per_token * mask).sum() / B
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
def test_policy_loss_fwd(device, small_blocks, dtype, aggregation, adv_per_token, with_ref, estimator):
    from ra3.kernels.policy_loss import policy_loss_fwd

    gen = torch.Generator().manual_seed(13)
    B, T = 20, 37  # 2 blocks of rows in the reduction, 3 blocks of tokens per row
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    old = rnd(B, T) * 0.3 - 1.5
    lp = old + rnd(B, T) * 0.3  # ratios both inside and outside [0.8, 1.28]
    adv = rnd(B, T) if adv_per_token else rnd(B)
    mask = (torch.rand(B, T, generator=gen) > 0.3).double() * (1 + torch.rand(B, T, generator=gen, dtype=torch.float64))
    mask[2] = 0  # a sequence without tokens
    lp[mask == 0] = math.nan  # padding the kernel must never read
    ref = old + rnd(B, T) * 0.2 if with_ref else None
    lp64 = lp.clone().requires_grad_()
    loss, stats = _policy_loss_reference(lp64, old, adv, mask, ref, 0.1, estimator, 0.2, 0.28, aggregation)
    (grad_expected,) = torch.autograd.grad(loss, lp64)
    grad_expected = torch.where(mask > 0, grad_expected, torch.zeros_like(grad_expected))
    c = lambda t: None if t is None else t.to(dtype).to(device).contiguous()  # noqa: E731
    loss_out, grad, stats_out = nan_like((1,), dtype, device), nan_like((B, T), dtype, device), \
        nan_like((4,), dtype, device)
    policy_loss_fwd(CODE[dtype], B, T, c(lp), c(old), c(adv), int(adv_per_token), c(mask), c(ref), 0.1, estimator,
                    0.2, 0.28, AGGREGATION[aggregation], loss_out, grad, stats_out)
    close(loss_out[0], loss.detach(), dtype)
    close(grad, grad_expected, dtype)
    close(stats_out, stats.detach(), dtype)
    assert (grad[2] == 0).all() and (grad.cpu()[mask == 0] == 0).all()


def test_policy_loss_fwd_no_tokens(device):
    from ra3.kernels.policy_loss import policy_loss_fwd

    loss, grad, stats = nan_like((1,), torch.float32, device), nan_like((2, 3), torch.float32, device), \
        nan_like((4,), torch.float32, device)
    z = torch.zeros(2, 3, device=device)
    for agg in AGGREGATION.values():
        policy_loss_fwd(0, 2, 3, z, z, torch.ones(2, device=device), 0, z, None, 0.0, 3, 0.2, 0.2, agg, loss, grad,
                        stats)
        assert loss.item() == 0 and (grad == 0).all() and (stats == 0).all()


def test_launchers_reject_bad_tags(device):
    from ra3.kernels import launcher

    x = torch.zeros(4, device=device)
    with pytest.raises(ValueError, match="launcher"):
        launcher("no_such_kernel")
    with pytest.raises(TypeError, match="dtype"):
        launcher("kl_estimator_fwd")(1, 3, x, x, 4, x)  # float32 tensors under the float64 tag
    with pytest.raises(ValueError, match="estimator"):
        launcher("kl_estimator_fwd")(0, 4, x, x, 4, x)
    with pytest.raises(ValueError, match="mode"):
        launcher("softmax_stats_fwd")(3, 0, x[None], 4, None, 0, 1, 4, 0, 1.0, None, x[:1], x[:1], None, None, None,
                                      None)


# --- the fused-matmul design -------------------------------------------------------------------------------------


@pytest.fixture
def fused(monkeypatch):
    """The linear ops on the fused-matmul design, with 16-wide tiles (several token and vocabulary tiles, ragged
    edges) and the vocabulary in 3 splits where it has 3 tiles (the merge kernel; fewer tiles, fewer splits)."""
    from ra3.kernels import fused_linear

    monkeypatch.setattr(_vocab_chunks, "TRITON_FUSED_LINEAR", True)
    small = dict(BLOCK_N=16, BLOCK_V=16, BLOCK_H=16)
    monkeypatch.setattr(fused_linear, "TILES", {torch.float32: small, torch.float64: small})
    monkeypatch.setattr(fused_linear, "_splits", lambda n_tiles, vocab_tiles, dev: 3)
    calls = []
    for name in ("linear_softmax_stats_fwd", "linear_softmax_grad"):
        original = getattr(fused_linear, name)

        def counted(*args, _original=original, _name=name, **kw):
            calls.append(_name)
            return _original(*args, **kw)
        monkeypatch.setattr(fused_linear, name, counted)
    return calls


@pytest.mark.parametrize("dtype", test_ops_vocab.DTYPES)
@pytest.mark.parametrize("shape", test_ops_vocab.SHAPES)
@pytest.mark.parametrize("bias", (False, True))
def test_fused_linear_logprobs_matches_reference(fused, dtype, shape, bias):
    test_ops_vocab.test_linear_logprobs_matches_reference("triton", dtype, shape, bias, None)
    assert fused == ["linear_softmax_stats_fwd", "linear_softmax_grad"], "the fused kernels did not run"


@pytest.mark.parametrize("dtype", test_ops_vocab.DTYPES)
@pytest.mark.parametrize("bias", (False, True))
def test_fused_linear_entropy_matches_reference(fused, dtype, bias):
    test_ops_vocab.test_linear_entropy_matches_reference("triton", dtype, bias, None)
    assert fused == ["linear_softmax_stats_fwd", "linear_softmax_grad"]


@pytest.mark.parametrize("dtype", test_ops_vocab.DTYPES)
def test_fused_linear_exact_kl_matches_reference(fused, dtype):
    test_ops_vocab.test_linear_exact_kl_matches_reference("triton", dtype, None)
    assert fused == ["linear_softmax_stats_fwd", "linear_softmax_grad"]


def test_fused_linear_large_logits_all_ignored_and_segments(fused):
    test_ops_vocab.test_linear_logprobs_large_logits_and_all_ignored("triton", None)
    test_ops_vocab.test_linear_logprobs_segments("triton", None)
    assert set(fused) == {"linear_softmax_stats_fwd", "linear_softmax_grad"}


def test_fused_linear_gradcheck_float64(fused):
    test_ops_vocab.test_gradcheck_float64("triton", None)


def test_fused_linear_hidden_only_and_strided_inputs(fused, device):
    """Gradient w.r.t. hidden only (no weight gradient: the kernel skips grad_weight), from a strided hidden."""
    h = torch.randn(7, 30, device=device)[:, 3:19].requires_grad_()  # row stride 30
    weight = torch.randn(45, 16, device=device) / 4
    targets = torch.randint(0, 45, (7,), device=device)
    out = ops.linear_logprobs(h, weight, targets, temperature=1.7, backend="triton")
    expected = reference.linear_logprobs(h.detach().double().cpu().requires_grad_(), weight.double().cpu(),
                                         targets.cpu(), temperature=1.7)
    assert_close(out, expected, torch.float32, "log-probs")
    (gh,) = torch.autograd.grad(out.sum(), h)
    h64 = h.detach().double().cpu().requires_grad_()
    (gh_want,) = torch.autograd.grad(reference.linear_logprobs(h64, weight.double().cpu(), targets.cpu(),
                                                               temperature=1.7).sum(), h64)
    assert_close(gh, gh_want, torch.float32, "grad hidden")
    assert fused == ["linear_softmax_stats_fwd", "linear_softmax_grad"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [LOGPROB, ENTROPY, EXACT_KL])
@pytest.mark.parametrize("splits", [1, 3])
def test_fused_stats_write_every_output_and_match_chunks(sv, device, monkeypatch, dtype, mode, splits):
    """The fused launcher writes its whole state (NaN-poisoned first) and agrees with the chunked walk over
    hidden @ weight.T (softmax_stats_fwd), for every mode, with and without vocabulary splits."""
    from ra3.kernels import fused_linear

    small = dict(BLOCK_N=16, BLOCK_V=16, BLOCK_H=16)
    monkeypatch.setattr(fused_linear, "TILES", {torch.float32: small, torch.float64: small})
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
    fused_linear.linear_softmax_stats_fwd(mode, CODE[dtype], hidden, weight, bias, ref_hidden if kl else None,
                                          ref_weight if kl else None, None, targets, inv_temp, *state,
                                          splits=splits)
    m, s, a, mr, sr, tgt = state
    want = dict(zip("m s a mr sr tgt".split(), _chunked_state(sv, mode, dtype, hidden @ weight.T + bias,
                                                               ref_hidden @ ref_weight.T if kl else None, targets,
                                                               inv_temp)))
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


def _chunked_state(sv, mode, dtype, z, r, targets, inv_temp, vc=10):
    n, v = z.shape
    dev = z.device
    m = torch.full((n,), -math.inf, dtype=dtype, device=dev)
    s, a, tgt = (torch.zeros(n, dtype=dtype, device=dev) for _ in range(3))
    mr = torch.full((n,), -math.inf, dtype=dtype, device=dev) if r is not None else None
    sr = torch.zeros(n, dtype=dtype, device=dev) if r is not None else None
    for v0 in range(0, v, vc):
        v1 = min(v, v0 + vc)
        zc = z[:, v0:v1]
        rc = r[:, v0:v1] if r is not None else None
        sv.softmax_stats_fwd(mode, CODE[dtype], zc, zc.stride(0), rc, 0 if rc is None else rc.stride(0), n, v1 - v0,
                             v0, inv_temp, targets, m, s, a, mr, sr, tgt)
    return m, s, a, mr, sr, tgt


@pytest.mark.parametrize("mode", [LOGPROB, ENTROPY, EXACT_KL])
def test_fused_grad_writes_every_output(device, monkeypatch, mode):
    """The fused backward overwrites NaN-poisoned gradient buffers completely (it zeroes, then accumulates)."""
    from ra3.kernels import fused_linear

    small = dict(BLOCK_N=16, BLOCK_V=16, BLOCK_H=16)
    monkeypatch.setattr(fused_linear, "TILES", {torch.float32: small, torch.float64: small})
    n, h, v = 18, 20, 35
    hidden, weight, bias = torch.randn(n, h, device=device), torch.randn(v, h, device=device) / 3, \
        torch.randn(v, device=device)
    ref_hidden, ref_weight = torch.randn(n, 8, device=device), torch.randn(v, 8, device=device)
    targets = torch.randint(0, v, (n,), device=device)
    kl = mode == EXACT_KL
    x = (hidden.double() @ weight.double().T + bias.double()).cpu()
    y = (ref_hidden.double() @ ref_weight.double().T).cpu()
    lse, _, ent, kl_value, lse_r = _reference(x, y)
    aux = {LOGPROB: None, ENTROPY: ent, EXACT_KL: kl_value}[mode]
    f = lambda t: None if t is None else t.float().to(device)  # noqa: E731
    gh, gw, gb = nan_like((n, h), torch.float32, device), nan_like((v, h), torch.float32, device), \
        nan_like((v,), torch.float32, device)
    fused_linear.linear_softmax_grad(mode, 0, hidden, weight, bias, ref_hidden if kl else None,
                                     ref_weight if kl else None, None, targets, 1.0, f(lse), f(lse_r) if kl else None,
                                     f(aux), torch.ones(n, device=device), gh, gw, gb)
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


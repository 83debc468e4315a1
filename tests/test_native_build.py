"""Kernel-level tests of the native extension ``ra3._C``: build info, and every ``cpu_*`` entry point against a
float64 PyTorch formula, called exactly as ra3/ops does (raw pointers, sizes, dtype tags).

Each test also poisons the output buffers with NaN first and checks that every element was written, and uses
strided chunks of wider matrices (pointer offsets, ``ld*`` != chunk width), targets outside the chunk, negative
ids, empty segments and groups of one. The op-level tests (autograd, dispatch, CUDA) live in test_ops_*.py.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

if importlib.util.find_spec("ra3._C") is None:
    pytest.skip("ra3._C is not built (RA3_NO_NATIVE=1 or a pure-Python install); build it with `pip install -e .`",
                allow_module_level=True)
from ra3 import _C  # noqa: E402  (a built module that fails to import must fail the tests, not skip them)

DTYPES = (torch.float32, torch.float64)
CODE = {torch.float32: 0, torch.float64: 1}
# Tolerances against a float64 reference; float32 kernels accumulate in float32 (as the contract says).
TOL = {torch.float32: dict(rtol=3e-5, atol=3e-5), torch.float64: dict(rtol=1e-11, atol=1e-12)}
LOGPROB, ENTROPY, EXACT_KL = 0, 1, 2


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def close(actual, expected, dtype, **kw):
    torch.testing.assert_close(actual.double(), expected.double(), **{**TOL[dtype], **kw})


def nan_like(shape, dtype):
    return torch.full(shape, math.nan, dtype=dtype)


# --- build ----------------------------------------------------------------------------------------------------


def test_build_info_describes_the_build():
    info = _C.build_info()
    assert isinstance(info["compiler"], str) and info["compiler"]
    assert isinstance(info["openmp"], bool)
    assert info["openmp_max_threads"] >= 1
    assert isinstance(info["cuda_archs"], list)
    assert isinstance(info["cpu_isa_variants"], list) and isinstance(info["native_arch"], bool)
    assert isinstance(_C.cuda_usable(), bool)
    assert _C.has_cuda() == (info["cuda_version"] is not None)
    if _C.has_cuda():
        assert all(a.strip() for a in info["cuda_archs"]) and info["cuda_archs"]
        assert hasattr(_C, "cuda_softmax_stats_fwd") and hasattr(_C, "cuda_policy_loss_fwd")
    else:
        assert info["cuda_archs"] == [] and not hasattr(_C, "cuda_softmax_stats_fwd")
        assert _C.cuda_usable() is False


def test_every_contract_function_is_exported():
    for name in ("softmax_stats_fwd", "softmax_grad", "segment_sum_fwd", "segment_sum_bwd", "kl_estimator_fwd",
                 "kl_estimator_bwd", "group_adv_fwd", "group_adv_bwd", "policy_loss_fwd"):
        assert callable(getattr(_C, "cpu_" + name)), name


# --- softmax over vocabulary chunks ----------------------------------------------------------------------------

N, V, PAD = 6, 300, 5  # logits live in columns [PAD, PAD + V) of an [N, V + 2 * PAD] matrix


def _logits(dtype, seed, neg_inf=False):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(N, V + 2 * PAD, generator=g, dtype=torch.float64) * 3
    if neg_inf:
        wide[0, PAD:PAD + 140] = -math.inf  # row 0: the whole first chunk is -inf (the state must stay empty)
        wide[1, PAD + 7::11] = -math.inf  # row 1: scattered masked vocabulary entries
    return wide.to(dtype), wide[:, PAD:PAD + V]


def _targets():
    # -100: ignored; others fall in the first, middle and last chunk, including both chunk edges.
    return torch.tensor([3, -100, 127, 128, 299, 200], dtype=torch.int64)


def _run_stats(mode, dtype, z_wide, r_wide, targets, inv_temp, vc):
    """Walks the vocabulary in chunks of vc, as ra3/ops/_vocab_chunks.py does, and returns the running state."""
    m = torch.full((N,), -math.inf, dtype=dtype)
    s, a, tgt = torch.zeros(N, dtype=dtype), torch.zeros(N, dtype=dtype), torch.zeros(N, dtype=dtype)
    mr = torch.full((N,), -math.inf, dtype=dtype) if mode == EXACT_KL else None
    sr = torch.zeros(N, dtype=dtype) if mode == EXACT_KL else None
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        z = z_wide[:, PAD + v0:PAD + v1]
        r = r_wide[:, PAD + v0:PAD + v1] if r_wide is not None else None
        _C.cpu_softmax_stats_fwd(mode, CODE[dtype], ptr(z), z.stride(0), ptr(r), 0 if r is None else r.stride(0),
                                 N, v1 - v0, v0, inv_temp, ptr(targets), ptr(m), ptr(s),
                                 ptr(a) if mode != LOGPROB else 0, ptr(mr), ptr(sr), ptr(tgt))
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
def test_softmax_stats_fwd_matches_logsumexp(dtype, vc, neg_inf):
    inv_temp = 1 / 0.7
    z_wide, z = _logits(dtype, 0, neg_inf)
    r_wide, r = _logits(dtype, 1)
    targets = _targets()
    x, y = z.double() * inv_temp, r.double() * inv_temp
    lse, logp, ent, kl, lse_r = _reference(x, y)

    m, s, _, _, _, tgt = _run_stats(LOGPROB, dtype, z_wide, None, targets, inv_temp, vc)
    close(m + s.log(), lse, dtype)
    keep = targets >= 0
    close(tgt[keep], x[keep, targets[keep]], dtype)
    assert tgt[~keep].eq(0).all(), "tgt of an ignored row must stay untouched"

    m, s, a, _, _, _ = _run_stats(ENTROPY, dtype, z_wide, None, targets, inv_temp, vc)
    close(m + s.log() - a / s, ent, dtype)

    m, s, a, mr, sr, _ = _run_stats(EXACT_KL, dtype, z_wide, r_wide, targets, inv_temp, vc)
    close(mr + sr.log(), lse_r, dtype)
    close(a / s - (m + s.log()) + (mr + sr.log()), kl, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_stats_fwd_all_neg_inf_chunk_leaves_state(dtype):
    z = torch.full((2, 8), -math.inf, dtype=dtype)
    m = torch.tensor([-math.inf, 1.5], dtype=dtype)
    s = torch.tensor([0.0, 2.0], dtype=dtype)
    a = torch.tensor([0.0, 3.0], dtype=dtype)
    _C.cpu_softmax_stats_fwd(ENTROPY, CODE[dtype], ptr(z), 8, 0, 0, 2, 8, 0, 1.0, 0, ptr(m), ptr(s), ptr(a), 0, 0, 0)
    assert m[0] == -math.inf and s.tolist() == [0.0, 2.0] and a.tolist() == [0.0, 3.0] and m[1] == 1.5


def _run_grad(mode, dtype, z_wide, r_wide, targets, inv_temp, vc, lse, lse_r, aux, g, in_place):
    """Gradient chunks written into a NaN-poisoned wider matrix (or into a copy of z, in place)."""
    out_wide = z_wide.clone() if in_place else nan_like((N, V + 3 * PAD), dtype)
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        z = (out_wide if in_place else z_wide)[:, PAD + v0:PAD + v1]
        out = z if in_place else out_wide[:, 2 * PAD + v0:2 * PAD + v1]
        r = r_wide[:, PAD + v0:PAD + v1] if r_wide is not None else None
        _C.cpu_softmax_grad(mode, CODE[dtype], ptr(z), z.stride(0), ptr(r), 0 if r is None else r.stride(0),
                            ptr(out), out.stride(0), N, v1 - v0, v0, inv_temp, ptr(targets), ptr(lse), ptr(lse_r),
                            ptr(aux), ptr(g))
    off = PAD if in_place else 2 * PAD
    return out_wide, out_wide[:, off:off + V]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_place", [False, True])
def test_softmax_grad_matches_autograd(dtype, in_place):
    inv_temp, vc = 1 / 1.3, 128
    z_wide, z = _logits(dtype, 2)
    r_wide, r = _logits(dtype, 3)
    targets = _targets()
    g = torch.randn(N, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g[targets < 0] = 0  # ra3/ops zeroes the upstream gradient of ignored rows
    z64 = z.double().requires_grad_()
    x, y = z64 * inv_temp, r.double() * inv_temp
    lse, logp, ent, kl, lse_r = _reference(x, y)
    keep = targets >= 0
    picked = torch.zeros(N, dtype=torch.float64)
    picked[keep] = logp[keep, targets[keep]]
    expected = {mode: torch.autograd.grad((g * val).sum(), z64, retain_graph=True)[0]
                for mode, val in ((LOGPROB, picked), (ENTROPY, ent), (EXACT_KL, kl))}
    c = lambda t: t.detach().to(dtype).contiguous()  # noqa: E731
    for mode, aux in ((LOGPROB, None), (ENTROPY, c(ent)), (EXACT_KL, c(kl))):
        out_wide, out = _run_grad(mode, dtype, z_wide, r_wide if mode == EXACT_KL else None, targets, inv_temp, vc,
                                  c(lse), c(lse_r) if mode == EXACT_KL else None, aux, c(g), in_place)
        close(out, expected[mode], dtype, msg=f"mode {mode}")
        if not in_place:  # columns outside the chunks must not be touched
            assert out_wide[:, :2 * PAD].isnan().all() and out_wide[:, 2 * PAD + V:].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_grad_masked_vocabulary_gives_zero_not_nan(dtype):
    z_wide, z = _logits(dtype, 5, neg_inf=True)
    r_wide, r = _logits(dtype, 6)
    x, y = z.double(), r.double()
    lse, logp, ent, kl, lse_r = _reference(x, y)
    g = torch.ones(N, dtype=dtype)
    c = lambda t: t.to(dtype).contiguous()  # noqa: E731
    p = logp.exp()
    for mode, aux, expected in (
            (ENTROPY, c(ent), -p * (logp + ent[:, None])),
            (EXACT_KL, c(kl), p * (logp - (y - lse_r[:, None]) - kl[:, None]))):
        _, out = _run_grad(mode, dtype, z_wide, r_wide if mode == EXACT_KL else None, _targets(), 1.0, 128,
                           c(lse), c(lse_r) if mode == EXACT_KL else None, aux, g, False)
        assert not out.isnan().any()
        masked = z.isinf()
        assert out[masked].eq(0).all()
        close(out, torch.where(masked, torch.zeros_like(expected), expected), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vectorised_exp_is_accurate_over_its_range(dtype):
    # softmax_grad mode 0 with lse = 0, g = -1, inv_temp = 1 and no target in the chunk writes exp(z) itself.
    lo, hi = (-745.0, 709.0) if dtype == torch.float64 else (-104.0, 88.0)
    z = torch.cat([torch.linspace(lo, hi, 20001, dtype=torch.float64),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, math.log(2), -math.inf, math.inf, math.nan, 1e4, -1e4],
                                dtype=torch.float64)]).to(dtype)[None]
    n = z.shape[1]
    out = nan_like((1, n), dtype)
    one = lambda v: torch.tensor([v], dtype=dtype)  # noqa: E731
    lse, g, t = one(0.0), one(-1.0), torch.tensor([-1], dtype=torch.int64)
    _C.cpu_softmax_grad(LOGPROB, CODE[dtype], ptr(z), n, 0, 0, ptr(out), n, 1, n, 0, 1.0, ptr(t), ptr(lse), 0, 0,
                        ptr(g))
    expected = z.double().exp()
    tiny = torch.finfo(dtype).tiny
    normal = (expected >= tiny * 2) & expected.isfinite()
    eps = torch.finfo(dtype).eps
    rel = ((out.double() - expected).abs() / expected)[normal[0][None]]
    assert rel.max() <= 4 * eps, f"max relative error {rel.max():.3g}"
    # Below the smallest normal the result flushes to (or stays near) zero; above the overflow bound it is inf.
    assert (out[~normal & (expected < tiny * 2)] <= tiny * 2).all()
    assert out[0, -5] == 0 and out[0, -4] == math.inf and math.isnan(out[0, -3]) and out[0, -2] == math.inf
    assert out[0, -1] == 0


# --- segment sums ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_sum_fwd_bwd(dtype):
    gen = torch.Generator().manual_seed(7)
    n, num_segments = 1000, 9
    values = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    ids = torch.randint(-2, num_segments, (n,), generator=gen)  # -2, -1: no segment
    ids[ids == 4] = 7  # segment 4 stays empty
    out = nan_like((num_segments,), dtype)
    _C.cpu_segment_sum_fwd(CODE[dtype], ptr(values), ptr(ids), n, num_segments, ptr(out))
    keep = ids >= 0
    expected = torch.zeros(num_segments, dtype=torch.float64).index_add_(0, ids[keep], values[keep].double())
    close(out, expected, dtype)
    assert out[4] == 0

    grad_out = torch.randn(num_segments, generator=gen, dtype=torch.float64).to(dtype)
    grad = nan_like((n,), dtype)
    _C.cpu_segment_sum_bwd(CODE[dtype], ptr(grad_out), ptr(ids), n, ptr(grad))
    expected = torch.where(keep, grad_out[ids.clamp_min(0)], torch.zeros((), dtype=dtype))
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_sum_fwd_no_tokens_zero_fills(dtype):
    out = nan_like((3,), dtype)
    empty_v, empty_i = torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=torch.int64)
    _C.cpu_segment_sum_fwd(CODE[dtype], ptr(empty_v), ptr(empty_i), 0, 3, ptr(out))
    assert out.eq(0).all()


# --- KL estimators ---------------------------------------------------------------------------------------------

KL_FORMULAS = {1: lambda d: d, 2: lambda d: d * d / 2, 3: lambda d: torch.exp(-d) - 1 + d}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", [1, 2, 3])
def test_kl_estimator_fwd_bwd(dtype, estimator):
    gen = torch.Generator().manual_seed(estimator)
    n = 513
    lp = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.5 - 2).to(dtype)
    ref = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.5 - 2).to(dtype)
    lp[:4] = ref[:4]  # d = 0 exactly
    lp64 = lp.double().requires_grad_()
    k = KL_FORMULAS[estimator](lp64 - ref.double())
    out = nan_like((n,), dtype)
    _C.cpu_kl_estimator_fwd(CODE[dtype], estimator, ptr(lp), ptr(ref), n, ptr(out))
    close(out, k.detach(), dtype, atol=1e-6 if dtype == torch.float32 else 1e-14)
    assert out[:4].eq(0).all()

    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    (expected,) = torch.autograd.grad((k * g.double()).sum(), lp64)
    grad = nan_like((n,), dtype)
    _C.cpu_kl_estimator_bwd(CODE[dtype], estimator, ptr(lp), ptr(ref), ptr(g), n, ptr(grad))
    close(grad, expected, dtype)


# --- group advantages ------------------------------------------------------------------------------------------

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
def test_group_adv_fwd_bwd(dtype, normalize):
    gen = torch.Generator().manual_seed(11)
    # Groups: 0 has 4 samples, 1 has one (size-1 group), 2 is empty, 3 has 3 equal rewards (sd = 0), 4 has 5.
    gids = torch.tensor([0, 3, 0, 1, 4, 4, 0, 3, 4, 4, 0, 3, 4], dtype=torch.int64)
    num_groups, n, eps = 5, 13, 1e-6
    rewards = torch.randn(n, generator=gen, dtype=torch.float64)
    rewards[gids == 3] = 0.25
    rewards = rewards.to(dtype)
    r64 = rewards.double().requires_grad_()
    expected, means, stds = _group_adv_reference(r64, gids, num_groups, normalize, eps)

    out, mean, std = nan_like((n,), dtype), nan_like((num_groups,), dtype), nan_like((num_groups,), dtype)
    _C.cpu_group_adv_fwd(CODE[dtype], ptr(rewards), ptr(gids), n, num_groups, NORMALIZE[normalize], eps, ptr(out),
                         ptr(mean), ptr(std))
    close(out, expected.detach(), dtype)
    close(mean, means, dtype)
    close(std, stds, dtype)
    assert mean[2] == 0 and std[2] == 0 and std[1] == 0 and std[3] == 0

    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    (expected_grad,) = torch.autograd.grad((expected * g.double()).sum(), r64)
    grad = nan_like((n,), dtype)
    _C.cpu_group_adv_bwd(CODE[dtype], ptr(rewards), ptr(gids), n, num_groups, NORMALIZE[normalize], eps, ptr(mean),
                         ptr(std), ptr(g), ptr(grad))
    # The sd = 0 group's autograd gradient goes through std's undefined derivative at 0; the contract drops it.
    ok = gids != 3
    close(grad[ok], expected_grad[ok], dtype, rtol=1e-4 if dtype == torch.float32 else 1e-10)
    if normalize == "std":
        g3 = g[gids == 3].double()
        close(grad[gids == 3], (g3 - g3.mean()) / eps, dtype, rtol=1e-4 if dtype == torch.float32 else 1e-10)
    assert not grad.isnan().any()


# --- policy loss -----------------------------------------------------------------------------------------------

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
    per_token = per_token + kl_coef * kl
    total = mask.sum()
    if aggregation == "token-mean":
        loss = (per_token * mask).sum() / total if total > 0 else (per_token * mask).sum() * 0
    elif aggregation == "seq-mean-token-sum":
        loss = (per_token * mask).sum() / B
    else:
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp_min(torch.finfo(lp.dtype).tiny)).sum() / B
    denom = total if total > 0 else torch.ones(())
    stats = torch.stack([(is_clipped * mask).sum() / denom, (kl * mask).detach().sum() / denom,
                         (ratio * mask).detach().sum() / denom, total])
    if not total > 0:
        stats[:3] = 0
    return loss, stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggregation", list(AGGREGATION))
@pytest.mark.parametrize("adv_per_token,with_ref,estimator", [(False, False, 3), (True, True, 3), (False, True, 1),
                                                                (True, True, 2)])
def test_policy_loss_fwd(dtype, aggregation, adv_per_token, with_ref, estimator):
    gen = torch.Generator().manual_seed(13)
    B, T = 4, 37
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    old = rnd(B, T) * 0.3 - 1.5
    lp = old + rnd(B, T) * 0.3  # ratios both inside and outside [0.8, 1.2]
    adv = rnd(B, T) if adv_per_token else rnd(B)
    ref = old + rnd(B, T) * 0.1 if with_ref else None
    mask = (torch.rand(B, T, generator=gen, dtype=torch.float64) > 0.3).double()
    mask[2] = 0  # a fully masked row
    mask[3, :5] = 0.5  # fractional weights
    lp[2, 0] = math.inf  # garbage under the mask must not leak (ratio would be inf)
    kl_coef = 0.05 if with_ref else 0.0
    cast = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    lp_d, old_d, adv_d, mask_d, ref_d = map(cast, (lp, old, adv, mask, ref))

    lp64 = lp_d.double().clone()
    lp64[2, 0] = 0.0  # the reference has no such guard: give it a harmless value there
    lp64.requires_grad_()
    loss_ref, stats_ref = _policy_loss_reference(lp64, old_d.double(), adv_d.double(), mask_d.double(),
                                                 None if ref_d is None else ref_d.double(), kl_coef, estimator,
                                                 0.2, 0.28, aggregation)
    (grad_ref,) = torch.autograd.grad(loss_ref, lp64)

    loss, grad, stats = nan_like((1,), dtype), nan_like((B, T), dtype), nan_like((4,), dtype)
    _C.cpu_policy_loss_fwd(CODE[dtype], B, T, ptr(lp_d), ptr(old_d), ptr(adv_d), int(adv_per_token), ptr(mask_d),
                           ptr(ref_d), kl_coef, estimator, 0.2, 0.28, AGGREGATION[aggregation], ptr(loss), ptr(grad),
                           ptr(stats))
    close(loss[0], loss_ref.detach(), dtype)
    close(grad, grad_ref, dtype)
    close(stats, stats_ref.detach(), dtype)
    assert grad[2].eq(0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggregation", list(AGGREGATION))
def test_policy_loss_fwd_all_masked_is_zero(dtype, aggregation):
    B, T = 2, 5
    lp, old, adv = torch.zeros(B, T, dtype=dtype), torch.zeros(B, T, dtype=dtype), torch.ones(B, dtype=dtype)
    mask = torch.zeros(B, T, dtype=dtype)
    loss, grad, stats = nan_like((1,), dtype), nan_like((B, T), dtype), nan_like((4,), dtype)
    _C.cpu_policy_loss_fwd(CODE[dtype], B, T, ptr(lp), ptr(old), ptr(adv), 0, ptr(mask), 0, 0.0, 3, 0.2, 0.2,
                           AGGREGATION[aggregation], ptr(loss), ptr(grad), ptr(stats))
    assert loss[0] == 0 and grad.eq(0).all() and stats.eq(0).all()


# --- bad tags --------------------------------------------------------------------------------------------------


def test_bad_tags_raise_value_error_naming_the_argument():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="dtype"):
        _C.cpu_kl_estimator_fwd(2, 1, ptr(x), ptr(x), 4, ptr(x))
    with pytest.raises(ValueError, match="estimator"):
        _C.cpu_kl_estimator_fwd(0, 4, ptr(x), ptr(x), 4, ptr(x))
    with pytest.raises(ValueError, match="mode"):
        _C.cpu_softmax_stats_fwd(3, 0, ptr(x), 4, 0, 0, 1, 4, 0, 1.0, 0, ptr(x), ptr(x), ptr(x), 0, 0, 0)
    with pytest.raises(ValueError, match="normalize"):
        _C.cpu_group_adv_fwd(0, ptr(x), 0, 0, 1, 7, 1e-6, ptr(x), ptr(x), ptr(x))
    with pytest.raises(ValueError, match="aggregation"):
        _C.cpu_policy_loss_fwd(0, 1, 4, ptr(x), ptr(x), ptr(x), 0, ptr(x), 0, 0.0, 3, 0.2, 0.2, 5, ptr(x), ptr(x),
                               ptr(x))
    with pytest.raises(TypeError):
        _C.cpu_segment_sum_fwd(0, -1, 0, 0, 1, ptr(x))  # a negative address is not a pointer

"""Group-relative advantages (GRPO family) and their exact gradient w.r.t. the rewards.

normalize: 0 none (r), 1 mean (r - mean), 2 std ((r - mean) / (unbiased std + eps)), 3 rloo (r - mean of the
others = (r - mean) * c / (c - 1)), 4 batch-std ((r - group mean) / (unbiased std of the whole batch + eps)).
Per-group moments come from atomic scatters into scratch (counts as exact integers), then elementwise kernels;
the variance is two-pass (squared deviations from the finished mean), as in csrc/cpu/group_advantages.cpp; the
batch's moments are the same scatters with every reward under key 0 (WHOLE). Group ids outside [0, num_groups)
read as "no group": out and grad get 0, and they count in no moment.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ra3.kernels._common import check_dtype, grid_1d, scalar_as, sqrt_rn
from ra3.ops.kernel_abi import (NORM_BATCH_STD, NORM_MEAN, NORM_NONE, NORM_RLOO, NORM_STD, GroupAdvBwdArgs,
                                GroupAdvFwdArgs)

BLOCK = 1024


@triton.jit
def _load_group(gid_ptr, i, n, num_groups, WHOLE: tl.constexpr = False):
    """(key, valid, live): the group id (0 for every grouped reward when WHOLE: the batch), i < n, in a group."""
    valid = i < n
    k = tl.load(gid_ptr + i, mask=valid, other=-1)
    live = valid & (k >= 0) & (k < num_groups)
    if WHOLE:
        k = k * 0
    return tl.where(live, k, 0), valid, live


@triton.jit
def _count_sum_kernel(r_ptr, gid_ptr, n, num_groups, count_ptr, sum_ptr, WHOLE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k, valid, live = _load_group(gid_ptr, i, n, num_groups, WHOLE)
    r = tl.load(r_ptr + i, mask=valid, other=0.0)
    tl.atomic_add(count_ptr + k, tl.full(k.shape, 1, tl.int64), mask=live, sem="relaxed")
    tl.atomic_add(sum_ptr + k, r, mask=live, sem="relaxed")


@triton.jit
def _sq_dev_kernel(r_ptr, gid_ptr, n, num_groups, count_ptr, sum_ptr, ss_ptr, WHOLE: tl.constexpr,
                   BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k, valid, live = _load_group(gid_ptr, i, n, num_groups, WHOLE)
    r = tl.load(r_ptr + i, mask=valid, other=0.0)
    c = tl.load(count_ptr + k, mask=live, other=1)
    # The same division as the finished mean in _moments_kernel, so the deviations are from that exact mean.
    mu = tl.load(sum_ptr + k, mask=live, other=0.0) / c.to(r.dtype)
    d = r - mu
    tl.atomic_add(ss_ptr + k, d * d, mask=live, sem="relaxed")


@triton.jit
def _moments_kernel(count_ptr, sum_ptr, ss_ptr, num_groups, mean_ptr, std_ptr, BATCH: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Per group k: mean and unbiased std from count, sum, ss [k]; with BATCH, the std is the batch's (slot 0 of
    count, sum, ss, written there by the WHOLE scatters) in every group, and the means are left as they are."""
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = k < num_groups
    if BATCH:
        slot = k * 0
    else:
        slot = k
    c = tl.load(count_ptr + slot, mask=valid, other=0)
    total = tl.load(sum_ptr + slot, mask=valid, other=0.0)
    cf = c.to(total.dtype)
    ss = tl.load(ss_ptr + slot, mask=valid, other=0.0)
    sd = tl.where(c > 1, sqrt_rn(ss / tl.maximum(cf - 1, 1)), 0.0)  # groups of one: std 0
    if not BATCH:
        tl.store(mean_ptr + k, tl.where(c > 0, total / tl.maximum(cf, 1), 0.0), mask=valid)  # empty: mean 0, std 0
    tl.store(std_ptr + k, sd, mask=valid)


@triton.jit
def _adv_out_kernel(r_ptr, gid_ptr, n, num_groups, eps: tl.float64, count_ptr, mean_ptr, std_ptr, out_ptr,
                    NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k, valid, live = _load_group(gid_ptr, i, n, num_groups)
    r = tl.load(r_ptr + i, mask=valid, other=0.0)
    if NORMALIZE == 0:
        val = r
    else:
        mu = tl.load(mean_ptr + k, mask=live, other=0.0)
        if NORMALIZE == 1:
            val = r - mu
        elif NORMALIZE == 2 or NORMALIZE == 4:
            sd = tl.load(std_ptr + k, mask=live, other=0.0)
            val = (r - mu) / (sd + scalar_as(eps, r.dtype))
        else:
            c = tl.load(count_ptr + k, mask=live, other=0).to(r.dtype)
            val = tl.where(c > 1, (r - mu) * c / tl.maximum(c - 1, 1), 0.0)
    tl.store(out_ptr + i, tl.where(live, val, 0.0), mask=valid)


@triton.jit
def _grad_sums_kernel(r_ptr, gid_ptr, g_ptr, n, num_groups, mean_ptr, count_ptr, gsum_ptr, cov_ptr,
                      BATCH: tl.constexpr, BLOCK: tl.constexpr):
    """Per group: count, sum of g and cov = sum g (r - mu); with BATCH also the batch's count, reward sum and cov
    (summed over groups) in slot num_groups of count, gsum (there the reward sum) and cov."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k, valid, live = _load_group(gid_ptr, i, n, num_groups)
    r = tl.load(r_ptr + i, mask=valid, other=0.0)
    g = tl.load(g_ptr + i, mask=valid, other=0.0)
    mu = tl.load(mean_ptr + k, mask=live, other=0.0)
    one = tl.full(k.shape, 1, tl.int64)
    tl.atomic_add(count_ptr + k, one, mask=live, sem="relaxed")
    tl.atomic_add(gsum_ptr + k, g, mask=live, sem="relaxed")
    tl.atomic_add(cov_ptr + k, g * (r - mu), mask=live, sem="relaxed")
    if BATCH:
        slot = k * 0 + num_groups
        tl.atomic_add(count_ptr + slot, one, mask=live, sem="relaxed")
        tl.atomic_add(gsum_ptr + slot, r, mask=live, sem="relaxed")
        tl.atomic_add(cov_ptr + slot, g * (r - mu), mask=live, sem="relaxed")


@triton.jit
def _adv_grad_kernel(r_ptr, gid_ptr, g_ptr, n, num_groups, eps: tl.float64, mean_ptr, std_ptr, count_ptr, gsum_ptr,
                     cov_ptr, grad_ptr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k, valid, live = _load_group(gid_ptr, i, n, num_groups)
    g = tl.load(g_ptr + i, mask=valid, other=0.0)
    if NORMALIZE == 0:
        gr = g
    else:
        c = tl.load(count_ptr + k, mask=live, other=1).to(g.dtype)
        centred = g - tl.load(gsum_ptr + k, mask=live, other=0.0) / tl.maximum(c, 1)
        if NORMALIZE == 1:
            gr = centred
        elif NORMALIZE == 3:
            gr = tl.where(c > 1, centred * c / tl.maximum(c - 1, 1), 0.0)
        else:
            # out_j = (r_j - mu) / (sd + eps): the centring term, plus the term through sd (absent when sd is 0),
            # whose moments are the group's, or the batch's (slot num_groups, its gsum holding the reward sum).
            r = tl.load(r_ptr + i, mask=valid, other=0.0)
            sd = tl.load(std_ptr + k, mask=live, other=0.0)
            if NORMALIZE == 4:
                slot = k * 0 + num_groups
                sc = tl.load(count_ptr + slot, mask=live, other=1).to(g.dtype)
                mu = tl.load(gsum_ptr + slot, mask=live, other=0.0) / tl.maximum(sc, 1)
            else:
                slot = k
                sc = c
                mu = tl.load(mean_ptr + k, mask=live, other=0.0)
            cov = tl.load(cov_ptr + slot, mask=live, other=0.0)
            s = sd + scalar_as(eps, g.dtype)
            through_sd = (r - mu) * cov / (tl.maximum(sc - 1, 1) * tl.where(sd > 0, sd, 1) * s * s)
            gr = centred / s - tl.where((sc > 1) & (sd > 0), through_sd, 0.0)
    tl.store(grad_ptr + i, tl.where(live, gr, 0.0), mask=valid)


def _check_normalize(normalize: int) -> None:
    if normalize not in (NORM_NONE, NORM_MEAN, NORM_STD, NORM_RLOO, NORM_BATCH_STD):
        raise ValueError(f"normalize must be 0 (none), 1 (mean), 2 (std), 3 (rloo) or 4 (batch-std), got {normalize}")


def _moments(rewards, gids, n, num_groups, mean, std_out, whole: bool) -> torch.Tensor:
    """Per group (or, when ``whole``, for the batch: the std only, written to every group) the mean and std into
    mean and std_out; returns the counts."""
    count = torch.zeros(num_groups, dtype=torch.int64, device=rewards.device)
    total = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)
    ss = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)
    if n > 0:
        _count_sum_kernel[grid_1d(n, BLOCK)](rewards, gids, n, num_groups, count, total, WHOLE=whole, BLOCK=BLOCK)
        _sq_dev_kernel[grid_1d(n, BLOCK)](rewards, gids, n, num_groups, count, total, ss, WHOLE=whole, BLOCK=BLOCK)
    _moments_kernel[grid_1d(num_groups, BLOCK)](count, total, ss, num_groups, mean, std_out, BATCH=whole,
                                                BLOCK=BLOCK)
    return count


def group_adv_fwd(a: GroupAdvFwdArgs) -> None:
    """rewards [n] float32|float64, gids [n] int64 -> out [n] advantages, mean [num_groups], std_dev [num_groups]
    (unbiased; 0 for groups of one and empty groups; with batch-std the batch's, in every group), all overwritten."""
    _check_normalize(a.normalize)
    check_dtype(a.dtype, a.rewards, a.out, a.mean, a.std_dev)
    n, num_groups = a.n, a.num_groups
    if num_groups > 0:
        count = _moments(a.rewards, a.gids, n, num_groups, a.mean, a.std_dev, whole=False)
        if a.normalize == NORM_BATCH_STD:  # std_dev: the batch's std, in every group
            _moments(a.rewards, a.gids, n, num_groups, a.mean, a.std_dev, whole=True)
    else:
        count = torch.zeros(1, dtype=torch.int64, device=a.rewards.device)  # never read: every id is out of range
    if n > 0:
        _adv_out_kernel[grid_1d(n, BLOCK)](a.rewards, a.gids, n, num_groups, a.eps, count, a.mean, a.std_dev, a.out,
                                           NORMALIZE=a.normalize, BLOCK=BLOCK)


def group_adv_bwd(a: GroupAdvBwdArgs) -> None:
    """rewards, g [n] float32|float64, gids [n] int64, mean, std_dev [num_groups] (the forward's) -> grad_r [n] =
    (d out / d rewards)^T g; std's derivative at sd = 0 is dropped."""
    _check_normalize(a.normalize)
    dt = check_dtype(a.dtype, a.rewards, a.mean, a.std_dev, a.g, a.grad_r)
    n, num_groups, dev = a.n, a.num_groups, a.rewards.device
    if n <= 0:
        return
    size = max(num_groups, 1) + 1  # the groups, then the batch (with batch-std)
    count = torch.zeros(size, dtype=torch.int64, device=dev)
    gsum = torch.zeros(size, dtype=dt, device=dev)
    cov = torch.zeros(size, dtype=dt, device=dev)
    if a.normalize != NORM_NONE and num_groups > 0:
        _grad_sums_kernel[grid_1d(n, BLOCK)](a.rewards, a.gids, a.g, n, num_groups, a.mean, count, gsum, cov,
                                             BATCH=a.normalize == NORM_BATCH_STD, BLOCK=BLOCK)
    _adv_grad_kernel[grid_1d(n, BLOCK)](a.rewards, a.gids, a.g, n, num_groups, a.eps, a.mean, a.std_dev, count, gsum,
                                        cov, a.grad_r, NORMALIZE=a.normalize, BLOCK=BLOCK)

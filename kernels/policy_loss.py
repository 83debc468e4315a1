"""Clipped policy-gradient loss with an optional KL penalty, fused: loss, per-token gradient and statistics.

Variants (defined in ra3/ops/policy_loss.py): token or sequence (GSPO) importance ratios, the PPO-clipped or the
CISPO surrogate, and the aggregations below. Three launches, as in csrc/cuda/policy_loss.cu:
  1. one program per row: (with sequence ratios, first the row's weighted mean log-ratio) each masked token's
     loss and unscaled gradient, the row's partial sums into scratch;
  2. one program: totals over rows in row order, the loss, the statistics and each row's aggregation weight;
  3. elementwise: each token's gradient times its row's weight.
Every sum has a fixed shape (no atomics), so the result is reproducible run to run. Tokens with mask 0
contribute exactly 0, even where their log-probs are inf or NaN padding (they are never loaded).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ra3.kernels._common import block, check_dtype, grid_1d, scalar_as
from ra3.kernels.token_math import check_estimator, kl_dlogprob, kl_value
from ra3.ops.kernel_abi import (RATIO_SEQUENCE, RATIO_TOKEN, SEQ_MEAN_TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM, SURROGATE_CISPO,
                                SURROGATE_PPO, TOKEN_MEAN, TOKEN_SUM_NORM, PolicyLossFwdArgs)

# Per-row partial sums, the columns of the [B, 5] scratch.
MASK, LOSS, CLIPPED, KL, RATIO, NUM_ROW_SUMS = 0, 1, 2, 3, 4, 5
BLOCK = 1024


@triton.jit
def _sequence_ratio(lp_ptr, old_ptr, mask_ptr, b, T, BLOCK_T: tl.constexpr):
    """GSPO's sequence ratio of row b: exp of the mask-weighted mean of lp - old over its tokens (1 without any)."""
    dt = lp_ptr.dtype.element_ty
    acc_w = tl.zeros([BLOCK_T], dt)
    acc_d = tl.zeros([BLOCK_T], dt)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        i = b * T + t
        w = tl.load(mask_ptr + i, mask=t < T, other=0.0)
        on = w != 0
        d = tl.load(lp_ptr + i, mask=on, other=0.0) - tl.load(old_ptr + i, mask=on, other=0.0)
        acc_w += tl.where(on, w, 0.0)
        acc_d += tl.where(on, w * d, 0.0)
    total_w = tl.sum(acc_w, 0)
    some = total_w != 0
    return tl.where(some, tl.exp(tl.sum(acc_d, 0) / tl.where(some, total_w, 1)), 1.0)


@triton.jit
def _ppo_rows_kernel(lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, T, kl_coef: tl.float64, clip_low: tl.float64,
                     clip_high: tl.float64, grad_ptr, rows_ptr, ADV_PER_TOKEN: tl.constexpr, USE_KL: tl.constexpr,
                     ESTIMATOR: tl.constexpr, SEQ_LEVEL: tl.constexpr, SURROGATE: tl.constexpr,
                     BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    dt = lp_ptr.dtype.element_ty
    lo = 1 - scalar_as(clip_low, dt)
    hi = 1 + scalar_as(clip_high, dt)
    coef = scalar_as(kl_coef, dt)
    acc_mask = tl.zeros([BLOCK_T], dt)
    acc_loss = tl.zeros([BLOCK_T], dt)
    acc_clipped = tl.zeros([BLOCK_T], dt)
    acc_kl = tl.zeros([BLOCK_T], dt)
    acc_ratio = tl.zeros([BLOCK_T], dt)
    if not ADV_PER_TOKEN:
        adv_row = tl.load(adv_ptr + b)
    if SEQ_LEVEL:
        seq_ratio = _sequence_ratio(lp_ptr, old_ptr, mask_ptr, b, T, BLOCK_T)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        valid = t < T
        i = b * T + t
        w = tl.load(mask_ptr + i, mask=valid, other=0.0)
        on = w != 0
        lp = tl.load(lp_ptr + i, mask=on, other=0.0)
        old = tl.load(old_ptr + i, mask=on, other=0.0)
        if ADV_PER_TOKEN:
            adv = tl.load(adv_ptr + i, mask=on, other=0.0)
        else:
            adv = adv_row
        if SEQ_LEVEL:  # GSPO-token: the sequence ratio's value, d ratio / d lp = ratio
            ratio = tl.zeros([BLOCK_T], dt) + seq_ratio
        else:
            ratio = tl.exp(lp - old)
        clamped = tl.where(ratio < lo, lo, tl.where(ratio > hi, hi, ratio))
        if SURROGATE == 1:  # CISPO: -sg(clip(ratio)) A lp, every token passes a gradient
            is_clipped = (ratio < lo) | (ratio > hi)  # the weight was clipped
            loss = -clamped * adv * lp
            dloss = -clamped * adv
        else:
            unclipped = -ratio * adv
            clipped_term = -clamped * adv
            is_clipped = clipped_term > unclipped  # the clamped branch is strictly larger: active, no gradient
            loss = tl.where(is_clipped, clipped_term, unclipped)
            dloss = tl.where(is_clipped, 0.0, unclipped)  # d(-ratio A)/d lp = -ratio A
        kl = tl.zeros([BLOCK_T], dt)
        if USE_KL:
            d = lp - tl.load(ref_ptr + i, mask=on, other=0.0)
            kl = kl_value(d, ESTIMATOR)
            loss = loss + coef * kl
            dloss = dloss + coef * kl_dlogprob(d, ESTIMATOR)
        acc_mask += tl.where(on, w, 0.0)
        acc_loss += tl.where(on, w * loss, 0.0)
        acc_clipped += tl.where(on & is_clipped, w, 0.0)
        acc_kl += tl.where(on, w * kl, 0.0)
        acc_ratio += tl.where(on, w * ratio, 0.0)
        tl.store(grad_ptr + i, tl.where(on, w * dloss, 0.0), mask=valid)  # times the row's weight, in launch 3
    row = rows_ptr + b * 5
    tl.store(row + 0, tl.sum(acc_mask, 0))
    tl.store(row + 1, tl.sum(acc_loss, 0))
    tl.store(row + 2, tl.sum(acc_clipped, 0))
    tl.store(row + 3, tl.sum(acc_kl, 0))
    tl.store(row + 4, tl.sum(acc_ratio, 0))


@triton.jit
def _inverse_or_zero(x):
    """1 / x where x > 0, else 0."""
    return tl.where(x > 0, 1 / tl.where(x > 0, x, 1), 0.0)


@triton.jit
def _row_scale(row_mask, total_mask, B, tiny, agg_norm, AGGREGATION: tl.constexpr):
    """Aggregation weight of each row: loss = sum_b scale_b * sum_t mask * l."""
    if AGGREGATION == 0:  # token-mean
        return _inverse_or_zero(total_mask) + row_mask * 0
    elif AGGREGATION == 1:  # seq-mean-token-sum
        return row_mask * 0 + 1 / scalar_as(B, row_mask.dtype)
    elif AGGREGATION == 3:  # token sum / agg_norm (Dr. GRPO's B * max length, DAPO's global token count)
        return _inverse_or_zero(agg_norm) + row_mask * 0
    else:  # seq-mean-token-mean
        return 1 / (scalar_as(B, row_mask.dtype) * tl.maximum(row_mask, tiny))


@triton.jit
def _ppo_reduce_kernel(rows_ptr, B, tiny: tl.float64, agg_norm: tl.float64, scale_ptr, loss_ptr, stats_ptr,
                       AGGREGATION: tl.constexpr, BLOCK_B: tl.constexpr):
    dt = rows_ptr.dtype.element_ty
    tiny_t = scalar_as(tiny, dt)
    norm_t = scalar_as(agg_norm, dt)
    acc_mask = tl.zeros([BLOCK_B], dt)
    acc_clipped = tl.zeros([BLOCK_B], dt)
    acc_kl = tl.zeros([BLOCK_B], dt)
    acc_ratio = tl.zeros([BLOCK_B], dt)
    for b0 in range(0, B, BLOCK_B):
        b = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        valid = b < B
        acc_mask += tl.load(rows_ptr + b * 5 + 0, mask=valid, other=0.0)
        acc_clipped += tl.load(rows_ptr + b * 5 + 2, mask=valid, other=0.0)
        acc_kl += tl.load(rows_ptr + b * 5 + 3, mask=valid, other=0.0)
        acc_ratio += tl.load(rows_ptr + b * 5 + 4, mask=valid, other=0.0)
    total_mask = tl.sum(acc_mask, 0)
    acc_loss = tl.zeros([BLOCK_B], dt)
    for b0 in range(0, B, BLOCK_B):
        b = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        valid = b < B
        row_mask = tl.load(rows_ptr + b * 5 + 0, mask=valid, other=0.0)
        row_loss = tl.load(rows_ptr + b * 5 + 1, mask=valid, other=0.0)
        scale = _row_scale(row_mask, total_mask, B, tiny_t, norm_t, AGGREGATION)
        tl.store(scale_ptr + b, scale, mask=valid)
        acc_loss += tl.where(valid, scale * row_loss, 0.0)
    tl.store(loss_ptr, tl.sum(acc_loss, 0))
    some = total_mask > 0
    denom = tl.where(some, total_mask, 1)
    tl.store(stats_ptr + 0, tl.where(some, tl.sum(acc_clipped, 0) / denom, 0.0))
    tl.store(stats_ptr + 1, tl.where(some, tl.sum(acc_kl, 0) / denom, 0.0))
    tl.store(stats_ptr + 2, tl.where(some, tl.sum(acc_ratio, 0) / denom, 0.0))
    tl.store(stats_ptr + 3, total_mask)


@triton.jit
def _scale_rows_kernel(grad_ptr, scale_ptr, numel, T, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = i < numel
    g = tl.load(grad_ptr + i, mask=valid, other=0.0)
    sc = tl.load(scale_ptr + i // T, mask=valid, other=0.0)
    tl.store(grad_ptr + i, g * sc, mask=valid)


def policy_loss_fwd(a: PolicyLossFwdArgs) -> None:
    """lp, old, mask, ref: [B, T] contiguous float32|float64 (mask as 0/1 or weights); adv: [B] or [B, T].

    ratio_level 0 token, 1 sequence (GSPO); surrogate 0 PPO clip, 1 CISPO; aggregation 0 token-mean,
    1 seq-mean-token-sum, 2 seq-mean-token-mean, 3 token sum / agg_norm (0 gives 0; read by 3 only).
    Writes loss_out [1], grad_lp [B, T] (d loss / d lp) and stats_out [4] = (clip fraction, KL mean, ratio mean,
    mask total), the means over masked tokens (0 when there are none). ref is read only when kl_coef != 0.
    """
    check_estimator(a.kl_estimator)
    if a.ratio_level not in (RATIO_TOKEN, RATIO_SEQUENCE):
        raise ValueError(f"ratio_level must be 0 (token) or 1 (sequence), got {a.ratio_level}")
    if a.surrogate not in (SURROGATE_PPO, SURROGATE_CISPO):
        raise ValueError(f"surrogate must be 0 (ppo) or 1 (cispo), got {a.surrogate}")
    if a.aggregation not in (TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM, SEQ_MEAN_TOKEN_MEAN, TOKEN_SUM_NORM):
        raise ValueError(f"aggregation must be 0, 1, 2 or 3, got {a.aggregation}")
    dt = check_dtype(a.dtype, a.lp, a.old, a.adv, a.mask, a.ref, a.loss_out, a.grad_lp, a.stats_out)
    B, T, dev = a.B, a.T, a.lp.device
    use_kl = a.ref is not None and a.kl_coef != 0
    rows = torch.empty(max(B, 1), NUM_ROW_SUMS, dtype=dt, device=dev)
    scale = torch.empty(max(B, 1), dtype=dt, device=dev)
    if B > 0 and T > 0:
        _ppo_rows_kernel[(B,)](a.lp, a.old, a.adv, a.mask, a.ref if use_kl else None, T, a.kl_coef, a.clip_low,
                               a.clip_high, a.grad_lp, rows, ADV_PER_TOKEN=bool(a.adv_per_token), USE_KL=use_kl,
                               ESTIMATOR=a.kl_estimator, SEQ_LEVEL=a.ratio_level == RATIO_SEQUENCE,
                               SURROGATE=a.surrogate, BLOCK_T=block(T, BLOCK))
    else:
        rows.zero_()
    _ppo_reduce_kernel[(1,)](rows, B, torch.finfo(dt).tiny, float(a.agg_norm), scale, a.loss_out, a.stats_out,
                             AGGREGATION=a.aggregation, BLOCK_B=block(B, BLOCK))
    if B * T > 0:
        _scale_rows_kernel[grid_1d(B * T, BLOCK)](a.grad_lp, scale, B * T, T, BLOCK=BLOCK)

"""Softmax over one vocabulary chunk: the online log-sum-exp forward (vocab_softmax_fwd) and the gradient w.r.t.
the logits chunk (vocab_softmax_grad), for log-probs (mode 0), entropy (mode 1) and exact KL (mode 2).

The Triton twin of csrc/cpu/vocab_softmax.cpp, same arguments and state. A chunk is z [n, vc] with row stride
ldz (unit column stride), read as x = z * inv_temp. Per row the running state is
    m  = max over the columns seen so far,   s = sum exp(x - m),
    a  = sum exp(x - m) * (x - m)       (entropy, relative to the max; H = log s - a / s),
    a  = sum exp(x - m) * (x - y)       (exact KL, y = r * inv_temp; KL = a / s - lse + lse_r),
    mr, sr: the same max and sum over y (exact KL),
    tgt = x[targets - v_offset] when the target falls in this chunk (log-probs).
The gradient kernel writes out = d(g * value)/dz for the chunk, given the finished state taken apart: m, logs =
log s and q = a / s (modes 1-2), so log p = (x - m) - logs, log p + H = (x - m) - q and log p - log p_ref - KL =
(x - y) - q carry no rounding of a large log-sum-exp (csrc/ra3_native.h).

One program per row walks the chunk in blocks of BLOCK_V columns, folding each block into the running state
(a block max, then one rescale), so a chunk costs one read in each pass. Where p = exp(lp) is 0 (x = -inf,
masked vocabulary), entropy and KL terms count as 0, not 0 * -inf = NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ra3.kernels._common import block, check_dtype, scalar_as
from ra3.ops.kernel_abi import ENTROPY, EXACT_KL, LOGPROB, VocabSoftmaxFwdArgs, VocabSoftmaxGradArgs

# Columns per block: 2048 float32 (1024 float64) values are 16 per thread of 4 warps, in registers.
MAX_BLOCK_V = {torch.float32: 2048, torch.float64: 1024}


@triton.jit
def _fold_block(m, s, a, x, term, WITH_A: tl.constexpr, RELATIVE: tl.constexpr):
    """Folds one block of x (and, WITH_A, of the per-column term, summed into a) into the running (m, s, a).

    RELATIVE (entropy): the term is x - m for the new max m, ``term`` is ignored, and moving the max from m to mn
    first adds s * (m - mn) to a. While the max is still -inf nothing is added and the state stays as it was.
    """
    mn = tl.maximum(m, tl.max(x, 0))
    live = mn != -float("inf")
    base = tl.where(live, mn, 0.0)
    rescale = tl.exp(m - base)  # m = -inf gives 0: nothing accumulated yet
    e = tl.exp(x - base)
    s_new = s * rescale + tl.sum(e, 0)
    if WITH_A:
        # p = 0 (x = -inf, masked vocabulary): 0 * -inf counts as 0. Selecting the factor, not the product,
        # keeps NaN out of every intermediate.
        if RELATIVE:
            old = a + s * (tl.where(s > 0, m, base) - base)  # s = 0: m = -inf, nothing to shift (no 0 * -inf)
            a = tl.where(live, old * rescale + tl.sum(e * tl.where(e > 0, x - base, 0.0), 0), a)
        else:
            a = tl.where(live, a * rescale + tl.sum(e * tl.where(e > 0, term, 0.0), 0), a)
    return tl.where(live, mn, m), tl.where(live, s_new, s), a


@triton.jit
def _stats_fwd_kernel(z_ptr, ldz, r_ptr, ldr, vc, v_offset, inv_temp: tl.float64, targets_ptr, m_ptr, s_ptr, a_ptr,
                      mr_ptr, sr_ptr, tgt_ptr, MODE: tl.constexpr, HAS_TARGETS: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    dt = z_ptr.dtype.element_ty
    inv = scalar_as(inv_temp, dt)
    z_row = z_ptr + row * ldz
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    a = tl.zeros((), dt)
    if MODE != 0:
        a = tl.load(a_ptr + row)
    if MODE == 2:
        r_row = r_ptr + row * ldr
        mr = tl.load(mr_ptr + row)
        sr = tl.load(sr_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, vc, BLOCK_V):
        j = start + cols
        valid = j < vc
        x = tl.load(z_row + j, mask=valid, other=-float("inf")) * inv
        if MODE == 0:
            m, s, a = _fold_block(m, s, a, x, x, False, False)
        elif MODE == 1:
            m, s, a = _fold_block(m, s, a, x, x, True, True)
        else:
            y = tl.load(r_row + j, mask=valid, other=-float("inf")) * inv
            # no -inf - -inf
            m, s, a = _fold_block(m, s, a, x, x - tl.where(x == -float("inf"), 0.0, y), True, False)
            mr, sr, _unused = _fold_block(mr, sr, a, y, y, False, False)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    if MODE != 0:
        tl.store(a_ptr + row, a)
    if MODE == 2:
        tl.store(mr_ptr + row, mr)
        tl.store(sr_ptr + row, sr)
    if MODE == 0 and HAS_TARGETS:
        t = tl.load(targets_ptr + row)
        local = t - v_offset
        hit = (t >= 0) & (local >= 0) & (local < vc)
        x_t = tl.load(z_row + tl.where(hit, local, 0), mask=hit, other=0.0) * inv
        tl.store(tgt_ptr + row, x_t, mask=hit)  # rows whose target lies elsewhere keep their tgt


@triton.jit
def _grad_kernel(z_ptr, ldz, r_ptr, ldr, out_ptr, ldo, vc, v_offset, inv_temp: tl.float64, targets_ptr, m_ptr,
                 logs_ptr, q_ptr, g_ptr, MODE: tl.constexpr, HAS_TARGETS: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    dt = z_ptr.dtype.element_ty
    inv = scalar_as(inv_temp, dt)
    z_row = z_ptr + row * ldz
    out_row = out_ptr + row * ldo  # may alias z_row (in-place backward): each block is read before it is written
    c = tl.load(g_ptr + row) * inv
    mx = tl.load(m_ptr + row)
    logs = tl.load(logs_ptr + row)
    local = -1
    if MODE == 0 and HAS_TARGETS:
        t = tl.load(targets_ptr + row)
        local = tl.where(t >= 0, t - v_offset, -1)
    if MODE != 0:
        q = tl.load(q_ptr + row)
    if MODE == 2:
        r_row = r_ptr + row * ldr
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, vc, BLOCK_V):
        j = start + cols
        valid = j < vc
        x = tl.load(z_row + j, mask=valid, other=0.0) * inv
        d = x - mx
        p = tl.exp(d - logs)
        if MODE == 0:
            val = -c * p
            val = tl.where(j == local, val + c, val)  # the target's +c
        else:
            # Where p = 0 the value is 0 (not 0 * -inf); the bracket is zeroed there first so no NaN is ever formed.
            live = p > 0
            if MODE == 1:
                val = tl.where(live, -c * p * (tl.where(live, d, 0.0) - q), 0.0)
            else:
                y = tl.load(r_row + j, mask=valid, other=0.0) * inv
                val = tl.where(live, c * p * ((tl.where(live, x, 0.0) - tl.where(live, y, 0.0)) - q), 0.0)
        tl.store(out_row + j, val, mask=valid)


# Both tile kernels are launched with enable_fp_fusion=False: Triton lets the backend contract a product and a following
# add into one fma, and then `z * inv_temp - m` is the exact product minus m, whose rounding error does not cancel at
# the row max (csrc/cpu: -ffp-contract=off; csrc/cuda: __fmul_rn). These kernels are memory-bound: nothing is lost.
# scripts/check_triton_compile.py fails if their PTX holds an fma.
def check_mode(mode: int) -> None:
    if mode not in (LOGPROB, ENTROPY, EXACT_KL):
        raise ValueError(f"mode must be 0 (logprob), 1 (entropy) or 2 (exact KL), got {mode}")


def vocab_softmax_fwd(a: VocabSoftmaxFwdArgs) -> None:
    """Folds the chunk z [n, vc] (row stride ldz; r likewise, mode 2) into the per-row state [n] in place.

    z, r and the state are float32 or float64 (the tag ``dtype``); targets [n] int64 (-1: ignored) and tgt are
    read/written in mode 0 only, a in modes 1-2, mr and sr in mode 2. v_offset is the chunk's first column.
    """
    mode = a.mode
    check_mode(mode)
    dt = check_dtype(a.dtype, a.z, a.r, a.m, a.s, a.a, a.mr, a.sr, a.tgt)
    if a.n <= 0 or a.vc <= 0:
        return
    _stats_fwd_kernel[(a.n,)](
        a.z, a.ldz, a.r if mode == EXACT_KL else None, a.ldr, a.vc, a.v_offset, a.inv_temp,
        a.targets if mode == LOGPROB else None, a.m, a.s, a.a if mode != LOGPROB else None,
        a.mr if mode == EXACT_KL else None, a.sr if mode == EXACT_KL else None, a.tgt if mode == LOGPROB else None,
        MODE=mode, HAS_TARGETS=a.targets is not None and a.tgt is not None, BLOCK_V=block(a.vc, MAX_BLOCK_V[dt]),
        enable_fp_fusion=False)


def vocab_softmax_grad(a: VocabSoftmaxGradArgs) -> None:
    """Writes out [n, vc] (row stride ldo; may be z itself) = d(sum_i g[i] * value_i)/dz for the chunk.

    z, r, out and m, logs, q, g are float32 or float64 (the tag ``dtype``); value is the target's log-prob (mode 0;
    targets [n] int64, rows with targets < 0 must have g = 0), the entropy (1) or the KL (2), with m, logs [n] the
    forward's max and log-sum of x = z * inv_temp and q = a / s [n] (modes 1-2).
    """
    mode = a.mode
    check_mode(mode)
    dt = check_dtype(a.dtype, a.z, a.r, a.out, a.m, a.logs, a.q, a.g)
    if a.n <= 0 or a.vc <= 0:
        return
    _grad_kernel[(a.n,)](
        a.z, a.ldz, a.r if mode == EXACT_KL else None, a.ldr, a.out, a.ldo, a.vc, a.v_offset, a.inv_temp,
        a.targets if mode == LOGPROB else None, a.m, a.logs, a.q if mode != LOGPROB else None, a.g, MODE=mode,
        HAS_TARGETS=a.targets is not None, BLOCK_V=block(a.vc, MAX_BLOCK_V[dt]), enable_fp_fusion=False)

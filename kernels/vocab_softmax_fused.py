"""The fused-matmul design of the linear softmax-over-vocabulary ops (log-probs, entropy, exact KL): the GEMM
``hidden @ weight.T`` runs inside the kernel, tile by tile, so no logits tile ever reaches global memory
(Cut Cross-Entropy's approach). The chunked design (a torch GEMM per vocabulary chunk, then the tile kernels of
vocab_softmax.py, backend "triton") stays the default; backend "triton-fused" selects this one.

Forward (vocab_softmax_fused_fwd): the grid is (token tiles x vocabulary splits). A program walks its split in
tiles of BLOCK_V entries; per tile it forms the logits [BLOCK_N, BLOCK_V] in registers with tl.dot over the
hidden dimension (plus bias, times inv_temp) and folds them into a per-row online log-sum-exp, the same state
(m, s, a, mr, sr, tgt) as vocab_softmax.py. With several splits, each writes a partial state and a second
kernel merges them in split order. Exact KL forms the reference tile the same way in the same loop.

Backward (vocab_softmax_fused_grad): one program per (token tile, vocabulary tile) recomputes its logits tile, turns
it into d(value)/dlogits in registers (the formulas of vocab_softmax._grad_kernel) and adds d @ W[tile] into
grad_hidden and d^T @ hidden into grad_weight with atomic adds, BLOCK_H columns at a time. The order of those
adds varies on a GPU, so the last bits of the gradients may vary run to run (the chunked design is exact-order).

Operands: hidden/weight of any float dtype. Float32 compute upcasts in registers and runs IEEE float32 dots
(no TF32), except that bf16/fp16 hidden and weight of one dtype are dotted natively with float32 accumulation
(their products are exact in float32). Float64 compute runs float64 dots.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ra3.kernels._common import block, check_dtype, scalar_as
from ra3.kernels.vocab_softmax import check_mode
from ra3.ops.kernel_abi import ENTROPY, EXACT_KL, LOGPROB, VocabSoftmaxFusedFwdArgs, VocabSoftmaxFusedGradArgs

# Tile shapes; float64 tiles are smaller (twice the registers per element).
TILES = {torch.float32: dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32), torch.float64: dict(BLOCK_N=32, BLOCK_V=32,
                                                                                       BLOCK_H=16)}
# Programs to aim for when splitting the vocabulary (a few per SM of a large GPU).
TARGET_PROGRAMS = 264


@triton.jit
def _logits_tile(h_ptr, ldh, w_ptr, ldw, b_ptr, rows, row_ok, cols, col_ok, hdim, inv, DT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, NATIVE_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """(hidden[rows] @ weight[cols].T + bias[cols]) * inv as [BLOCK_N, BLOCK_V] in DT; -inf in columns past the
    tile's end, so they drop out of every max and sum."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], DT)
    for k0 in range(0, hdim, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < hdim
        h = tl.load(h_ptr + rows[:, None] * ldh + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * ldw + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if NATIVE_DOT:
            acc = tl.dot(h, w, acc)
        else:
            acc = tl.dot(h.to(DT), w.to(DT), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(DT)[None, :]
    return tl.where(col_ok[None, :], acc * inv, -float("inf"))


@triton.jit
def _fold_rows(m, s, a, x, term, WITH_A: tl.constexpr, RELATIVE: tl.constexpr):
    """Folds a tile x [BLOCK_N, BLOCK_V] (and, WITH_A, term summed into a) into the per-row state, as _fold_block
    does for one row in vocab_softmax.py (RELATIVE, entropy: a sums e * (x - m), shifted when the max moves)."""
    mn = tl.maximum(m, tl.max(x, 1))
    live = mn != -float("inf")
    base = tl.where(live, mn, 0.0)
    rescale = tl.exp(m - base)
    e = tl.exp(x - base[:, None])
    s_new = s * rescale + tl.sum(e, 1)
    if WITH_A:
        if RELATIVE:
            old = a + s * (tl.where(s > 0, m, base) - base)  # s = 0: m = -inf, nothing to shift (no 0 * -inf)
            a = tl.where(live, old * rescale + tl.sum(e * tl.where(e > 0, x - base[:, None], 0.0), 1), a)
        else:
            a = tl.where(live, a * rescale + tl.sum(e * tl.where(e > 0, term, 0.0), 1), a)
    return tl.where(live, mn, m), tl.where(live, s_new, s), a


@triton.jit
def _empty_state(BLOCK: tl.constexpr, dt: tl.constexpr):
    """(m, s, a, mr, sr, tgt) [BLOCK] of rows that have seen no logit yet."""
    return (tl.full([BLOCK], -float("inf"), dt), tl.zeros([BLOCK], dt), tl.zeros([BLOCK], dt),
            tl.full([BLOCK], -float("inf"), dt), tl.zeros([BLOCK], dt), tl.zeros([BLOCK], dt))


@triton.jit
def _store_state(off, ok, m, s, a, mr, sr, tgt, m_ptr, s_ptr, a_ptr, mr_ptr, sr_ptr, tgt_ptr, MODE: tl.constexpr):
    """Writes the per-row state a mode keeps: (m, s) always, then the target logit (log-probs) or the
    accumulator a (entropy, KL), and the reference's (mr, sr) for exact KL."""
    tl.store(m_ptr + off, m, mask=ok)
    tl.store(s_ptr + off, s, mask=ok)
    if MODE == 0:
        tl.store(tgt_ptr + off, tgt, mask=ok)
    else:
        tl.store(a_ptr + off, a, mask=ok)
    if MODE == 2:
        tl.store(mr_ptr + off, mr, mask=ok)
        tl.store(sr_ptr + off, sr, mask=ok)


@triton.jit
def _linear_stats_kernel(h_ptr, ldh, w_ptr, ldw, b_ptr, rh_ptr, ldrh, rw_ptr, ldrw, rb_ptr, targets_ptr, n, hdim,
                         rhdim, vocab, v_per_split, inv_temp: tl.float64, m_ptr, s_ptr, a_ptr, mr_ptr, sr_ptr,
                         tgt_ptr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
                         HAS_TARGETS: tl.constexpr, NATIVE_DOT: tl.constexpr, REF_NATIVE_DOT: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    split = tl.program_id(1).to(tl.int64)
    dt = m_ptr.dtype.element_ty
    inv = scalar_as(inv_temp, dt)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    v_begin = split * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, vocab)
    m, s, a, mr, sr, tgt = _empty_state(BLOCK_N, dt)
    t = tl.full([BLOCK_N], -1, tl.int64)
    if HAS_TARGETS:
        t = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        x = _logits_tile(h_ptr, ldh, w_ptr, ldw, b_ptr, rows, row_ok, cols, col_ok, hdim, inv, dt, HAS_BIAS,
                         NATIVE_DOT, BLOCK_N, BLOCK_V, BLOCK_H)
        if MODE == 0:
            m, s, a = _fold_rows(m, s, a, x, x, False, False)
            tgt += tl.sum(tl.where(cols[None, :] == t[:, None], x, 0.0), 1)  # each target lies in one tile
        elif MODE == 1:
            m, s, a = _fold_rows(m, s, a, x, x, True, True)
        else:
            y = _logits_tile(rh_ptr, ldrh, rw_ptr, ldrw, rb_ptr, rows, row_ok, cols, col_ok, rhdim, inv, dt,
                             HAS_REF_BIAS, REF_NATIVE_DOT, BLOCK_N, BLOCK_V, BLOCK_H)
            m, s, a = _fold_rows(m, s, a, x, x - tl.where(x == -float("inf"), 0.0, y), True, False)
            mr, sr, _unused = _fold_rows(mr, sr, a, y, y, False, False)
    _store_state(split * n + rows, row_ok, m, s, a, mr, sr, tgt, m_ptr, s_ptr, a_ptr, mr_ptr, sr_ptr, tgt_ptr, MODE)


@triton.jit
def _merge(m, s, a, mk, sk, ak, RELATIVE: tl.constexpr):
    """Merges the partial state (mk, sk, ak) of one vocabulary split into (m, s, a) (RELATIVE: a is relative to
    its max, as in _fold_rows)."""
    mn = tl.maximum(m, mk)
    live = mn != -float("inf")
    base = tl.where(live, mn, 0.0)
    f = tl.exp(m - base)
    fk = tl.exp(mk - base)
    if RELATIVE:
        a = a + s * (tl.where(s > 0, m, base) - base)  # s = 0: m = -inf, nothing to shift (no 0 * -inf)
        ak = ak + sk * (tl.where(sk > 0, mk, base) - base)
    return tl.where(live, mn, m), tl.where(live, s * f + sk * fk, s), tl.where(live, a * f + ak * fk, a)


@triton.jit
def _merge_splits_kernel(pm_ptr, ps_ptr, pa_ptr, pmr_ptr, psr_ptr, ptgt_ptr, n, splits, m_ptr, s_ptr, a_ptr,
                         mr_ptr, sr_ptr, tgt_ptr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n
    dt = m_ptr.dtype.element_ty
    m, s, a, mr, sr, tgt = _empty_state(BLOCK, dt)
    for k in range(0, splits):
        off = k * n + rows
        mk = tl.load(pm_ptr + off, mask=ok, other=-float("inf"))
        sk = tl.load(ps_ptr + off, mask=ok, other=0.0)
        if MODE == 0:
            m, s, a = _merge(m, s, a, mk, sk, tl.zeros_like(sk), False)
            tgt += tl.load(ptgt_ptr + off, mask=ok, other=0.0)  # zero in every split but the target's
        else:
            m, s, a = _merge(m, s, a, mk, sk, tl.load(pa_ptr + off, mask=ok, other=0.0), MODE == 1)
        if MODE == 2:
            mrk = tl.load(pmr_ptr + off, mask=ok, other=-float("inf"))
            mr, sr, _unused = _merge(mr, sr, tl.zeros_like(sr), mrk, tl.load(psr_ptr + off, mask=ok, other=0.0),
                                     tl.zeros_like(sr), False)
    _store_state(rows, ok, m, s, a, mr, sr, tgt, m_ptr, s_ptr, a_ptr, mr_ptr, sr_ptr, tgt_ptr, MODE)


@triton.jit
def _linear_grad_kernel(h_ptr, ldh, w_ptr, ldw, b_ptr, rh_ptr, ldrh, rw_ptr, ldrw, rb_ptr, targets_ptr, m_ptr,
                        logs_ptr, q_ptr, g_ptr, n, hdim, rhdim, vocab, inv_temp: tl.float64, gh_ptr, gw_ptr,
                        gb_ptr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
                        HAS_TARGETS: tl.constexpr, NEED_WEIGHT_GRAD: tl.constexpr, NATIVE_DOT: tl.constexpr,
                        REF_NATIVE_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    dt = gh_ptr.dtype.element_ty
    inv = scalar_as(inv_temp, dt)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n
    col_ok = cols < vocab
    x = _logits_tile(h_ptr, ldh, w_ptr, ldw, b_ptr, rows, row_ok, cols, col_ok, hdim, inv, dt, HAS_BIAS,
                     NATIVE_DOT, BLOCK_N, BLOCK_V, BLOCK_H)
    c = tl.load(g_ptr + rows, mask=row_ok, other=0.0) * inv  # 0 on rows past the end: their d is 0
    dx = x - tl.load(m_ptr + rows, mask=row_ok, other=0.0)[:, None]  # x - m: exact near the max
    p = tl.exp(dx - tl.load(logs_ptr + rows, mask=row_ok, other=0.0)[:, None])  # 0 past the end (x = -inf)
    live = p > 0
    if MODE == 0:
        d = -c[:, None] * p
        if HAS_TARGETS:
            t = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
            d = tl.where(cols[None, :] == t[:, None], d + c[:, None], d)
    elif MODE == 1:
        q = tl.load(q_ptr + rows, mask=row_ok, other=0.0)
        d = tl.where(live, -c[:, None] * p * (tl.where(live, dx, 0.0) - q[:, None]), 0.0)
    else:
        y = _logits_tile(rh_ptr, ldrh, rw_ptr, ldrw, rb_ptr, rows, row_ok, cols, col_ok, rhdim, inv, dt,
                         HAS_REF_BIAS, REF_NATIVE_DOT, BLOCK_N, BLOCK_V, BLOCK_H)
        q = tl.load(q_ptr + rows, mask=row_ok, other=0.0)
        diff = tl.where(live, x, 0.0) - tl.where(live, y, 0.0)  # no -inf - -inf past the end
        d = tl.where(live, c[:, None] * p * (diff - q[:, None]), 0.0)
    d = tl.where(row_ok[:, None] & col_ok[None, :], d, 0.0)
    # The tile's share of grad_hidden = d @ W and grad_weight = d^T @ hidden, BLOCK_H columns at a time.
    for k0 in range(0, hdim, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < hdim
        w = tl.load(w_ptr + cols[:, None] * ldw + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        tl.atomic_add(gh_ptr + rows[:, None] * hdim + ks[None, :], tl.dot(d, w.to(dt), input_precision="ieee"),
                      mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
        if NEED_WEIGHT_GRAD:
            h = tl.load(h_ptr + rows[:, None] * ldh + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            tl.atomic_add(gw_ptr + cols[:, None] * hdim + ks[None, :],
                          tl.dot(tl.trans(d), h.to(dt), input_precision="ieee"),
                          mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")
    if NEED_WEIGHT_GRAD and HAS_BIAS:
        tl.atomic_add(gb_ptr + cols, tl.sum(d, 0), mask=col_ok, sem="relaxed")


def _native_dot(a: torch.Tensor, b: torch.Tensor, dt: torch.dtype) -> bool:
    """Whether a and b go into tl.dot as they are (16-bit, float32 accumulation) rather than upcast to dt."""
    if dt != torch.float32 or a.dtype != b.dtype:
        return False
    if a.dtype == torch.float16:
        return True
    # Triton's interpreter (3.9) multiplies bf16 operands as their raw bit patterns, so there they are upcast.
    return a.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") != "1"


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels need unit stride along the hidden dimension; rows may be strided."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _ld(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


def _splits(n_tiles: int, vocab_tiles: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return max(1, min(vocab_tiles, triton.cdiv(TARGET_PROGRAMS, n_tiles)))


def vocab_softmax_fused_fwd(a: VocabSoftmaxFusedFwdArgs, *, splits: int | None = None) -> None:
    """The softmax state of logits = hidden @ weight.T (+ bias) over the whole vocabulary, written to [n] tensors.

    hidden [n, H], weight [V, H], bias [V] | None: any float dtype; ref_* likewise (mode 2, H_ref may differ);
    targets [n] int64 (-1: ignored; mode 0). Writes m, s and (mode 0) tgt, (modes 1-2) a, (mode 2) mr, sr: the
    state vocab_softmax_fwd leaves after walking every chunk from an empty state (tgt = 0 for ignored rows).
    The state tensors have the compute dtype (tag ``dtype``). ``splits``: vocabulary splits (default: enough
    programs for the GPU; 1 off it).
    """
    check_mode(a.mode)
    kl, lp = a.mode == EXACT_KL, a.mode == LOGPROB
    # the state this mode writes, in the kernels' order (m, s, a, mr, sr, tgt); None where the mode has none
    state = (a.m, a.s, None if lp else a.a, a.mr if kl else None, a.sr if kl else None, a.tgt if lp else None)
    dt = check_dtype(a.dtype, *state)
    needed = {LOGPROB: (a.tgt,), ENTROPY: (a.a,), EXACT_KL: (a.a, a.mr, a.sr, a.ref_hidden, a.ref_weight)}[a.mode]
    if any(t is None for t in needed):
        raise ValueError(f"mode {a.mode} needs tgt (0), a (1-2), and mr, sr, ref_hidden, ref_weight (2)")
    n, hdim = a.hidden.shape
    vocab = a.weight.shape[0]
    if n == 0:
        return
    hidden, weight = _rows(a.hidden), _rows(a.weight)
    ref_hidden, ref_weight = (_rows(a.ref_hidden), _rows(a.ref_weight)) if kl else (None, None)
    tiles = TILES[dt]
    bn, bv = tiles["BLOCK_N"], tiles["BLOCK_V"]
    n_tiles, vocab_tiles = triton.cdiv(n, bn), triton.cdiv(vocab, bv)
    splits = _splits(n_tiles, vocab_tiles, hidden.device) if splits is None else max(1, min(splits, vocab_tiles))
    v_per_split = triton.cdiv(vocab_tiles, splits) * bv
    splits = triton.cdiv(vocab, v_per_split)
    # with vocabulary splits, each split writes its own partial state, merged after
    parts = state if splits == 1 else tuple(
        None if t is None else torch.empty(splits, n, dtype=dt, device=a.m.device) for t in state)
    has_targets = lp and a.targets is not None
    _linear_stats_kernel[(n_tiles, splits)](
        hidden, _ld(hidden), weight, _ld(weight), a.bias, ref_hidden, _ld(ref_hidden), ref_weight, _ld(ref_weight),
        a.ref_bias if kl else None, a.targets if has_targets else None, n, hdim, ref_hidden.shape[1] if kl else 0,
        vocab, v_per_split, a.inv_temp, *parts, MODE=a.mode, HAS_BIAS=a.bias is not None,
        HAS_REF_BIAS=kl and a.ref_bias is not None, HAS_TARGETS=has_targets,
        NATIVE_DOT=_native_dot(hidden, weight, dt), REF_NATIVE_DOT=kl and _native_dot(ref_hidden, ref_weight, dt),
        **tiles)
    if splits > 1:
        rows = block(n, 256)
        _merge_splits_kernel[(triton.cdiv(n, rows),)](*parts, n, splits, *state, MODE=a.mode, BLOCK=rows)


def vocab_softmax_fused_grad(a: VocabSoftmaxFusedGradArgs) -> None:
    """Gradients of sum_i g[i] * value_i (log-prob of the target, entropy or KL) w.r.t. hidden, weight and bias.

    Inputs as vocab_softmax_fused_fwd; m, logs [n] the forward's max and log-sum, q = a / s [n] (modes 1-2),
    g [n] the upstream gradient (0 on ignored rows in mode 0). Writes grad_hidden [n, H] and, when given,
    grad_weight [V, H] and grad_bias [V], contiguous in the compute dtype.
    """
    check_mode(a.mode)
    dt = check_dtype(a.dtype, a.m, a.logs, a.q, a.g, a.grad_hidden, a.grad_weight, a.grad_bias)
    n, hdim = a.hidden.shape
    vocab = a.weight.shape[0]
    a.grad_hidden.zero_()  # the kernel accumulates with atomic adds
    for t in (a.grad_weight, a.grad_bias):
        if t is not None:
            t.zero_()
    if n == 0:
        return
    kl = a.mode == EXACT_KL
    hidden, weight = _rows(a.hidden), _rows(a.weight)
    ref_hidden, ref_weight = (_rows(a.ref_hidden), _rows(a.ref_weight)) if kl else (None, None)
    tiles = TILES[dt]
    need_w = a.grad_weight is not None
    has_targets = a.mode == LOGPROB and a.targets is not None
    _linear_grad_kernel[(triton.cdiv(n, tiles["BLOCK_N"]), triton.cdiv(vocab, tiles["BLOCK_V"]))](
        hidden, _ld(hidden), weight, _ld(weight), a.bias, ref_hidden, _ld(ref_hidden), ref_weight, _ld(ref_weight),
        a.ref_bias if kl else None, a.targets if has_targets else None, a.m, a.logs,
        a.q if a.mode != LOGPROB else None, a.g, n, hdim, ref_hidden.shape[1] if kl else 0, vocab, a.inv_temp,
        a.grad_hidden, a.grad_weight, a.grad_bias if need_w else None, MODE=a.mode, HAS_BIAS=a.bias is not None,
        HAS_REF_BIAS=kl and a.ref_bias is not None, HAS_TARGETS=has_targets, NEED_WEIGHT_GRAD=need_w,
        NATIVE_DOT=_native_dot(hidden, weight, dt), REF_NATIVE_DOT=kl and _native_dot(ref_hidden, ref_weight, dt),
        **tiles)


__all__ = ["vocab_softmax_fused_fwd", "vocab_softmax_fused_grad"]

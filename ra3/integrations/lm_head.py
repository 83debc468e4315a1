"""Per-token log-probs and entropy of an LM head's output, with no [N, V] logits in memory.

The head's logits are ``f = softcap(scale * (hidden @ weight.T + bias)) / temperature`` where
``softcap(x) = cap * tanh(x / cap)`` (Gemma 2/3's final-logit soft-capping; identity when ``cap`` is None).
Without a cap, ``f`` is linear in ``hidden``, so ``ra3.ops.linear_logprobs`` / ``linear_entropy`` compute it
with ``temperature / scale`` as their temperature. The tanh is not linear, so with a cap the vocabulary is
walked in chunks here: each chunk's logits tile is computed, capped, folded into an online log-sum-exp, and
recomputed in the backward pass (peak extra memory: one [N, chunk] tile, as in ``ra3.ops``).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

# Elements of one capped logits tile (16 MiB in float32), the same budget as ra3.ops' vocabulary chunks.
_TILE_ELEMENTS = 1 << 22
_MIN_CHUNK = 256


class HeadLogProbs(NamedTuple):
    logprobs: Tensor  # [N] float32 (float64 for float64 input): log p(targets[i])
    entropy: Optional[Tensor]  # [N] same dtype, or None when not asked for


def head_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                  scale: float = 1.0, softcap: Optional[float] = None, temperature: float = 1.0,
                  with_entropy: bool = False, backend: str = "auto") -> HeadLogProbs:
    """Log-probs of ``targets`` (and the entropy) under ``softcap(scale * (hidden @ weight.T + bias)) / T``.

    hidden: [N, H] fp32|bf16|fp16|fp64; weight: [V, H]; bias: [V] | None; targets: [N] int64, all valid
    (drop ignored positions before the call). scale > 0, softcap > 0 or None, temperature > 0.
    Gradients flow to hidden, weight and bias.
    """
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    # The head is computed in float32 (float64 for float64 input) whatever autocast says: under an enclosing
    # autocast (TRL and accelerate enable bf16 autocast, on CPU too) the tile GEMMs would otherwise run in
    # bfloat16 and lose the precision the fused path exists to keep.
    with torch.autocast(hidden.device.type, enabled=False):
        return _head_logprobs(hidden, weight, targets, bias, float(scale), softcap, float(temperature),
                              bool(with_entropy), backend)


def _head_logprobs(hidden, weight, targets, bias, scale, softcap, temperature, with_entropy, backend):
    if softcap is None:
        from ra3 import ops

        # scale * z / T == z / (T / scale): logit scaling is a temperature.
        t = temperature / scale
        lp = ops.linear_logprobs(hidden, weight, targets, bias=bias, temperature=t, backend=backend)
        ent = ops.linear_entropy(hidden, weight, bias=bias, temperature=t, backend=backend) if with_entropy else None
        return HeadLogProbs(lp, ent)
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    lp, ent = _SoftcappedHead.apply(hidden, weight, bias, targets.long(), scale, float(softcap), temperature,
                                    with_entropy)
    return HeadLogProbs(lp, ent if with_entropy else None)


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _chunk(n: int, vocab: int) -> int:
    return min(vocab, max(_MIN_CHUNK, _TILE_ELEMENTS // max(n, 1)))


class _SoftcappedHead(torch.autograd.Function):
    """(logprobs[N], entropy[N]) of the soft-capped head, walking the vocabulary in chunks both ways."""

    @staticmethod
    def _tile(h, weight, bias, v0, v1, scale, cap, inv_t, dt):
        """(f, d f / d z) for vocabulary rows [v0, v1): the final logits and their derivative w.r.t. h @ W.T."""
        z = h @ weight[v0:v1].to(dt).T
        if bias is not None:
            z = z + bias[v0:v1].to(dt)
        th = torch.tanh(z * (scale / cap))
        return th * (cap * inv_t), (1.0 - th * th) * (scale * inv_t)

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, cap, temperature, with_entropy):
        dt = _compute_dtype(hidden, weight, bias)
        h = hidden.to(dt)
        n, vocab = h.shape[0], weight.shape[0]
        inv_t = 1.0 / temperature
        m = torch.full((n,), -math.inf, dtype=dt, device=h.device)
        s = torch.zeros(n, dtype=dt, device=h.device)  # sum exp(f - m)
        a = torch.zeros(n, dtype=dt, device=h.device)  # sum exp(f - m) * f
        tgt = torch.zeros(n, dtype=dt, device=h.device)
        rows = torch.arange(n, device=h.device)
        step = _chunk(n, vocab)
        for v0 in range(0, vocab, step):
            v1 = min(vocab, v0 + step)
            f, _ = _SoftcappedHead._tile(h, weight, bias, v0, v1, scale, cap, inv_t, dt)
            m_new = torch.maximum(m, f.max(dim=1).values)
            rescale = torch.exp(m - m_new)
            e = torch.exp(f - m_new[:, None])
            s = s * rescale + e.sum(1)
            a = a * rescale + (e * f).sum(1)
            m = m_new
            inside = (targets >= v0) & (targets < v1)
            local = (targets - v0).clamp(0, v1 - v0 - 1)
            tgt = torch.where(inside, f[rows, local], tgt)
        lse = m + torch.log(s)
        mean_f = a / s  # E_p[f]
        logprobs = tgt - lse
        entropy = lse - mean_f
        ctx.save_for_backward(hidden, weight, bias, targets, lse, mean_f)
        ctx.params = (scale, cap, inv_t, dt)
        ctx.mark_non_differentiable(targets)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, bias, targets, lse, mean_f = ctx.saved_tensors
        scale, cap, inv_t, dt = ctx.params
        h = hidden.to(dt)
        n, vocab = h.shape[0], weight.shape[0]
        g_lp = torch.zeros(n, dtype=dt, device=h.device) if grad_lp is None else grad_lp.to(dt)
        g_ent = None if grad_ent is None else grad_ent.to(dt)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dt, device=h.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=dt, device=h.device) if need_b else None
        rows = torch.arange(n, device=h.device)
        step = _chunk(n, vocab)
        for v0 in range(0, vocab, step):
            v1 = min(vocab, v0 + step)
            f, df_dz = _SoftcappedHead._tile(h, weight, bias, v0, v1, scale, cap, inv_t, dt)
            p = torch.exp(f - lse[:, None])
            # d logp / d f_j = [j == target] - p_j;  d H / d f_j = p_j (E_p[f] - f_j)
            g_f = p * (-g_lp[:, None])
            inside = (targets >= v0) & (targets < v1)
            local = (targets - v0).clamp(0, v1 - v0 - 1)
            g_f[rows[inside], local[inside]] += g_lp[inside]
            if g_ent is not None:
                g_f += p * (mean_f[:, None] - f) * g_ent[:, None]
            g_z = g_f * df_dz
            if need_h:
                grad_h.addmm_(g_z, weight[v0:v1].to(dt))
            if need_w:
                grad_w[v0:v1] = g_z.T @ h
            if need_b:
                grad_b[v0:v1] = g_z.sum(0)
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype),
                None, None, None, None, None)

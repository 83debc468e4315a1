"""Next-token cross-entropy fused with the lm_head GEMM, gradients computed during the forward pass.

When the loss is a plain sum or mean of token log-probs (NTP, SFT, the RA3 M-step), the upstream gradient of
every token is the same scalar, so the gradient can be formed while each logits tile is still in memory:
3 GEMMs in all (logits, grad_hidden, grad_weight) instead of the 4 of ``linear_logprobs`` (which must recompute
the tiles in its backward pass because its per-token upstream gradient is only known then). Tokens are walked
in chunks of whole vocabulary rows, so each tile's log-sum-exp is final at once. On the cuda backend the token
loop and its cuBLAS GEMMs run inside the extension (csrc/cuda/linear_softmax.cpp), as for the vocabulary ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ra3.ops import _kernels, _vocab_chunks, registry, reference
from ra3.ops import _validate as check
from ra3.ops._vocab_chunks import LOGPROB
from ra3.ops._vocab_inputs import linear_inputs, targets_input

REDUCTIONS = ("mean", "sum")


# Elements of one [rows, V] tile here: 4x the vocabulary walk's, and never fewer than MIN_ROWS rows. Each token
# chunk reads and rewrites the whole [V, H] grad_weight (addmm_), so thin chunks make this op memory-bound:
# at N=2048, H=512, V=32000 on 2 CPU cores, 131-row chunks ran 1.9x slower than 524-row ones (2026-12-01).
TILE_ELEMENTS = 1 << 24
MIN_ROWS = 256


def _token_chunk(vocab: int) -> int:
    return max(MIN_ROWS, TILE_ELEMENTS // vocab)


def _extension_forward(hidden, weight, bias, targets, inv_temp: float, scale: float, need_grad: bool, dt):
    """The cuda backend's token loop in the extension; same results as _forward's Python loop."""
    n, vocab, dev = hidden.shape[0], weight.shape[0], hidden.device
    rows = min(n, _token_chunk(vocab))
    h, w, code = _vocab_chunks._gemm_operands(hidden, weight, dt)
    b = None if bias is None else bias.to(dt).contiguous()
    empty = _vocab_chunks._empty
    m = torch.full((n,), -float("inf"), dtype=dt, device=dev)
    s, tgt, lse = (torch.zeros(n, dtype=dt, device=dev) for _ in range(3))
    g = torch.where(targets >= 0, torch.full_like(lse, -scale), torch.zeros_like(lse))
    terms = _vocab_chunks.BF16_GRAD_TERMS
    tile16 = _vocab_chunks.bf16_scratch(terms, rows * vocab, dev) if (need_grad and code == 2) else None
    grad_hidden = torch.empty(n, hidden.shape[1], dtype=dt, device=dev) if need_grad else empty(dt, dev)
    grad_weight = torch.empty(weight.shape, dtype=dt, device=dev) if need_grad else empty(dt, dev)
    grad_bias = torch.empty(vocab, dtype=dt, device=dev) if (need_grad and bias is not None) else empty(dt, dev)
    _kernels.call("cuda", "linear_cross_entropy", dev, _kernels.dtype_code(dt), n, vocab, rows, code, h, w, b,
                  h.shape[1], inv_temp, targets, g if need_grad else None,
                  torch.ones(rows, dtype=dt, device=dev) if bias is not None else None,
                  torch.empty(rows * vocab, dtype=dt, device=dev), tile16, terms, m, s, tgt, lse,
                  grad_hidden if need_grad else None, grad_weight if need_grad else None,
                  grad_bias if (need_grad and bias is not None) else None)
    loss = -torch.where(targets >= 0, tgt - lse, torch.zeros_like(lse)).sum()
    return loss * scale, grad_hidden, grad_weight, grad_bias


def _forward(backend: str, hidden, weight, bias, targets, inv_temp: float, mean: bool, need_grad: bool):
    """Returns (loss, grad_hidden, grad_weight, grad_bias) of the summed or mean NLL; grads empty if not needed."""
    dt = check.compute_dtype(hidden, weight, bias)
    n, vocab, dev = hidden.shape[0], weight.shape[0], hidden.device
    count = int((targets >= 0).sum())
    scale = 1.0 / max(count, 1) if mean else 1.0
    if n and _vocab_chunks._extension_loop(backend, hidden, weight, backward=need_grad):
        return _extension_forward(hidden, weight, bias, targets, inv_temp, scale, need_grad, dt)
    code = _kernels.dtype_code(dt)
    w = weight.to(dt)
    b = None if bias is None else bias.to(dt)
    loss = torch.zeros((), dtype=dt, device=dev)
    empty = _vocab_chunks._empty  # a fresh one per absent output: custom-op outputs must not alias
    grad_hidden = torch.empty(n, hidden.shape[1], dtype=dt, device=dev) if need_grad else empty(dt, dev)
    grad_weight = torch.zeros(weight.shape, dtype=dt, device=dev) if need_grad else empty(dt, dev)
    grad_bias = torch.zeros(vocab, dtype=dt, device=dev) if (need_grad and bias is not None) else empty(dt, dev)
    step = _token_chunk(vocab)
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        rows = i1 - i0
        h = hidden[i0:i1].to(dt)
        t = targets[i0:i1]
        z = h @ w.T
        if b is not None:
            z += b
        m = torch.full((rows,), -float("inf"), dtype=dt, device=dev)
        s = torch.zeros(rows, dtype=dt, device=dev)
        tgt = torch.zeros(rows, dtype=dt, device=dev)
        _kernels.call(backend, "softmax_stats_fwd", dev, LOGPROB, code, z, vocab, None, 0, rows, vocab, 0, inv_temp,
                      t, m, s, None, None, None, tgt)
        lse = m + torch.log(s)
        loss -= torch.where(t >= 0, tgt - lse, torch.zeros_like(lse)).sum()
        if need_grad:
            # d(-scale * logp)/dz: the log-prob gradient with upstream -scale, written over the tile in place.
            g = torch.where(t >= 0, torch.full_like(lse, -scale), torch.zeros_like(lse))
            _kernels.call(backend, "softmax_grad", dev, LOGPROB, code, z, vocab, None, 0, z, vocab, rows, vocab, 0,
                          inv_temp, t, lse, None, None, g)
            torch.mm(z, w, out=grad_hidden[i0:i1])
            grad_weight.addmm_(z.T, h)
            if bias is not None:
                grad_bias += z.sum(0)
    return loss * scale, grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("ra3::linear_cross_entropy", mutates_args=())
def _ce_op(backend: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, inv_temp: float,
           mean: bool, need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward(backend, hidden, weight, bias, targets, inv_temp, mean, need_grad)


@_ce_op.register_fake
def _(backend, hidden, weight, bias, targets, inv_temp, mean, need_grad):
    dt = check.compute_dtype(hidden, weight, bias)
    if not need_grad:
        return (hidden.new_empty((), dtype=dt), hidden.new_empty(0, dtype=dt), hidden.new_empty(0, dtype=dt),
                hidden.new_empty(0, dtype=dt))
    gb = bias.new_empty(bias.shape, dtype=dt) if bias is not None else hidden.new_empty(0, dtype=dt)
    return (hidden.new_empty((), dtype=dt), hidden.new_empty(hidden.shape, dtype=dt),
            weight.new_empty(weight.shape, dtype=dt), gb)


def _setup(ctx, inputs, output):
    hidden, weight, bias = inputs[1:4]
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.need_grad = inputs[7]  # not read off the saved sizes: with H = 0 real gradients are empty too
    ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, *_unused):
    gh, gw, gb = ctx.saved_tensors
    if not ctx.need_grad:
        raise RuntimeError("linear_cross_entropy was run without gradients (need_grad=False) but is being "
                           "differentiated; call it with inputs that require grad")
    h_dt, w_dt, b_dt = ctx.dtypes
    return (None, (grad_loss * gh).to(h_dt), (grad_loss * gw).to(w_dt),
            None if b_dt is None else (grad_loss * gb).to(b_dt), None, None, None, None)


_ce_op.register_autograd(_backward, setup_context=_setup)


def linear_cross_entropy(hidden, weight, targets, *, bias=None, temperature: float = 1.0, ignore_index: int = -100,
                         reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """-sum or -mean over non-ignored tokens of log softmax((hidden @ weight.T + bias) / T)[i, targets[i]].

    hidden: [N, H] fp32|bf16|fp16; weight: [V, H]; bias: [V] | None; targets: [N] int (ignore_index skipped).
    reduction: 'mean' (over non-ignored tokens; 0 if there are none) or 'sum'. Returns a float32 scalar
    (float64 for float64 input). The gradients are formed in the forward pass while each tile is in memory.
    Edges: inputs are not scanned for NaN: NaN or inf reaching a non-ignored row gives a NaN (or inf) loss without
    an error; ignored rows never reach the loss; with no non-ignored token (N = 0 included) the loss is 0.
    """
    n, vocab = linear_inputs("", hidden, weight, bias)
    temperature = check.temperature(temperature, check.compute_dtype(hidden, weight, bias))
    ignore_index = check.integer("ignore_index", ignore_index)
    reduction = check.choice("reduction", reduction, REDUCTIONS)
    tgt = targets_input(targets, n, vocab, ignore_index, hidden.device)
    name = registry.resolve("logprobs", backend, hidden.device)
    if name == "torch":
        lp = reference.linear_logprobs(hidden, weight, tgt, bias=bias, temperature=temperature, ignore_index=-1)
        total = -lp.sum()
        return total / max(int((tgt >= 0).sum()), 1) if reduction == "mean" else total
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, *_ = _ce_op(name, hidden, weight, bias, tgt, 1.0 / temperature, reduction == "mean", need_grad)
    return loss

"""Native forward and backward of the softmax-over-vocabulary ops (log-probs, entropy, exact KL).

The vocabulary is walked in chunks. Per chunk, the logits tile [N, vc] comes either from the given logits (a
strided view, no copy for float32/float64 input) or from one GEMM ``hidden @ weight[chunk].T`` on torch's
BLAS/cuBLAS; the ``ra3._C`` kernels then fold it into an online log-sum-exp (forward) or turn it in place into
the gradient w.r.t. the logits (backward), which two more GEMMs carry to hidden and weight. The backward
recomputes each tile instead of storing [N, V]: peak extra memory is one tile, O(N * vc).

Both passes are ``torch.library`` custom ops, so ``torch.compile`` sees them as opaque nodes. Their first
argument is the resolved backend ('cpu', 'cuda' or 'triton') whose tile kernels ``_kernels.call`` runs.

The cuda backend runs the same loop for the linear ops inside the extension (csrc/cuda/linear_softmax.cpp): its
GEMMs call cuBLAS directly, 16-bit operands on tensor cores with float32 accumulation, and a step costs one Python
call instead of several launches per chunk. ``CUDA_EXTENSION_LOOP`` (RA3_CUDA_TORCH_GEMM=1 turns it off) keeps the
Python loop with torch's GEMMs instead, for comparison.

The triton backend has a second design for the linear ops, behind ``TRITON_FUSED_LINEAR``: Triton kernels that
do the GEMM themselves over (token tile x vocabulary tile) and keep an online log-sum-exp in registers, so no
logits tile reaches global memory (ra3/kernels/fused_linear.py; benchmarks/NOTES.md compares the two).
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from ra3 import _native
from ra3.ops import _kernels
from ra3.ops._validate import compute_dtype

LOGPROB, ENTROPY, EXACT_KL = 0, 1, 2

# Elements of one logits tile; 4M float32 = 16 MiB keeps the tile in the last-level cache's neighbourhood
# while leaving the GEMMs large enough to run at full rate.
TILE_ELEMENTS = 1 << 22
MIN_CHUNK = 256

# Triton backend only: the fused-matmul design for the linear ops instead of torch GEMM tiles. Off by default
# until GPU measurements say it wins (none recorded yet); RA3_TRITON_FUSED_LINEAR=1 turns it on.
TRITON_FUSED_LINEAR = os.environ.get("RA3_TRITON_FUSED_LINEAR", "0") == "1"

# CUDA backend only: the linear ops' vocabulary loop and its cuBLAS GEMMs in the extension (see the docstring).
CUDA_EXTENSION_LOOP = os.environ.get("RA3_CUDA_TORCH_GEMM", "0") != "1"

# bf16 backward passes of the extension loop: the float32 gradient tile enters the two GEMMs as hi + lo bf16 terms
# (2: float32-class gradients, twice those GEMMs' work) or rounded once (1: the precision of Liger-Kernel and Cut
# Cross-Entropy, which on small vocabularies misses the 1e-2 bf16 tolerance against float64 by up to 2x).
# RA3_BF16_GRAD=round picks 1.
BF16_GRAD_TERMS = 1 if os.environ.get("RA3_BF16_GRAD", "split") == "round" else 2

# GEMM operand dtypes of the extension loop (csrc/ra3_native.h, in_dtype).
_IN_DTYPE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def chunk_size(n: int, vocab: int) -> int:
    vc = max(MIN_CHUNK, TILE_ELEMENTS // max(n, 1))
    return min(vocab, vc)


class _Source:
    """Produces logits tiles [N, vc] in the compute dtype, from logits or from hidden @ weight.T (+ bias)."""

    def __init__(self, hidden: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], dtype: torch.dtype):
        self.linear = weight is not None
        self.dtype = dtype
        if self.linear:
            self.hidden = hidden.to(dtype).contiguous()
            self.weight, self.bias = weight, bias
            self.vocab = weight.shape[0]
        else:
            self.logits = hidden
            self.vocab = hidden.shape[1]
            # A float tile of the right dtype can be read in place through its row stride.
            self.in_place = hidden.dtype == dtype and hidden.stride(1) == 1
        self.n = hidden.shape[0]
        self._buffer: Optional[Tensor] = None

    def tile(self, v0: int, v1: int) -> Tensor:
        """The tile [N, v1 - v0]. For the linear source it is written into one buffer reused by every call:
        a fresh GEMM output per chunk would keep two tiles alive (the new one is allocated before the old one
        is dropped) and fragment the CPU heap, which showed as ~4 extra tiles of peak resident memory."""
        if self.linear:
            width = v1 - v0
            if self._buffer is None:
                self._buffer = torch.empty(self.n * width, dtype=self.dtype, device=self.hidden.device)
            z = self._buffer[:self.n * width].view(self.n, width)
            w = self.weight[v0:v1]
            torch.mm(self.hidden, (w if w.dtype == self.dtype else w.to(self.dtype)).T, out=z)
            if self.bias is not None:
                z += self.bias[v0:v1].to(self.dtype)
            return z
        z = self.logits[:, v0:v1]
        return z if self.in_place else z.to(self.dtype).contiguous()


def _tiles(src: _Source, ref: Optional[_Source], n: int, vocab: int):
    """The Python loop's chunks: (v0, v1, tile, reference tile or None), each tile valid until the next step."""
    step = chunk_size(n, vocab)
    for v0 in range(0, vocab, step):
        v1 = min(vocab, v0 + step)
        yield v0, v1, src.tile(v0, v1), ref.tile(v0, v1) if ref else None


def _empty(dtype: torch.dtype, device: torch.device) -> Tensor:
    # A fresh tensor per absent output: custom ops may not return one tensor twice (outputs must not alias).
    return torch.empty(0, dtype=dtype, device=device)


def _ld(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.stride(0)


def _fused(backend: str, weight) -> bool:
    return backend == "triton" and weight is not None and TRITON_FUSED_LINEAR


@functools.lru_cache(maxsize=None)
def _cublas_loads() -> bool:
    """Whether the extension can load cuBLAS; warns once (with the reason) when it cannot."""
    try:
        _native.load().cublas_info()
    except (AttributeError, RuntimeError) as exc:
        warnings.warn(f"ra3: the cuda backend's linear ops fall back to torch's GEMMs: {exc}", RuntimeWarning,
                      stacklevel=4)
        return False
    return True


def _extension_loop(backend: str, hidden: Tensor, weight: Optional[Tensor], backward: bool = False) -> bool:
    """The cuda backend's linear ops run the extension's loop. Not for float16 backward passes: a float16
    gradient tile would underflow, so those keep torch's GEMMs on float32 operands."""
    if backend != "cuda" or weight is None or not CUDA_EXTENSION_LOOP:
        return False
    if backward and hidden.dtype == weight.dtype == torch.float16:
        return False
    return _cublas_loads()


def _gemm_operands(hidden: Tensor, weight: Tensor, dt: torch.dtype):
    """(hidden, weight, in_dtype) as cuBLAS takes them: contiguous and of one dtype; a float64 computation, or
    two different dtypes, promote both to the compute dtype."""
    kind = hidden.dtype if hidden.dtype == weight.dtype and dt != torch.float64 else dt
    return hidden.to(kind).contiguous(), weight.to(kind).contiguous(), _IN_DTYPE[kind]


def bf16_scratch(terms: int, elements: int, device: torch.device) -> Tensor:
    """The extension loop's bfloat16 gradient terms: ``terms`` tiles of ``elements``, each on a 16-byte boundary."""
    return torch.empty(terms * (-(-elements // 8) * 8), dtype=torch.bfloat16, device=device)


def _extension_sources(dt, n, step, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl: bool):
    """The sources' arguments of linear_softmax_fwd / _grad, plus (ones, tile, ref_tile) scratch."""
    h, w, code = _gemm_operands(hidden, weight, dt)
    args = [code, h, w, None if bias is None else bias.to(dt).contiguous(), h.shape[1]]
    if kl:
        rh, rw, rcode = _gemm_operands(ref_hidden, ref_weight, dt)
        args += [rcode, rh, rw, None if ref_bias is None else ref_bias.to(dt).contiguous(), rh.shape[1]]
    else:
        args += [0, None, None, None, 0]
    dev = hidden.device
    ones = torch.ones(n, dtype=dt, device=dev) if (bias is not None or (kl and ref_bias is not None)) else None
    tile = torch.empty(n * step, dtype=dt, device=dev)
    ref_tile = torch.empty(n * step, dtype=dt, device=dev) if kl else None
    return args, (ones, tile, ref_tile)


def forward(backend: str, mode: int, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets,
            inv_temp: float):
    """Returns (out[N], lse[N], lse_ref[N]) in the compute dtype; out is the log-prob, entropy or KL."""
    dt = compute_dtype(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    n, dev = hidden.shape[0], hidden.device
    vocab = hidden.shape[1] if weight is None else weight.shape[0]
    if n == 0:
        return tuple(torch.zeros(0, dtype=dt, device=dev) for _ in range(3))
    m = torch.full((n,), -math.inf, dtype=dt, device=dev)
    s = torch.zeros(n, dtype=dt, device=dev)
    a = torch.zeros(n, dtype=dt, device=dev)
    tgt = torch.zeros(n, dtype=dt, device=dev)
    kl = mode == EXACT_KL
    mr = torch.full((n,), -math.inf, dtype=dt, device=dev) if kl else None
    sr = torch.zeros(n, dtype=dt, device=dev) if kl else None
    code = _kernels.dtype_code(dt)
    if _extension_loop(backend, hidden, weight):  # the vocabulary loop and its cuBLAS GEMMs inside the extension
        step = chunk_size(n, vocab)
        sources, (ones, tile, ref_tile) = _extension_sources(dt, n, step, hidden, weight, bias, ref_hidden,
                                                             ref_weight, ref_bias, kl)
        _kernels.call(backend, "linear_softmax_fwd", dev, mode, code, n, vocab, step, *sources, inv_temp, targets,
                      ones, tile, ref_tile, m, s, a, mr, sr, tgt)
    elif _fused(backend, weight):  # the whole vocabulary in one pass, GEMMs inside the kernel
        _kernels.call(backend, "linear_softmax_stats_fwd", dev, mode, code, hidden.contiguous(), weight.contiguous(),
                      bias, ref_hidden.contiguous() if kl else None, ref_weight.contiguous() if kl else None,
                      ref_bias if kl else None, targets, inv_temp, m, s, a, mr, sr, tgt)
    else:
        src = _Source(hidden, weight, bias, dt)
        for v0, v1, z, r in _tiles(src, _Source(ref_hidden, ref_weight, ref_bias, dt) if kl else None, n, vocab):
            _kernels.call(backend, "softmax_stats_fwd", dev, mode, code, z, _ld(z), r, _ld(r), n, v1 - v0, v0,
                          inv_temp, targets, m, s, a, mr, sr, tgt)
    lse = m + torch.log(s)
    if mode == LOGPROB:
        out = torch.where(targets >= 0, tgt - lse, torch.zeros_like(lse))
    elif mode == ENTROPY:
        out = lse - a / s
    else:
        lse_r = mr + torch.log(sr)
        return a / s - lse + lse_r, lse, lse_r
    return out, lse, torch.empty(0, dtype=dt, device=dev)


def backward(backend: str, mode: int, grad_out, out, lse, lse_r, hidden, weight, bias, ref_hidden, ref_weight,
             ref_bias, targets, inv_temp: float, need_weight_grad: bool):
    """Gradients (w.r.t. hidden or logits, weight, bias) of sum(grad_out * out); absent ones are empty tensors."""
    dt = lse.dtype
    linear = weight is not None
    n, dev = hidden.shape[0], hidden.device
    vocab = weight.shape[0] if linear else hidden.shape[1]
    if n == 0:
        gw = torch.zeros(weight.shape, dtype=dt, device=dev) if (linear and need_weight_grad) else None
        gb = torch.zeros(bias.shape, dtype=dt, device=dev) if (gw is not None and bias is not None) else None
        return torch.zeros(hidden.shape, dtype=dt, device=dev), gw if gw is not None else _empty(dt, dev), \
            gb if gb is not None else _empty(dt, dev)
    g = grad_out.to(dt).contiguous()
    if mode == LOGPROB:
        g = torch.where(targets >= 0, g, torch.zeros_like(g))
    code = _kernels.dtype_code(dt)
    aux = out.contiguous() if mode != LOGPROB else None
    lse_r_arg = lse_r if mode == EXACT_KL else None
    kl = mode == EXACT_KL
    extension = _extension_loop(backend, hidden, weight, backward=True)
    if linear:  # the extension loop overwrites grad_hidden; the others accumulate into it
        grad_hidden = (torch.empty if extension else torch.zeros)(n, hidden.shape[1], dtype=dt, device=dev)
        grad_weight = torch.empty(weight.shape, dtype=dt, device=dev) if need_weight_grad else _empty(dt, dev)
        grad_bias = torch.empty(vocab, dtype=dt, device=dev) if (bias is not None and need_weight_grad) \
            else _empty(dt, dev)
    else:
        grad_logits = torch.empty(n, vocab, dtype=dt, device=dev)
    if extension:
        step = chunk_size(n, vocab)
        sources, (ones, tile, ref_tile) = _extension_sources(dt, n, step, hidden, weight, bias, ref_hidden,
                                                             ref_weight, ref_bias, kl)
        terms = BF16_GRAD_TERMS
        tile16 = bf16_scratch(terms, n * step, dev) if sources[0] == 2 else None
        _kernels.call(backend, "linear_softmax_grad", dev, mode, code, n, vocab, step, *sources, inv_temp, targets,
                      lse, lse_r_arg, aux, g, ones, tile, ref_tile, tile16, terms, grad_hidden,
                      grad_weight if need_weight_grad else None,
                      grad_bias if (bias is not None and need_weight_grad) else None)
        return grad_hidden, grad_weight, grad_bias
    if _fused(backend, weight):  # tiles recomputed in registers, GEMMs inside the kernel
        _kernels.call(backend, "linear_softmax_grad", dev, mode, code, hidden.contiguous(), weight.contiguous(),
                      bias, ref_hidden.contiguous() if kl else None, ref_weight.contiguous() if kl else None,
                      ref_bias if kl else None, targets, inv_temp, lse, lse_r_arg, aux, g, grad_hidden,
                      grad_weight if need_weight_grad else None,
                      grad_bias if (bias is not None and need_weight_grad) else None)
        return grad_hidden, grad_weight, grad_bias
    src = _Source(hidden, weight, bias, dt)
    for v0, v1, z, r in _tiles(src, _Source(ref_hidden, ref_weight, ref_bias, dt) if kl else None, n, vocab):
        dst = z if linear else grad_logits[:, v0:v1]
        _kernels.call(backend, "softmax_grad", dev, mode, code, z, _ld(z), r, _ld(r), dst, _ld(dst), n, v1 - v0,
                      v0, inv_temp, targets, lse, lse_r_arg, aux, g)
        if linear:
            grad_hidden.addmm_(dst, weight[v0:v1].to(dt))
            if need_weight_grad:
                torch.mm(dst.T, src.hidden, out=grad_weight[v0:v1])
                if bias is not None:
                    torch.sum(dst, 0, out=grad_bias[v0:v1])
    if linear:
        return grad_hidden, grad_weight, grad_bias
    return grad_logits, _empty(dt, dev), _empty(dt, dev)


# --- torch.library registration -------------------------------------------------------------------------------

@torch.library.custom_op("ra3::vocab_softmax", mutates_args=())
def vocab_softmax_op(backend: str, mode: int, hidden: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
                     targets: Optional[Tensor], inv_temp: float) -> tuple[Tensor, Tensor, Tensor]:
    return forward(backend, mode, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, inv_temp)


@vocab_softmax_op.register_fake
def _(backend, mode, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, inv_temp):
    dt = compute_dtype(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=dt),
            hidden.new_empty(n if mode == EXACT_KL else 0, dtype=dt))


@torch.library.custom_op("ra3::vocab_softmax_backward", mutates_args=())
def vocab_softmax_backward_op(backend: str, mode: int, grad_out: Tensor, out: Tensor, lse: Tensor, lse_r: Tensor,
                              hidden: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                              ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
                              targets: Optional[Tensor], inv_temp: float,
                              need_weight_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    return backward(backend, mode, grad_out, out, lse, lse_r, hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                    targets, inv_temp, need_weight_grad)


@vocab_softmax_backward_op.register_fake
def _(backend, mode, grad_out, out, lse, lse_r, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets,
      inv_temp, need_weight_grad):
    dt = lse.dtype
    if weight is None:
        return hidden.new_empty(hidden.shape, dtype=dt), lse.new_empty(0), lse.new_empty(0)
    gw = weight.new_empty(weight.shape, dtype=dt) if need_weight_grad else lse.new_empty(0)
    gb = bias.new_empty(bias.shape, dtype=dt) if (bias is not None and need_weight_grad) else lse.new_empty(0)
    return hidden.new_empty(hidden.shape, dtype=dt), gw, gb


def _setup_context(ctx, inputs, output):
    backend, mode, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, inv_temp = inputs
    out, lse, lse_r = output
    ctx.backend, ctx.mode, ctx.inv_temp = backend, mode, inv_temp
    ctx.need_weight_grad = weight is not None and (weight.requires_grad or (bias is not None and bias.requires_grad))
    ctx.save_for_backward(out, lse, lse_r, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets)


def _backward(ctx, grad_out, _grad_lse, _grad_lse_r):
    out, lse, lse_r, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets = ctx.saved_tensors
    gh, gw, gb = vocab_softmax_backward_op(ctx.backend, ctx.mode, grad_out, out, lse, lse_r, hidden, weight, bias,
                                           ref_hidden, ref_weight, ref_bias, targets, ctx.inv_temp,
                                           ctx.need_weight_grad)
    gh = gh.to(hidden.dtype)
    gw = gw.to(weight.dtype) if weight is not None and gw.numel() else None
    gb = gb.to(bias.dtype) if bias is not None and gb.numel() else None
    return None, None, gh, gw, gb, None, None, None, None, None


vocab_softmax_op.register_autograd(_backward, setup_context=_setup_context)

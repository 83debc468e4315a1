"""How the vocabulary-softmax ops walk the vocabulary: one design per backend name, one signature for all.

A design turns (mode, policy head, reference head, targets, logit transform) into the forward value out [N] with
the softmax state the backward needs, (m, logs, q) [N] (csrc/ra3_native.h: the max of the logits, log of the sum
of exp(x - m), and q = a / s for entropy and KL, kept apart so large logits lose nothing to a rounded log-sum-exp),
and the gradients of sum(grad_out * out); and computes next-token cross-entropy and the policy loss
(``linear_policy_loss``) with their gradients formed in the forward pass. ``DESIGNS`` maps each native backend name
the registry resolves to one:

  cpu           ``ChunkedWalk('cpu')``: the vocabulary in chunks walked here in Python; each logits tile is the
                given logits (a strided view) or one GEMM on torch's BLAS; the C++ tile kernels fold it into an
                online log-sum-exp (forward) or turn it in place into the gradient w.r.t. the logits (backward), which
                two more GEMMs carry to hidden and weight. The backward recomputes each tile instead of storing [N, V]:
                peak extra memory is one tile, O(N * chunk).
  cuda          ``ExtensionLoop``: the same walk inside the extension (csrc/cuda/vocab_softmax_loop.cpp), calling cuBLAS
                itself (16-bit operands on tensor cores, float32 accumulation), one Python call per op. Logits-given
                inputs, float16 backward passes (a float16 gradient tile underflows) and a cuBLAS that does not load
                (one warning) take ``ChunkedWalk('cuda')``.
  cuda-torch    ``ChunkedWalk('cuda')``: the Python walk over torch's cuBLAS GEMMs and the CUDA tile kernels.
  triton        ``ChunkedWalk('triton')``: the Python walk with the Triton tile kernels.
  triton-fused  ``TritonFused``: Triton kernels that do the GEMM themselves over (token tile x vocabulary tile) and
                keep the log-sum-exp in registers, so no logits tile reaches global memory (kernels/vocab_softmax_fused.py).
                Logits-given inputs and cross-entropy take ``ChunkedWalk('triton')``.

The policy loss (``policy_loss``, 3 GEMMs per step, 4 with sequence-level ratios) is ``ChunkedWalk``'s on every design:
``cuda`` runs ``ChunkedWalk('cuda')``, the Python walk over torch's cuBLAS GEMMs and the CUDA tile kernels (the
extension has no loop for this op yet), ``triton-fused`` runs ``ChunkedWalk('triton')``.

The logit transform ``Logits(inv_temp, scale, softcap)``: the softmax is over ``f = softcap(scale * z) * inv_temp``
with ``softcap(x) = cap * tanh(x / cap)`` (Gemma's final-logit soft-capping); without a cap the kernels fold
``scale`` into ``inv_temp``. Only ``ChunkedWalk`` applies a cap (to each tile, and its derivative to each gradient
tile); the registry never sends one to the other designs.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ra3 import _native
from ra3.ops import kernel_abi as abi
from ra3.ops._validate import compute_dtype
from ra3.ops.kernel_abi import BFLOAT16, ENTROPY, EXACT_KL, LOGPROB, dtype_code

# Elements of one logits tile per device type. CPU: 4M float32 = 16 MiB keeps the tile near the last-level cache
# while the GEMMs stay large enough to run at full rate. GPU: 64M (256 MiB float32) so a step is tens of chunks,
# not hundreds each paying Python and launch overhead, and each GEMM fills the device.
TILE_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
MIN_CHUNK = 256

# Cross-entropy walks chunks of whole vocabulary rows; each token chunk reads and rewrites the whole [V, H]
# grad_weight, so chunks keep at least CE_MIN_ROWS rows (at N=2048, H=512, V=32000 on 2 CPU cores, 131-row chunks
# ran 1.9x slower than 524-row ones). Past that, smaller tiles stay in cache: on the M-step's shape (N=4096, H=160,
# V=2048, one thread) 1M-element tiles ran 55 ms a step against 62 ms (4M) and 79 ms (16M) (2026-12-01).
CE_TILE_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 27}
CE_MIN_ROWS = 256

# The policy loss walks row chunks as cross-entropy does, but on CPU in tiles of about 20 MiB (163 rows at V=32000):
# at N=2048, H=512, V=32000 on 2 cores, 160-row chunks ran as fast as 256-row ones (772 vs 777 ms a GRPO step, 128
# rows 817 ms; interleaved, quiet machine, 2026-12-01), and MKL's sgemm allocates a ~20 MiB workspace, kept for the
# process, once a GEMM has 192 rows or more. Other devices take ``ce_rows``.
POLICY_TILE_ELEMENTS = {"cpu": 5 << 20}
POLICY_MIN_ROWS = 128


class Head(NamedTuple):
    """One model's logits: hidden [N, H] with weight [V, H] and bias [V] | None, or logits [N, V] (weight None)."""
    hidden: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]

    @property
    def vocab(self) -> int:
        return self.hidden.shape[1] if self.weight is None else self.weight.shape[0]


class Logits(NamedTuple):
    """The transform from z = hidden @ weight.T + bias (or the given logits) to the softmax's input."""
    inv_temp: float  # 1 / temperature
    scale: float = 1.0
    softcap: float = 0.0  # 0: none
    high_precision: bool = False  # bf16 gradient tiles as hi + lo terms (the cuda extension loop)

    @property
    def kernel_inv_temp(self) -> float:
        """The multiplier the tile kernels apply: the scale folds into it unless a cap comes in between."""
        return self.inv_temp if self.softcap else self.inv_temp * self.scale


def chunk_size(n: int, vocab: int, device: torch.device) -> int:
    """Vocabulary columns per tile for ``n`` rows on ``device``."""
    budget = TILE_ELEMENTS.get(device.type, TILE_ELEMENTS["cuda"])
    return min(vocab, max(MIN_CHUNK, budget // max(n, 1)))


def ce_rows(vocab: int, device: torch.device) -> int:
    """Token rows per cross-entropy chunk on ``device``."""
    return max(CE_MIN_ROWS, CE_TILE_ELEMENTS.get(device.type, CE_TILE_ELEMENTS["cuda"]) // vocab)


def policy_rows(vocab: int, device: torch.device) -> int:
    """Token rows per policy-loss chunk on ``device``."""
    budget = POLICY_TILE_ELEMENTS.get(device.type)
    return ce_rows(vocab, device) if budget is None else max(POLICY_MIN_ROWS, budget // vocab)


def _empty(dtype: torch.dtype, device: torch.device) -> Tensor:
    # A fresh tensor per absent output: custom ops may not return one tensor twice (outputs must not alias).
    return torch.empty(0, dtype=dtype, device=device)


def _ld(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.stride(0)


def _zeros_state(n: int, dt: torch.dtype, dev: torch.device, kl: bool):
    """(m, s, a, mr, sr, tgt): the online log-sum-exp state the kernels fold tiles into."""
    m = torch.full((n,), -math.inf, dtype=dt, device=dev)
    mr = torch.full((n,), -math.inf, dtype=dt, device=dev) if kl else None
    sr = torch.zeros(n, dtype=dt, device=dev) if kl else None
    return m, torch.zeros(n, dtype=dt, device=dev), torch.zeros(n, dtype=dt, device=dev), mr, sr, \
        torch.zeros(n, dtype=dt, device=dev)


def _forward_state(mode: int, head: Head, ref: Optional[Head]):
    """(compute dtype, zeroed state (m, s, a, mr, sr, tgt)) of a forward pass; with N = 0, _finish of it is [0]."""
    dt = compute_dtype(*head, *(ref or ()))
    return dt, _zeros_state(head.hidden.shape[0], dt, head.hidden.device, mode == EXACT_KL)


def _finish(mode: int, targets, m, s, a, mr, sr, tgt):
    """(out, m, logs, q) from the folded state: log p = (x - m) - logs; the entropy's a is relative to m, so
    entropy = logs - a / s; KL = a / s - (m - mr) - (logs - log sr)."""
    logs = torch.log(s)
    if mode == LOGPROB:
        out = torch.where(targets >= 0, (tgt - m) - logs, torch.zeros_like(logs))
        return out, m, logs, _empty(logs.dtype, logs.device)
    q = a / s
    if mode == ENTROPY:
        return logs - q, m, logs, q
    return q - (m - mr) - (logs - torch.log(sr)), m, logs, q


def _upstream(mode: int, grad_out: Tensor, targets, dt: torch.dtype) -> Tensor:
    g = grad_out.to(dt).contiguous()
    return torch.where(targets >= 0, g, torch.zeros_like(g)) if mode == LOGPROB else g


class _Tiles:
    """Logits tiles [N, vc] of one head in the compute dtype, with the logit transform's cap applied.

    A linear head's tile is written into one buffer reused by every call: a fresh GEMM output per chunk would keep
    two tiles alive (the new one is allocated before the old one is dropped) and fragment the CPU heap, which
    showed as ~4 extra tiles of peak resident memory."""

    def __init__(self, head: Head, dtype: torch.dtype, logits: Logits):
        self.head, self.dtype, self.logits = head, dtype, logits
        self.linear = head.weight is not None
        self.hidden = head.hidden.to(dtype).contiguous() if self.linear else head.hidden
        # A float tile of the right dtype can be read in place through its row stride (never when capping it).
        self.in_place = (not self.linear and head.hidden.dtype == dtype and head.hidden.stride(1) == 1
                         and not logits.softcap)
        self._buffer: Optional[Tensor] = None
        self._slope: Optional[Tensor] = None

    def _scratch(self, name: str, rows: int, width: int) -> Tensor:
        buf = getattr(self, name)
        if buf is None:
            buf = torch.empty(rows * width, dtype=self.dtype, device=self.hidden.device)
            setattr(self, name, buf)
        return buf[:rows * width].view(rows, width)

    def tile(self, v0: int, v1: int, r0: int = 0, r1: Optional[int] = None) -> Tensor:
        """Rows [r0, r1) x vocabulary columns [v0, v1) of the transformed logits (before 1 / T)."""
        r1 = self.hidden.shape[0] if r1 is None else r1
        if self.linear:
            z = self._scratch("_buffer", r1 - r0, v1 - v0)
            w = self.head.weight[v0:v1]
            torch.mm(self.hidden[r0:r1], (w if w.dtype == self.dtype else w.to(self.dtype)).T, out=z)
            if self.head.bias is not None:
                z += self.head.bias[v0:v1].to(self.dtype)
        else:
            z = self.head.hidden[r0:r1, v0:v1]
            if self.in_place:
                return z
            z = z.to(self.dtype, memory_format=torch.contiguous_format, copy=True)  # never the caller's memory
        cap = self.logits.softcap
        if cap:
            z.mul_(self.logits.scale / cap).tanh_()
            # d f / d z = scale * (1 - tanh^2), kept for the backward before the kernel overwrites the tile
            self._last_slope = torch.mul(z, z, out=self._scratch("_slope", r1 - r0, v1 - v0)).neg_().add_(1) \
                .mul_(self.logits.scale)
            z.mul_(cap)
        return z

    def chain(self, grad_tile: Tensor) -> Tensor:
        """d/dz of the loss from d/df of the last tile: multiplies by the cap's slope (identity without one; the
        scale without a cap is inside the kernels' 1 / T)."""
        return grad_tile.mul_(self._last_slope) if self.logits.softcap else grad_tile


class ChunkedWalk:
    """The vocabulary walked in Python, each tile folded by the tile kernels of ``kernels`` ('cpu' | 'cuda' |
    'triton')."""

    def __init__(self, kernels: str):
        self.kernels = kernels

    def _fold(self, mode: int, z: Tensor, *, state, targets, inv_temp: float, r: Optional[Tensor] = None,
              v_offset: int = 0) -> None:
        """Folds the tile z [rows, vc] (row-strided; r the reference's, EXACT_KL) into ``state`` (m, s, a, mr, sr,
        tgt; None where unused)."""
        m, s, a, mr, sr, tgt = state
        abi.call(self.kernels, z.device, abi.VocabSoftmaxFwdArgs(
            mode=mode, dtype=dtype_code(z.dtype), z=z, ldz=_ld(z), r=r, ldr=_ld(r), n=z.shape[0], vc=z.shape[1],
            v_offset=v_offset, inv_temp=inv_temp, targets=targets, m=m, s=s, a=a, mr=mr, sr=sr, tgt=tgt))

    def _grad(self, mode: int, z: Tensor, *, out: Tensor, targets, inv_temp: float, m: Tensor, logs: Tensor,
              q: Optional[Tensor], g: Tensor, r: Optional[Tensor] = None, v_offset: int = 0) -> None:
        """Writes g * d(value)/dz of the tile z [rows, vc] into out (may be z)."""
        abi.call(self.kernels, z.device, abi.VocabSoftmaxGradArgs(
            mode=mode, dtype=dtype_code(z.dtype), z=z, ldz=_ld(z), r=r, ldr=_ld(r), out=out, ldo=_ld(out),
            n=z.shape[0], vc=z.shape[1], v_offset=v_offset, inv_temp=inv_temp, targets=targets, m=m, logs=logs, q=q,
            g=g))

    def forward(self, mode: int, head: Head, ref: Optional[Head], targets, logits: Logits):
        dt, state = _forward_state(mode, head, ref)
        n, dev, vocab = head.hidden.shape[0], head.hidden.device, head.vocab
        kl = mode == EXACT_KL
        src, ref_src = _Tiles(head, dt, logits), _Tiles(ref, dt, logits) if kl else None
        step = chunk_size(n, vocab, dev)
        for v0 in range(0, vocab if n else 0, step):
            v1 = min(vocab, v0 + step)
            z, r = src.tile(v0, v1), ref_src.tile(v0, v1) if kl else None
            self._fold(mode, z, r=r, v_offset=v0, state=state, targets=targets, inv_temp=logits.kernel_inv_temp)
        return _finish(mode, targets, *state)

    def backward(self, mode: int, grad_out, m, logs, q, head: Head, ref: Optional[Head], targets,
                 logits: Logits, need_weight_grad: bool):
        dt, dev = logs.dtype, head.hidden.device
        n, vocab, linear = head.hidden.shape[0], head.vocab, head.weight is not None
        # grad_hidden accumulates over chunks; every other buffer is written chunk by chunk
        grads = _zero_grads(head, dt, need_weight_grad, overwrite=n > 0)
        if n == 0:
            return grads
        if linear:
            grads[0].zero_()
        g = _upstream(mode, grad_out, targets, dt)
        q = q if mode != LOGPROB else None
        kl = mode == EXACT_KL
        src, ref_src = _Tiles(head, dt, logits), _Tiles(ref, dt, logits) if kl else None
        grad_hidden, grad_weight, grad_bias = grads
        step = chunk_size(n, vocab, dev)
        for v0 in range(0, vocab, step):
            v1 = min(vocab, v0 + step)
            z, r = src.tile(v0, v1), ref_src.tile(v0, v1) if kl else None
            dst = z if linear else grad_hidden[:, v0:v1]
            self._grad(mode, z, r=r, v_offset=v0, out=dst, targets=targets, inv_temp=logits.kernel_inv_temp, m=m,
                       logs=logs, q=q, g=g)
            src.chain(dst)
            if linear:
                grad_hidden.addmm_(dst, head.weight[v0:v1].to(dt))
                if need_weight_grad:
                    torch.mm(dst.T, src.hidden, out=grad_weight[v0:v1])
                    if head.bias is not None:
                        torch.sum(dst, 0, out=grad_bias[v0:v1])
        return grads

    def cross_entropy(self, head: Head, targets, logits: Logits, scale: float, need_grad: bool):
        """(sum over kept rows of -log p) * scale, and its gradients (empty when not ``need_grad``)."""
        dt = compute_dtype(*head)
        n, vocab, dev = head.hidden.shape[0], head.vocab, head.hidden.device
        inv = logits.kernel_inv_temp
        src = _Tiles(head, dt, logits)
        w = head.weight.to(dt)
        loss = torch.zeros((), dtype=dt, device=dev)
        grad_hidden, grad_weight, grad_bias = _zero_grads(head, dt, need_grad, overwrite=False) if need_grad \
            else (_empty(dt, dev), _empty(dt, dev), _empty(dt, dev))
        step = ce_rows(vocab, dev)
        for i0 in range(0, n, step):
            i1 = min(n, i0 + step)
            rows, t = i1 - i0, targets[i0:i1]
            z = src.tile(0, vocab, i0, i1)
            m, s, _a, _mr, _sr, tgt = _zeros_state(rows, dt, dev, kl=False)
            self._fold(LOGPROB, z, state=(m, s, None, None, None, tgt), targets=t, inv_temp=inv)
            logs = torch.log(s)
            loss -= torch.where(t >= 0, (tgt - m) - logs, torch.zeros_like(logs)).sum()
            if need_grad:
                # d(-scale * logp)/dz: the log-prob gradient with upstream -scale, written over the tile in place.
                g = torch.where(t >= 0, torch.full_like(logs, -scale), torch.zeros_like(logs))
                self._grad(LOGPROB, z, out=z, targets=t, inv_temp=inv, m=m, logs=logs, q=None, g=g)
                src.chain(z)
                torch.mm(z, w, out=grad_hidden[i0:i1])
                grad_weight.addmm_(z.T, src.hidden[i0:i1])
                if head.bias is not None:
                    grad_bias += z.sum(0)
        return loss * scale, grad_hidden, grad_weight, grad_bias


    def policy_loss(self, head: Head, targets, logits: Logits, terms, need_grad: bool, need_weight_grad: bool = True):
        """A scalar loss L(log p of the targets, entropy) over the rows, its gradients formed in the forward pass.

        Walks chunks of whole vocabulary rows (as ``cross_entropy``; ``policy_rows`` of them). Per chunk: one GEMM for
        the logits tile; the ENTROPY-mode forward kernel gives each row's log-sum-exp and entropy, the target's logit is
        gathered from the tile; ``terms.coefficients(i0, i1, logprobs, entropy)`` gives (weight [rows], d_lp [rows],
        d_ent: a number) with dL/dlogp = weight * d_lp (taken as 0 at ignored targets) and dL/dentropy = weight * d_ent;
        one gradient kernel writes dL/dlogits over the tile in place (the LOGPROB mode, or the ENTROPY mode carrying
        both terms when d_ent != 0), and two GEMMs carry it to grad_hidden and grad_weight: 3 GEMMs. When
        ``terms.two_pass`` (sequence-level ratios: every coefficient needs its sequence's whole log-ratio), the
        log-probs come first from ``forward`` (LOGPROB mode over vocabulary chunks of all rows: its GEMMs are taller
        than a row chunk's) and go to ``terms.prepare``: 4 GEMMs. Without ``need_grad``: the forward pass only, 1 GEMM;
        without ``need_weight_grad`` (a frozen head) no grad_weight GEMM. Returns (logprobs [N], entropy [N],
        grad_hidden, grad_weight, grad_bias) in the compute dtype, the gradients empty when not ``need_grad``.
        """
        dt = compute_dtype(*head)
        n, vocab, dev = head.hidden.shape[0], head.vocab, head.hidden.device
        inv = logits.kernel_inv_temp
        if head.weight.dtype != dt:  # once, not per tile (``_Tiles`` converts each tile's rows otherwise)
            head = Head(head.hidden, head.weight.to(dt), head.bias)
        src = _Tiles(head, dt, logits)
        # per row: log p of the target, entropy, and the state the gradient kernel takes (m, log s, q = a / s)
        lp, ent, mx, logs, q = (torch.zeros(n, dtype=dt, device=dev) for _ in range(5))
        grad_hidden, grad_weight, grad_bias = _zero_grads(head, dt, need_weight_grad, overwrite=False) if need_grad \
            else (_empty(dt, dev), _empty(dt, dev), _empty(dt, dev))
        step = policy_rows(vocab, dev)
        chunks = [(i0, min(n, i0 + step)) for i0 in range(0, n, step)]

        def statistics(i0: int, i1: int) -> Tensor:
            rows, t = i1 - i0, targets[i0:i1]
            z = src.tile(0, vocab, i0, i1)
            m, s, a, _mr, _sr, _tgt = _zeros_state(rows, dt, dev, kl=False)
            self._fold(ENTROPY, z, state=(m, s, a, None, None, None), targets=t, inv_temp=inv)
            mx[i0:i1] = m
            torch.log(s, out=logs[i0:i1])
            torch.div(a, s, out=q[i0:i1])  # the ENTROPY mode's a is relative to the max
            torch.sub(logs[i0:i1], q[i0:i1], out=ent[i0:i1])
            x = z.gather(1, t.clamp_min(0)[:, None])[:, 0] * inv  # the target's logit, as the LOGPROB mode reads it
            lp[i0:i1] = torch.where(t >= 0, (x - m) - logs[i0:i1], torch.zeros_like(x))
            return z

        if not need_grad:
            for i0, i1 in chunks:
                statistics(i0, i1)
            terms.prepare(lp)
            return lp, ent, grad_hidden, grad_weight, grad_bias
        if terms.two_pass:  # every coefficient needs its sequence's whole log-ratio: the log-probs first
            terms.prepare(self.forward(LOGPROB, head, None, targets, logits)[0])
        for i0, i1 in chunks:
            rows, t = i1 - i0, targets[i0:i1]
            z = statistics(i0, i1)
            weight, d_lp, d_ent = terms.coefficients(i0, i1, lp[i0:i1], ent[i0:i1])
            # an ignored target's log-prob is the constant 0 (the kernel's -c p part would reach its row otherwise)
            d_lp = torch.where(t >= 0, d_lp.to(dt), torch.zeros((), dtype=dt, device=dev))
            if not d_ent:
                self._grad(LOGPROB, z, out=z, targets=t, inv_temp=inv, m=mx[i0:i1], logs=logs[i0:i1], q=None,
                           g=(weight.to(dt) * d_lp).contiguous())
            else:
                # Both terms in one pass over the tile: the entropy mode writes -c p ((x - m) - q) = -c p (log p + H)
                # for q = a / s, so upstream c = weight * d_ent with q - d_lp / d_ent adds the log-prob's
                # -weight * d_lp * p; its +weight * d_lp at the target is added after. The rounding of that q costs
                # the log-prob part about one ulp of itself, whatever d_ent is.
                self._grad(ENTROPY, z, out=z, targets=t, inv_temp=inv, m=mx[i0:i1], logs=logs[i0:i1],
                           q=(q[i0:i1] - d_lp / d_ent).contiguous(), g=(weight.to(dt) * d_ent).contiguous())
                at = torch.arange(rows, device=dev) * vocab + t.clamp_min(0)
                z.view(-1).index_add_(0, at, weight.to(dt) * d_lp * inv)
            src.chain(z)
            torch.mm(z, head.weight, out=grad_hidden[i0:i1])
            if need_weight_grad:
                grad_weight.addmm_(z.T, src.hidden[i0:i1])
                if head.bias is not None:
                    grad_bias += z.sum(0)
        return lp, ent, grad_hidden, grad_weight, grad_bias

def _zero_grads(head: Head, dt, need_weight_grad: bool, overwrite: bool):
    """(grad_hidden or grad_logits, grad_weight, grad_bias) buffers; absent ones empty. ``overwrite``: the caller
    writes every element (uninitialised memory), else they start at zero."""
    dev, linear = head.hidden.device, head.weight is not None
    alloc = torch.empty if overwrite else torch.zeros
    if not linear:
        return alloc(head.hidden.shape, dtype=dt, device=dev), _empty(dt, dev), _empty(dt, dev)
    gh = alloc(head.hidden.shape, dtype=dt, device=dev)
    gw = alloc(head.weight.shape, dtype=dt, device=dev) if need_weight_grad else _empty(dt, dev)
    gb = alloc(head.weight.shape[0], dtype=dt, device=dev) if (need_weight_grad and head.bias is not None) \
        else _empty(dt, dev)
    return gh, gw, gb


@functools.lru_cache(maxsize=None)
def _cublas_loads() -> bool:
    """Whether the extension can load cuBLAS; warns once (with the reason) when it cannot."""
    try:
        _native.load().cublas_info()
    except (AttributeError, RuntimeError) as exc:
        warnings.warn(f"ra3: the cuda backend's linear ops fall back to torch's GEMMs (backend 'cuda-torch'): {exc}",
                      RuntimeWarning, stacklevel=4)
        return False
    return True


def bf16_scratch(terms: int, elements: int, device: torch.device) -> Tensor:
    """The extension loop's bfloat16 gradient terms: ``terms`` tiles of ``elements``, each on a 16-byte boundary."""
    return torch.empty(terms * (-(-elements // 8) * 8), dtype=torch.bfloat16, device=device)


def gemm_source(head: Head, dt: torch.dtype) -> abi.LinearSourceArgs:
    """A linear head as the extension loop's cuBLAS GEMMs take it: hidden and weight contiguous and of one dtype
    (a float64 computation, or two different dtypes, promote both to the compute dtype ``dt``), the bias in ``dt``."""
    kind = head.hidden.dtype if head.hidden.dtype == head.weight.dtype and dt != torch.float64 else dt
    hidden = head.hidden.to(kind).contiguous()
    return abi.LinearSourceArgs(in_dtype=dtype_code(kind), hidden=hidden, weight=head.weight.to(kind).contiguous(),
                                bias=None if head.bias is None else head.bias.to(dt).contiguous(), h=hidden.shape[1])


class ExtensionLoop:
    """The cuda backend: the vocabulary (or token) loop and its cuBLAS GEMMs inside the extension."""

    fallback = ChunkedWalk("cuda")

    @staticmethod
    def _runs(head: Head, backward: bool) -> bool:
        if head.weight is None:
            return False
        if backward and head.hidden.dtype == head.weight.dtype == torch.float16:
            return False  # a float16 gradient tile would underflow: torch's GEMMs on float32 operands instead
        return _cublas_loads()

    @staticmethod
    def _loop_fields(dt, n, step, head: Head, ref: Optional[Head]) -> dict:
        """The fields vocab_softmax_loop_fwd and _grad share: sizes, sources and the scratch (ones, tile,
        ref_tile)."""
        source = gemm_source(head, dt)
        ref_source = gemm_source(ref, dt) if ref is not None else abi.NO_SOURCE
        dev = head.hidden.device
        with_bias = source.bias is not None or ref_source.bias is not None
        return dict(dtype=dtype_code(dt), n=n, vocab=head.vocab, chunk=step, source=source, ref_source=ref_source,
                    ones=torch.ones(n, dtype=dt, device=dev) if with_bias else None,
                    tile=torch.empty(n * step, dtype=dt, device=dev),
                    ref_tile=torch.empty(n * step, dtype=dt, device=dev) if ref is not None else None)

    @staticmethod
    def _terms(logits: Logits) -> int:
        return 2 if logits.high_precision else 1

    def forward(self, mode, head: Head, ref: Optional[Head], targets, logits: Logits):
        if not self._runs(head, backward=False):
            return self.fallback.forward(mode, head, ref, targets, logits)
        assert not logits.softcap, "the registry never sends a softcap to the extension loop"
        dt, state = _forward_state(mode, head, ref)
        n, dev, vocab = head.hidden.shape[0], head.hidden.device, head.vocab
        if n == 0:
            return _finish(mode, targets, *state)
        kl = mode == EXACT_KL
        step = chunk_size(n, vocab, dev)
        m, s, a, mr, sr, tgt = state
        abi.call("cuda", dev, abi.VocabSoftmaxLoopFwdArgs(
            mode=mode, **self._loop_fields(dt, n, step, head, ref if kl else None), inv_temp=logits.kernel_inv_temp,
            targets=targets, m=m, s=s, a=a, mr=mr, sr=sr, tgt=tgt))
        return _finish(mode, targets, *state)

    def backward(self, mode, grad_out, m, logs, q, head: Head, ref: Optional[Head], targets, logits: Logits,
                 need_weight_grad: bool):
        if not self._runs(head, backward=True):
            return self.fallback.backward(mode, grad_out, m, logs, q, head, ref, targets, logits, need_weight_grad)
        dt, dev = logs.dtype, head.hidden.device
        n, vocab = head.hidden.shape[0], head.vocab
        grads = _zero_grads(head, dt, need_weight_grad, overwrite=n > 0)
        if n == 0:
            return grads
        kl = mode == EXACT_KL
        step = chunk_size(n, vocab, dev)
        fields = self._loop_fields(dt, n, step, head, ref if kl else None)
        terms = self._terms(logits)
        gh, gw, gb = grads
        abi.call("cuda", dev, abi.VocabSoftmaxLoopGradArgs(
            mode=mode, **fields, inv_temp=logits.kernel_inv_temp, targets=targets, m=m, logs=logs,
            q=q if mode != LOGPROB else None, g=_upstream(mode, grad_out, targets, dt),
            tile16=bf16_scratch(terms, n * step, dev) if fields["source"].in_dtype == BFLOAT16 else None,
            bf16_terms=terms, grad_hidden=gh, grad_weight=gw if gw.numel() else None,
            grad_bias=gb if gb.numel() else None))
        return grads

    def policy_loss(self, head: Head, targets, logits: Logits, terms, need_grad: bool, need_weight_grad: bool = True):
        # No extension loop for this op yet: the Python walk over cuBLAS GEMMs and the CUDA tile kernels.
        return self.fallback.policy_loss(head, targets, logits, terms, need_grad, need_weight_grad)

    def cross_entropy(self, head: Head, targets, logits: Logits, scale: float, need_grad: bool):
        if head.hidden.shape[0] == 0 or not self._runs(head, backward=need_grad):
            return self.fallback.cross_entropy(head, targets, logits, scale, need_grad)
        dt = compute_dtype(*head)
        n, vocab, dev = head.hidden.shape[0], head.vocab, head.hidden.device
        rows = min(n, ce_rows(vocab, dev))
        source = gemm_source(head, dt)
        m, s, _a, _mr, _sr, tgt = _zeros_state(n, dt, dev, kl=False)
        logs = torch.zeros(n, dtype=dt, device=dev)
        g = torch.where(targets >= 0, torch.full_like(logs, -scale), torch.zeros_like(logs))
        terms = self._terms(logits)
        gh, gw, gb = _zero_grads(head, dt, need_grad, overwrite=True) if need_grad \
            else (_empty(dt, dev), _empty(dt, dev), _empty(dt, dev))
        abi.call("cuda", dev, abi.VocabSoftmaxLoopCrossEntropyArgs(
            dtype=dtype_code(dt), n=n, vocab=vocab, rows=rows, source=source, inv_temp=logits.kernel_inv_temp,
            targets=targets, g=g if need_grad else None,
            ones=torch.ones(rows, dtype=dt, device=dev) if source.bias is not None else None,
            tile=torch.empty(rows * vocab, dtype=dt, device=dev),
            tile16=bf16_scratch(terms, rows * vocab, dev) if (need_grad and source.in_dtype == BFLOAT16) else None,
            bf16_terms=terms, m=m, s=s, tgt=tgt, logs=logs, grad_hidden=gh if need_grad else None,
            grad_weight=gw if need_grad else None, grad_bias=gb if gb.numel() else None))
        loss = -torch.where(targets >= 0, (tgt - m) - logs, torch.zeros_like(logs)).sum()
        return loss * scale, gh, gw, gb


class TritonFused:
    """The triton-fused backend: the GEMMs inside the Triton kernels, the whole vocabulary in one launch."""

    fallback = ChunkedWalk("triton")

    def forward(self, mode, head: Head, ref: Optional[Head], targets, logits: Logits):
        if head.weight is None:
            return self.fallback.forward(mode, head, ref, targets, logits)
        assert not logits.softcap, "the registry never sends a softcap to the fused Triton kernels"
        dt, state = _forward_state(mode, head, ref)
        if head.hidden.shape[0] == 0:
            return _finish(mode, targets, *state)
        kl = mode == EXACT_KL
        dev = head.hidden.device
        m, s, a, mr, sr, tgt = state
        abi.call("triton", dev, abi.VocabSoftmaxFusedFwdArgs(
            mode=mode, dtype=dtype_code(dt), **_fused_heads(head, ref, kl), targets=targets,
            inv_temp=logits.kernel_inv_temp, m=m, s=s, a=a, mr=mr, sr=sr, tgt=tgt))
        return _finish(mode, targets, *state)

    def backward(self, mode, grad_out, m, logs, q, head: Head, ref: Optional[Head], targets, logits: Logits,
                 need_weight_grad: bool):
        if head.weight is None:
            return self.fallback.backward(mode, grad_out, m, logs, q, head, ref, targets, logits, need_weight_grad)
        dt, dev = logs.dtype, head.hidden.device
        grads = _zero_grads(head, dt, need_weight_grad, overwrite=False)
        if head.hidden.shape[0] == 0:
            return grads
        kl = mode == EXACT_KL
        gh, gw, gb = grads
        abi.call("triton", dev, abi.VocabSoftmaxFusedGradArgs(
            mode=mode, dtype=dtype_code(dt), **_fused_heads(head, ref, kl), targets=targets,
            inv_temp=logits.kernel_inv_temp, m=m, logs=logs, q=q if mode != LOGPROB else None,
            g=_upstream(mode, grad_out, targets, dt), grad_hidden=gh, grad_weight=gw if gw.numel() else None,
            grad_bias=gb if gb.numel() else None))
        return grads

    def cross_entropy(self, head: Head, targets, logits: Logits, scale: float, need_grad: bool):
        return self.fallback.cross_entropy(head, targets, logits, scale, need_grad)

    def policy_loss(self, head: Head, targets, logits: Logits, terms, need_grad: bool, need_weight_grad: bool = True):
        return self.fallback.policy_loss(head, targets, logits, terms, need_grad, need_weight_grad)


def _fused_heads(head: Head, ref: Optional[Head], kl: bool) -> dict:
    """The operand fields of the fused kernels' arguments: the heads, contiguous (the reference for EXACT_KL)."""
    return dict(hidden=head.hidden.contiguous(), weight=head.weight.contiguous(), bias=head.bias,
                ref_hidden=ref.hidden.contiguous() if kl else None, ref_weight=ref.weight.contiguous() if kl else None,
                ref_bias=ref.bias if kl else None)


# Backend name (as ra3.ops.registry resolves it) -> the design that runs the vocabulary-softmax ops there.
DESIGNS = {
    "cpu": ChunkedWalk("cpu"),
    "cuda": ExtensionLoop(),
    "cuda-torch": ChunkedWalk("cuda"),
    "triton": ChunkedWalk("triton"),
    "triton-fused": TritonFused(),
}

"""Helpers of the kernel-level tests (test_kernel_contracts.py, test_native_build.py, test_triton_kernels.py):
dtype tags and tolerances, NaN-poisoned buffers, the float64 softmax reference and the chunked vocabulary walk.

Kernels are called through ``ra3.ops.kernel_abi.call(backend, device, args)``, the one call site ra3/ops uses,
with the kernel's argument NamedTuple: a tensor (or None) wherever the C struct holds a pointer.
"""
from __future__ import annotations

import math

import torch

from ra3.ops import kernel_abi as abi
from ra3.ops.kernel_abi import DTYPE_CODE as CODE  # noqa: F401  (re-exported for the kernel tests)
from ra3.ops.kernel_abi import ENTROPY, EXACT_KL, LOGPROB  # noqa: F401  (ENTROPY re-exported)

DTYPES = (torch.float32, torch.float64)
# Tolerances against a float64 reference; float32 kernels accumulate in float32 (as the contract says).
TOL = {torch.float32: dict(rtol=3e-5, atol=3e-5), torch.float64: dict(rtol=1e-11, atol=1e-12)}


def close(actual, expected, dtype, **kw):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **{**TOL[dtype], **kw})


def nan_like(shape, dtype, device="cpu"):
    return torch.full(shape, math.nan, dtype=dtype, device=device)


def softmax_reference(x, y=None):
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


def grad_state(x, y=None):
    """float64 (m, logs, q_entropy, q_kl) of x (and y) [n, V]: what vocab_softmax_grad takes (csrc/ra3_native.h),
    m the row max, logs = log sum exp(x - m), q = E_p[x - m] (entropy) and E_p[x - y] (KL), 0 * -inf read as 0."""
    m = x.max(-1).values
    d = x - m[:, None]
    logs = torch.logsumexp(d, -1)
    p = (d - logs[:, None]).exp()
    q_ent = torch.where(p > 0, p * d, torch.zeros_like(p)).sum(-1)
    q_kl = None if y is None else torch.where(p > 0, p * (x - y), torch.zeros_like(p)).sum(-1)
    return m, logs, q_ent, q_kl


def run_stats(backend, mode, dtype, z, r, targets, inv_temp, vc):
    """Walks the columns of z (and r), possibly strided views, in chunks of vc with ``vocab_softmax_fwd`` of
    ``backend``, as ra3/ops/vocab_softmax_walk.py does, and returns the running state (m, s, a, mr, sr, tgt)."""
    n, v = z.shape
    dev = z.device
    m = torch.full((n,), -math.inf, dtype=dtype, device=dev)
    s, a, tgt = (torch.zeros(n, dtype=dtype, device=dev) for _ in range(3))
    mr = torch.full((n,), -math.inf, dtype=dtype, device=dev) if mode == EXACT_KL else None
    sr = torch.zeros(n, dtype=dtype, device=dev) if mode == EXACT_KL else None
    for v0 in range(0, v, vc):
        v1 = min(v, v0 + vc)
        zc = z[:, v0:v1]
        rc = r[:, v0:v1] if r is not None else None
        abi.call(backend, dev, abi.VocabSoftmaxFwdArgs(
            mode=mode, dtype=CODE[dtype], z=zc, ldz=zc.stride(0), r=rc, ldr=0 if rc is None else rc.stride(0), n=n,
            vc=v1 - v0, v_offset=v0, inv_temp=inv_temp, targets=targets, m=m, s=s, a=a if mode != LOGPROB else None,
            mr=mr, sr=sr, tgt=tgt))
    return m, s, a, mr, sr, tgt


def shrink_triton_blocks(monkeypatch):
    """Triton blocks of 32 vocabulary columns and of 16 elements in the memory-bound kernels, so every
    multi-block loop and multi-program grid runs on small shapes (imports ra3.kernels, hence triton)."""
    from ra3.kernels import group_advantages, kl_estimator, policy_loss, segment_sum, vocab_softmax

    monkeypatch.setattr(vocab_softmax, "MAX_BLOCK_V", {torch.float32: 32, torch.float64: 32})
    for mod in (group_advantages, kl_estimator, policy_loss, segment_sum):
        monkeypatch.setattr(mod, "BLOCK", 16)

"""Per-token KL estimators k1/k2/k3 between policy and reference log-probs, and their gradient w.r.t. the policy."""
from __future__ import annotations

import triton
import triton.language as tl

from ra3.kernels._common import check_dtype, grid_1d
from ra3.kernels.token_math import check_estimator, kl_dlogprob, kl_value
from ra3.ops.kernel_abi import KlEstimatorBwdArgs, KlEstimatorFwdArgs

BLOCK = 1024


@triton.jit
def _kl_fwd_kernel(lp_ptr, ref_ptr, n, out_ptr, ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = i < n
    d = tl.load(lp_ptr + i, mask=valid, other=0.0) - tl.load(ref_ptr + i, mask=valid, other=0.0)
    tl.store(out_ptr + i, kl_value(d, ESTIMATOR), mask=valid)


@triton.jit
def _kl_bwd_kernel(lp_ptr, ref_ptr, g_ptr, n, grad_ptr, ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = i < n
    d = tl.load(lp_ptr + i, mask=valid, other=0.0) - tl.load(ref_ptr + i, mask=valid, other=0.0)
    g = tl.load(g_ptr + i, mask=valid, other=0.0)
    tl.store(grad_ptr + i, g * kl_dlogprob(d, ESTIMATOR), mask=valid)


def kl_estimator_fwd(a: KlEstimatorFwdArgs) -> None:
    """lp, ref [n] float32|float64 -> out [n], the estimate of each token (estimator 1, 2, 3 = k1, k2, k3)."""
    check_estimator(a.estimator)
    check_dtype(a.dtype, a.lp, a.ref, a.out)
    if a.n > 0:
        _kl_fwd_kernel[grid_1d(a.n, BLOCK)](a.lp, a.ref, a.n, a.out, ESTIMATOR=a.estimator, BLOCK=BLOCK)


def kl_estimator_bwd(a: KlEstimatorBwdArgs) -> None:
    """lp, ref, g [n] float32|float64 -> grad_lp [n] = g * d(estimate)/d(lp); the caller negates it for ref."""
    check_estimator(a.estimator)
    check_dtype(a.dtype, a.lp, a.ref, a.g, a.grad_lp)
    if a.n > 0:
        _kl_bwd_kernel[grid_1d(a.n, BLOCK)](a.lp, a.ref, a.g, a.n, a.grad_lp, ESTIMATOR=a.estimator, BLOCK=BLOCK)

"""Per-token math shared by the KL-estimator and policy-loss kernels (the Triton twin of csrc/token_math.h).

d = logprob - ref_logprob; k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d, computed as expm1(-d) + d so that the
small d of RL training keep their precision.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def expm1(x):
    """exp(x) - 1 without the cancellation near 0: a Taylor polynomial for |x| < 1/2, exp(x) - 1 beyond.

    Written out because libdevice's expm1 does not run under TRITON_INTERPRET. The truncation error at
    |x| = 1/2 is below 2e-8 (float32, degree 8) and 2e-18 (float64, degree 15) relative; beyond 1/2 the
    subtraction loses at most a factor 1.6 of exp's error.
    """
    small = tl.abs(x) < 0.5
    xs = tl.where(small, x, 0.0)
    q = xs * 0 + 1
    # Horner form of 1 + x/2 (1 + x/3 (1 + ... (1 + x/D))), so expm1 = x * q; integer divisors stay exact.
    if x.dtype == tl.float64:
        for i in tl.static_range(15, 1, -1):
            q = 1 + q * xs / i
    else:
        for i in tl.static_range(8, 1, -1):
            q = 1 + q * xs / i
    return tl.where(small, xs * q, tl.exp(x) - 1)


@triton.jit
def kl_value(d, ESTIMATOR: tl.constexpr):
    """The estimate of one token; ESTIMATOR is 1, 2 or 3 (k1, k2, k3)."""
    if ESTIMATOR == 1:
        return d
    elif ESTIMATOR == 2:
        return 0.5 * d * d
    else:
        return expm1(-d) + d


@triton.jit
def kl_dlogprob(d, ESTIMATOR: tl.constexpr):
    """d(estimate)/d(logprob); the gradient w.r.t. ref_logprob is its negative."""
    if ESTIMATOR == 1:
        return d * 0 + 1
    elif ESTIMATOR == 2:
        return d
    else:
        return -expm1(-d)


def check_estimator(estimator: int) -> None:
    if estimator not in (1, 2, 3):
        raise ValueError(f"estimator must be 1 (k1), 2 (k2) or 3 (k3), got {estimator}")

"""Helpers shared by the Triton launchers: the C ABI's dtype tag, block sizes, scalar arguments."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ra3.ops.kernel_abi import DTYPE_CODE, FLOAT32, FLOAT64

# The compute dtypes a kernel runs in (the ``dtype`` field's valid codes; the ops convert every input to the
# compute dtype before any kernel runs). BFLOAT16 and FLOAT16 are GEMM operand codes only.
_COMPUTE = {code: dt for dt, code in DTYPE_CODE.items() if code in (FLOAT32, FLOAT64)}


def check_dtype(code: int, *tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype tag as a torch dtype; every given tensor must have it (a mismatch is a caller bug)."""
    try:
        dtype = _COMPUTE[code]
    except KeyError:
        raise ValueError(f"dtype must be {FLOAT32} (float32) or {FLOAT64} (float64), got {code}") from None
    for t in tensors:
        if t is not None and t.dtype != dtype:
            raise TypeError(f"kernel argument of dtype {t.dtype} with dtype tag {code} ({dtype})")
    return dtype


def block(n: int, cap: int, floor: int = 16) -> int:
    """A power-of-two block covering n elements, between floor and cap."""
    return max(floor, min(cap, triton.next_power_of_2(max(int(n), 1))))


def grid_1d(n: int, block_size: int) -> tuple[int]:
    return (triton.cdiv(n, block_size),)


@triton.jit
def scalar_as(value, dtype: tl.constexpr):
    """A scalar argument (float, int, or a Triton scalar) as a ``dtype`` scalar tensor.

    Float arguments are declared ``tl.float64`` so a float64 kernel gets them unrounded; a float32 kernel rounds
    them once here, as the C++ kernels' ``T(x)`` does. Going through ``tl.full`` also covers integer arguments
    that Triton specialises to a constexpr (the value 1) and the plain Python numbers the interpreter passes.
    """
    return tl.full((), value, tl.float64).to(dtype)


@triton.jit
def sqrt_rn(x):
    """Correctly rounded square root: tl.sqrt_rn for float32 (tl.sqrt may be approximate), tl.sqrt for float64
    (which is IEEE there, and sqrt_rn has no float64 form)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)

"""Segment sums (out[k] = sum of values[i] with ids[i] == k) and their backward, the scatter back.

The forward scatters with atomic adds, like the CUDA kernel: on a GPU the order of the adds, hence the last
bits of a float sum, may vary run to run. The backward is a gather.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ra3.kernels._common import check_dtype, grid_1d
from ra3.ops.kernel_abi import SegmentSumBwdArgs, SegmentSumFwdArgs

BLOCK = 1024


@triton.jit
def _segment_sum_fwd_kernel(values_ptr, ids_ptr, n, num_segments, out_ptr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = i < n
    k = tl.load(ids_ptr + i, mask=valid, other=-1)
    v = tl.load(values_ptr + i, mask=valid, other=0.0)
    keep = valid & (k >= 0) & (k < num_segments)  # negative ids mean "no segment"
    tl.atomic_add(out_ptr + tl.where(keep, k, 0), v, mask=keep, sem="relaxed")


@triton.jit
def _segment_sum_bwd_kernel(grad_out_ptr, ids_ptr, n, grad_values_ptr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = i < n
    k = tl.load(ids_ptr + i, mask=valid, other=-1)
    live = valid & (k >= 0)
    g = tl.load(grad_out_ptr + tl.where(live, k, 0), mask=live, other=0.0)
    tl.store(grad_values_ptr + i, g, mask=valid)


def segment_sum_fwd(a: SegmentSumFwdArgs) -> None:
    """values [n] float32|float64, ids [n] int64 (negative: no segment) -> out [num_segments], overwritten."""
    check_dtype(a.dtype, a.values, a.out)
    if a.num_segments <= 0:
        return
    a.out.zero_()  # empty segments are 0; the CUDA twin memsets too
    if a.n > 0:
        _segment_sum_fwd_kernel[grid_1d(a.n, BLOCK)](a.values, a.ids, a.n, a.num_segments, a.out, BLOCK=BLOCK)


def segment_sum_bwd(a: SegmentSumBwdArgs) -> None:
    """grad_out [num_segments], ids [n] -> grad_values [n] = grad_out[ids] (0 where ids < 0)."""
    check_dtype(a.dtype, a.grad_out, a.grad_values)
    if a.n > 0:
        _segment_sum_bwd_kernel[grid_1d(a.n, BLOCK)](a.grad_out, a.ids, a.n, a.grad_values, BLOCK=BLOCK)

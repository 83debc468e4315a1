"""Sums of per-token values per segment (a rationale's span, a line, a sequence): the ELBO's inner sums."""
from __future__ import annotations

import torch
from torch import Tensor

from ra3.ops import _validate as check
from ra3.ops import kernel_abi as abi
from ra3.ops import registry, reference


# ``backend`` is the resolved native backend ('cpu', 'cuda' or 'triton') whose kernels the op body calls.
@torch.library.custom_op("ra3::segment_sum", mutates_args=())
def _segment_sum_op(backend: str, values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    out = torch.empty(num_segments, dtype=values.dtype, device=values.device)
    abi.call(backend, values.device, abi.SegmentSumFwdArgs(
        dtype=abi.dtype_code(values.dtype), values=values, ids=segment_ids, n=values.numel(), num_segments=num_segments,
        out=out))
    return out


@_segment_sum_op.register_fake
def _(backend, values, segment_ids, num_segments):
    return values.new_empty(num_segments)


@torch.library.custom_op("ra3::segment_sum_backward", mutates_args=())
def _segment_sum_backward_op(backend: str, grad_out: Tensor, segment_ids: Tensor) -> Tensor:
    grad = torch.empty(segment_ids.numel(), dtype=grad_out.dtype, device=grad_out.device)
    abi.call(backend, grad_out.device, abi.SegmentSumBwdArgs(
        dtype=abi.dtype_code(grad_out.dtype), grad_out=grad_out, ids=segment_ids, n=segment_ids.numel(),
        grad_values=grad))
    return grad


@_segment_sum_backward_op.register_fake
def _(backend, grad_out, segment_ids):
    return grad_out.new_empty(segment_ids.shape)


def _setup(ctx, inputs, output):
    ctx.backend = inputs[0]
    ctx.save_for_backward(inputs[2])


def _backward(ctx, grad_out):
    (segment_ids,) = ctx.saved_tensors
    return None, _segment_sum_backward_op(ctx.backend, grad_out.contiguous(), segment_ids), None, None


_segment_sum_op.register_autograd(_backward, setup_context=_setup)


def segment_sum(values, segment_ids, num_segments: int, *, backend: str = "auto") -> torch.Tensor:
    """out[k] = sum of values[i] with segment_ids[i] == k.

    values: [N] fp32|bf16|fp16; segment_ids: [N] int, any order, negative = in no segment; num_segments >= 0
    (the output is allocated in full: at most 2**60 - 1). Returns [num_segments] float32 (float64 for float64), 0 for
    empty segments. Differentiable w.r.t. values.
    Edges: values are not scanned for NaN: a NaN or inf reaches only its own segment's sum, without an error, and
    values of negative ids are dropped whatever they hold; N = 0 gives zeros.
    """
    check.tensor("values", values, ndim=1, floating=True)
    num_segments = check.integer("num_segments", num_segments, minimum=0, maximum=check.MAX_OUTPUT_ELEMENTS)
    check.segment_ids("segment_ids", segment_ids, values.shape[0], num_segments)
    device = check.same_device(values=values, segment_ids=segment_ids)
    name = registry.resolve("segment_sum", backend, device)
    if name == "torch":
        return reference.segment_sum(values, segment_ids, num_segments)
    dt = check.compute_dtype(values)
    return _segment_sum_op(name, values.to(dt).contiguous(), segment_ids.long().contiguous(), num_segments)

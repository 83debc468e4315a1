"""Per-token KL estimators between the policy and a reference from sampled-token log-probs (k1, k2, k3)."""
from __future__ import annotations

import torch
from torch import Tensor

from ra3.ops import _validate as check
from ra3.ops import kernel_abi as abi
from ra3.ops import registry, reference

ESTIMATOR_CODE = {"k1": 1, "k2": 2, "k3": 3}


# ``backend`` is the resolved native backend ('cpu', 'cuda' or 'triton') whose kernels the op body calls.
@torch.library.custom_op("ra3::kl_estimator", mutates_args=())
def _kl_op(backend: str, logprobs: Tensor, ref_logprobs: Tensor, estimator: int) -> Tensor:
    out = torch.empty_like(logprobs)
    abi.call(backend, logprobs.device, abi.KlEstimatorFwdArgs(
        dtype=abi.dtype_code(logprobs.dtype), estimator=estimator, lp=logprobs, ref=ref_logprobs, n=logprobs.numel(),
        out=out))
    return out


@_kl_op.register_fake
def _(backend, logprobs, ref_logprobs, estimator):
    return torch.empty_like(logprobs)


@torch.library.custom_op("ra3::kl_estimator_backward", mutates_args=())
def _kl_backward_op(backend: str, logprobs: Tensor, ref_logprobs: Tensor, grad_out: Tensor, estimator: int) -> Tensor:
    grad = torch.empty_like(logprobs)
    abi.call(backend, logprobs.device, abi.KlEstimatorBwdArgs(
        dtype=abi.dtype_code(logprobs.dtype), estimator=estimator, lp=logprobs, ref=ref_logprobs, g=grad_out,
        n=logprobs.numel(), grad_lp=grad))
    return grad


@_kl_backward_op.register_fake
def _(backend, logprobs, ref_logprobs, grad_out, estimator):
    return torch.empty_like(logprobs)


def _setup(ctx, inputs, output):
    ctx.backend, ctx.estimator = inputs[0], inputs[3]
    ctx.save_for_backward(inputs[1], inputs[2])


def _backward(ctx, grad_out):
    logprobs, ref_logprobs = ctx.saved_tensors
    grad = _kl_backward_op(ctx.backend, logprobs, ref_logprobs, grad_out.contiguous(), ctx.estimator)
    # Every estimator is a function of logprobs - ref_logprobs, so the reference's gradient is the negative
    # (formed only when asked for: the reference is usually frozen).
    return None, grad, (-grad if ctx.needs_input_grad[2] else None), None


_kl_op.register_autograd(_backward, setup_context=_setup)


def kl(logprobs, ref_logprobs, estimator: str = "k3", *, backend: str = "auto") -> torch.Tensor:
    """Per-token KL estimate from log-probs of the sampled tokens, d = logprobs - ref_logprobs:
    k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d (unbiased, always >= 0).

    logprobs, ref_logprobs: same shape, fp32|bf16|fp16. Returns that shape in float32 (float64 for float64),
    differentiable w.r.t. both.
    Edges: elementwise, not scanned for NaN: a NaN or inf gives what the formula gives at that element (NaN, or
    +-inf), without an error; empty inputs give an empty result.
    """
    check.tensor("logprobs", logprobs, floating=True)
    check.tensor("ref_logprobs", ref_logprobs, floating=True)
    check.shape("ref_logprobs", ref_logprobs, tuple(logprobs.shape), "the shape of logprobs")
    estimator = check.choice("estimator", estimator, reference.KL_ESTIMATORS)
    device = check.same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    name = registry.resolve("kl", backend, device)
    if name == "torch":
        return reference.kl(logprobs, ref_logprobs, estimator)
    dt = check.compute_dtype(logprobs, ref_logprobs)
    return _kl_op(name, logprobs.to(dt).contiguous(), ref_logprobs.to(dt).contiguous(),
                  ESTIMATOR_CODE[estimator])

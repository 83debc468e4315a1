"""PPO-clipped policy-gradient loss with a KL penalty: advantage scaling, clipping and KL in one fused pass."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ra3.ops import _kernels, registry, reference
from ra3.ops import _validate as check
from ra3.ops.kl import _ESTIMATOR_CODE

_AGGREGATION_CODE = {"token-mean": 0, "seq-mean-token-sum": 1, "seq-mean-token-mean": 2}


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable w.r.t. logprobs
    clip_fraction: torch.Tensor  # scalar, share of masked tokens whose clipped term was active
    kl_mean: torch.Tensor  # scalar, masked mean of the per-token KL estimate (0 without a reference)
    ratio_mean: torch.Tensor  # scalar, masked mean of exp(logprobs - old_logprobs)


# ``backend`` is the resolved native backend ('cpu', 'cuda' or 'triton') whose kernel the op body calls.
@torch.library.custom_op("ra3::policy_loss", mutates_args=())
def _policy_loss_op(backend: str, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    ref_logprobs: Tensor | None, kl_coef: float, kl_estimator: int, clip_low: float,
                    clip_high: float, aggregation: int) -> tuple[Tensor, Tensor, Tensor]:
    B, T = logprobs.shape
    loss = torch.empty(1, dtype=logprobs.dtype, device=logprobs.device)
    grad = torch.empty_like(logprobs)
    stats = torch.empty(4, dtype=logprobs.dtype, device=logprobs.device)
    _kernels.call(backend, "policy_loss_fwd", logprobs.device, _kernels.dtype_code(logprobs.dtype), B, T,
                  logprobs, old_logprobs, advantages, int(advantages.dim() == 2), mask, ref_logprobs, kl_coef,
                  kl_estimator, clip_low, clip_high, aggregation, loss, grad, stats)
    return loss[0], grad, stats


@_policy_loss_op.register_fake
def _(backend, logprobs, old_logprobs, advantages, mask, ref_logprobs, kl_coef, kl_estimator, clip_low, clip_high,
      aggregation):
    return logprobs.new_empty(()), torch.empty_like(logprobs), logprobs.new_empty(4)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_grad, _grad_stats):
    (grad_lp,) = ctx.saved_tensors
    # The per-token gradient was computed in the forward pass (the loss is its only consumer): just scale it.
    return None, grad_loss * grad_lp, None, None, None, None, None, None, None, None, None


_policy_loss_op.register_autograd(_backward, setup_context=_setup)


def policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.2,
                ref_logprobs=None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                aggregation: str = "token-mean", backend: str = "auto") -> PolicyLoss:
    """Clipped surrogate loss, per token max(-r A, -clip(r, 1 - clip_low, 1 + clip_high) A) + kl_coef * KL.

    logprobs, old_logprobs: [B, T] (B sequences, T tokens) fp32|bf16|fp16; advantages: [B] (one per sequence)
    or [B, T]; mask: [B, T] bool or float weights; ref_logprobs: [B, T] | None (needed when kl_coef > 0).
    aggregation: 'token-mean' (over all masked tokens), 'seq-mean-token-sum' (Dr. GRPO), 'seq-mean-token-mean'.
    Returns PolicyLoss(loss, clip_fraction, kl_mean, ratio_mean); only ``loss`` carries a gradient (to logprobs).
    Edges: NaN or inf in advantages or mask raises ValueError (checked); NaN or inf in logprobs, old_logprobs or
    ref_logprobs at a token of mask weight != 0 gives a NaN (or inf) loss without an error (not scanned for);
    tokens of weight 0 never count, whatever they hold; B = 0, T = 0 or no masked token gives loss 0 and zero
    statistics.
    """
    check.tensor("logprobs", logprobs, ndim=2, floating=True)
    bt = tuple(logprobs.shape)
    check.tensor("old_logprobs", old_logprobs, ndim=2, floating=True)
    check.shape("old_logprobs", old_logprobs, bt, "the shape of logprobs")
    check.tensor("advantages", advantages, ndim=(1, 2), floating=True)
    if tuple(advantages.shape) not in (bt[:1], bt):
        raise ValueError(f"advantages must be [B]={bt[:1]} or [B, T]={bt}, got {tuple(advantages.shape)}")
    check.finite("advantages", advantages)
    check.tensor("mask", mask)
    if not (mask.dtype == torch.bool or mask.dtype in check.FLOAT_DTYPES or mask.dtype in check.INDEX_DTYPES):
        raise TypeError(f"mask must be bool, integer or floating (weights), got {mask.dtype}")
    check.shape("mask", mask, bt, "the shape of logprobs")
    if mask.is_floating_point():
        check.finite("mask", mask)  # an inf weight has no meaning (and no agreed 0 * inf in the statistics)
    if ref_logprobs is not None:
        check.tensor("ref_logprobs", ref_logprobs, ndim=2, floating=True)
        check.shape("ref_logprobs", ref_logprobs, bt, "the shape of logprobs")
    dt = check.compute_dtype(logprobs, old_logprobs, advantages, ref_logprobs)
    clip_low = check.nonnegative_float("clip_low", clip_low)
    if clip_low >= 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    clip_high = check.nonnegative_float("clip_high", clip_high, dt)
    kl_coef = check.nonnegative_float("kl_coef", kl_coef, dt)
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    kl_estimator = check.choice("kl_estimator", kl_estimator, reference.KL_ESTIMATORS)
    aggregation = check.choice("aggregation", aggregation, reference.AGGREGATIONS)
    device = check.same_device(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                               ref_logprobs=ref_logprobs)
    name = registry.resolve("policy_loss", backend, device)
    if name == "torch":
        return PolicyLoss(*reference.policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip_low,
                                                 clip_high=clip_high, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
                                                 kl_estimator=kl_estimator, aggregation=aggregation))
    use_ref = ref_logprobs is not None and kl_coef > 0

    def prep(t):
        return t.detach().to(dt).contiguous()

    loss, _grad, stats = _policy_loss_op(name, logprobs.to(dt).contiguous(), prep(old_logprobs),
                                         prep(advantages), prep(mask), prep(ref_logprobs) if use_ref else None,
                                         kl_coef, _ESTIMATOR_CODE[kl_estimator], clip_low, clip_high,
                                         _AGGREGATION_CODE[aggregation])
    stats = stats.detach()  # statistics to log: no gradient flows through them
    return PolicyLoss(loss, stats[0], stats[1], stats[2])

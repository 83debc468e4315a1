"""Clipped policy-gradient loss (PPO, GSPO, CISPO) with a KL penalty: ratios, clipping, KL and aggregation in one
fused pass."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ra3.ops import _validate as check
from ra3.ops import kernel_abi as abi
from ra3.ops import registry, reference
from ra3.ops.kl import ESTIMATOR_CODE

# aggregation -> the kernels' code; 'dr-grpo' and 'dapo' are both the token sum over a normaliser (code 3).
AGGREGATION_CODE = {"token-mean": abi.TOKEN_MEAN, "seq-mean-token-sum": abi.SEQ_MEAN_TOKEN_SUM,
                    "seq-mean-token-mean": abi.SEQ_MEAN_TOKEN_MEAN, "dr-grpo": abi.TOKEN_SUM_NORM,
                    "dapo": abi.TOKEN_SUM_NORM}
RATIO_LEVEL_CODE = {"token": abi.RATIO_TOKEN, "sequence": abi.RATIO_SEQUENCE}
SURROGATE_CODE = {"ppo": abi.SURROGATE_PPO, "cispo": abi.SURROGATE_CISPO}


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable w.r.t. logprobs
    clip_fraction: torch.Tensor  # scalar, share of masked tokens whose clipped term was active (ppo) or whose
    # ratio lay outside [1 - clip_low, 1 + clip_high] (cispo)
    kl_mean: torch.Tensor  # scalar, masked mean of the per-token KL estimate (0 without a reference)
    ratio_mean: torch.Tensor  # scalar, masked mean of the importance ratio (token's, or its sequence's)


# ``backend`` is the resolved native backend ('cpu', 'cuda' or 'triton') whose kernel the op body calls.
@torch.library.custom_op("ra3::policy_loss", mutates_args=())
def _policy_loss_op(backend: str, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    ref_logprobs: Tensor | None, kl_coef: float, kl_estimator: int, clip_low: float,
                    clip_high: float, ratio_level: int, surrogate: int, aggregation: int,
                    agg_norm: float) -> tuple[Tensor, Tensor, Tensor]:
    B, T = logprobs.shape
    loss = torch.empty(1, dtype=logprobs.dtype, device=logprobs.device)
    grad = torch.empty_like(logprobs)
    stats = torch.empty(4, dtype=logprobs.dtype, device=logprobs.device)
    abi.call(backend, logprobs.device, abi.PolicyLossFwdArgs(
        dtype=abi.dtype_code(logprobs.dtype), B=B, T=T, lp=logprobs, old=old_logprobs, adv=advantages,
        adv_per_token=int(advantages.dim() == 2), mask=mask, ref=ref_logprobs, kl_coef=kl_coef,
        kl_estimator=kl_estimator, clip_low=clip_low, clip_high=clip_high, ratio_level=ratio_level,
        surrogate=surrogate, aggregation=aggregation, agg_norm=agg_norm, loss_out=loss, grad_lp=grad,
        stats_out=stats))
    return loss[0], grad, stats


@_policy_loss_op.register_fake
def _(backend, logprobs, old_logprobs, advantages, mask, ref_logprobs, kl_coef, kl_estimator, clip_low, clip_high,
      ratio_level, surrogate, aggregation, agg_norm):
    return logprobs.new_empty(()), torch.empty_like(logprobs), logprobs.new_empty(4)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_grad, _grad_stats):
    (grad_lp,) = ctx.saved_tensors
    # The per-token gradient was computed in the forward pass (the loss is its only consumer): just scale it.
    return (None, grad_loss * grad_lp) + (None,) * 12


_policy_loss_op.register_autograd(_backward, setup_context=_setup)


def policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.2,
                ref_logprobs=None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                aggregation: str = "token-mean", importance_sampling_level: str = "token", surrogate: str = "ppo",
                max_completion_length: int | None = None, num_items_in_batch=None,
                backend: str = "auto") -> PolicyLoss:
    """Clipped policy-gradient loss, per token max(-r A, -clip(r) A) + kl_coef * KL (PPO, the default).

    logprobs, old_logprobs: [B, T] (B sequences, T tokens) fp32|bf16|fp16; advantages: [B] (one per sequence)
    or [B, T]; mask: [B, T] bool or float weights w; ref_logprobs: [B, T] | None (needed when kl_coef > 0).
    clip(r) = clamp(r, 1 - clip_low, 1 + clip_high): asymmetric when they differ (DAPO's clip-higher).
    importance_sampling_level (the ratio r; TRL's and Liger-Kernel's argument of that name):
      'token'     r_t = exp(logprobs_t - old_logprobs_t) (PPO, Schulman et al. 2017).
      'sequence'  GSPO (Zheng et al. 2025, arXiv 2507.18071): every token of sequence i has the value
                  s_i = exp(sum_t w_t (lp_t - old_t) / sum_t w_t), clipped per sequence; its gradient is the
                  paper's GSPO-token one, r_t = sg(s_i) exp(lp_t - sg(lp_t)), so d r_t / d lp_t = s_i. With [B]
                  advantages this is GSPO's (and TRL's) gradient; with [B, T] advantages it is GSPO-token. GSPO
                  uses a much smaller clip range than PPO (the paper: clip_low=3e-4, clip_high=4e-4).
    surrogate:
      'ppo'    max(-r A, -clip(r) A); clipped tokens pass no gradient.
      'cispo'  -sg(clip(r)) A logprobs (CISPO, MiniMax-M1, arXiv 2506.13585): every token passes the gradient
               -clip(r) A. clip_low may be 1 here (no lower bound: TRL's and Liger's cispo, whose epsilon_high
               is the bound 1 + clip_high).
    aggregation of the per-token terms l_t (w = mask weights):
      'token-mean'           sum w l / sum w (DAPO's token-level loss; TRL's 'bnpo').
      'seq-mean-token-sum'   sum w l / B (verl's name).
      'seq-mean-token-mean'  mean over sequences of sum_t w l / sum_t w (GRPO; TRL's 'grpo').
      'dr-grpo'              sum w l / (B * max_completion_length), max_completion_length default T (Dr. GRPO,
                             Liu et al. 2025, arXiv 2503.20783; TRL's and Liger's 'dr_grpo').
      'dapo'                 sum w l / num_items_in_batch (TRL's and Liger's 'dapo' with num_items_in_batch): pass
                             the mask weight of the whole optimizer step, over every gradient-accumulation step
                             and process (divided by the process count where DDP averages gradients, as TRL and
                             Liger do), so every micro-batch's loss has one normaliser; 0 gives loss 0.
    max_completion_length: int >= 1, only with 'dr-grpo'; num_items_in_batch: number or one-element tensor >= 0,
    required by 'dapo' and only with it.
    Returns PolicyLoss(loss, clip_fraction, kl_mean, ratio_mean); only ``loss`` carries a gradient (to logprobs).
    Edges: NaN or inf in advantages or mask raises ValueError (checked); NaN or inf in logprobs, old_logprobs or
    ref_logprobs at a token of mask weight != 0 gives a NaN (or inf) loss without an error (not scanned for);
    tokens of weight 0 never count, whatever they hold (nor in a sequence ratio); B = 0, T = 0 or no masked token
    gives loss 0 and zero statistics; a sequence without weight has ratio 1.
    """
    check.tensor("logprobs", logprobs, ndim=2, floating=True)
    args = check_policy_args(tuple(logprobs.shape), "logprobs", old_logprobs, advantages, mask, ref_logprobs,
                             clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef, kl_estimator=kl_estimator,
                             aggregation=aggregation, importance_sampling_level=importance_sampling_level,
                             surrogate=surrogate, max_completion_length=max_completion_length,
                             num_items_in_batch=num_items_in_batch, dtypes=(logprobs,))
    (clip_low, clip_high, kl_coef, kl_estimator, aggregation, importance_sampling_level, surrogate,
     max_completion_length, num_items_in_batch, agg_norm, dt) = args
    device = check.same_device(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                               ref_logprobs=ref_logprobs)
    name = registry.resolve("policy_loss", backend, device)
    if name == "torch":
        return PolicyLoss(*reference.policy_loss(
            logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
            ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_estimator=kl_estimator, aggregation=aggregation,
            importance_sampling_level=importance_sampling_level, surrogate=surrogate,
            max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch))
    use_ref = ref_logprobs is not None and kl_coef > 0

    def prep(t):
        return t.detach().to(dt).contiguous()

    loss, _grad, stats = _policy_loss_op(name, logprobs.to(dt).contiguous(), prep(old_logprobs),
                                         prep(advantages), prep(mask), prep(ref_logprobs) if use_ref else None,
                                         kl_coef, ESTIMATOR_CODE[kl_estimator], clip_low, clip_high,
                                         RATIO_LEVEL_CODE[importance_sampling_level], SURROGATE_CODE[surrogate],
                                         AGGREGATION_CODE[aggregation], agg_norm)
    stats = stats.detach()  # statistics to log: no gradient flows through them
    return PolicyLoss(loss, stats[0], stats[1], stats[2])


class PolicyArgs(NamedTuple):
    """policy_loss's keyword arguments, checked (shared with ``linear_policy_loss``)."""
    clip_low: float
    clip_high: float
    kl_coef: float
    kl_estimator: str
    aggregation: str
    importance_sampling_level: str
    surrogate: str
    max_completion_length: int | None
    num_items_in_batch: float | None
    agg_norm: float  # the kernels' fixed divisor of the masked token sum ('dr-grpo', 'dapo'; 0.0 otherwise)
    dtype: torch.dtype  # the compute dtype of the policy arithmetic


def check_policy_args(bt: tuple[int, int], shape_of: str, old_logprobs, advantages, mask, ref_logprobs, *,
                      clip_low, clip_high, kl_coef, kl_estimator, aggregation, importance_sampling_level, surrogate,
                      max_completion_length, num_items_in_batch, dtypes=()) -> PolicyArgs:
    """Checks the per-token tensors ([B, T] = ``bt``, the shape of ``shape_of``) and the scalar arguments of a
    policy loss; ``dtypes``: the other tensors whose dtype sets the compute dtype."""
    what = f"the shape of {shape_of}"
    check.tensor("old_logprobs", old_logprobs, ndim=2, floating=True)
    check.shape("old_logprobs", old_logprobs, bt, what)
    check.tensor("advantages", advantages, ndim=(1, 2), floating=True)
    if tuple(advantages.shape) not in (bt[:1], bt):
        raise ValueError(f"advantages must be [B]={bt[:1]} or [B, T]={bt}, got {tuple(advantages.shape)}")
    check.finite("advantages", advantages)
    check.tensor("mask", mask)
    if not (mask.dtype == torch.bool or mask.dtype in check.FLOAT_DTYPES or mask.dtype in check.INDEX_DTYPES):
        raise TypeError(f"mask must be bool, integer or floating (weights), got {mask.dtype}")
    check.shape("mask", mask, bt, what)
    if mask.is_floating_point():
        check.finite("mask", mask)  # an inf weight has no meaning (and no agreed 0 * inf in the statistics)
    if ref_logprobs is not None:
        check.tensor("ref_logprobs", ref_logprobs, ndim=2, floating=True)
        check.shape("ref_logprobs", ref_logprobs, bt, what)
    dt = check.compute_dtype(*dtypes, old_logprobs, advantages, ref_logprobs)
    surrogate = check.choice("surrogate", surrogate, reference.SURROGATES)
    clip_low = check.nonnegative_float("clip_low", clip_low)
    if clip_low > 1 or (clip_low == 1 and surrogate != "cispo"):
        raise ValueError(f"clip_low must be in [0, 1) ([0, 1] with surrogate='cispo'), got {clip_low}")
    clip_high = check.nonnegative_float("clip_high", clip_high, dt)
    kl_coef = check.nonnegative_float("kl_coef", kl_coef, dt)
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    kl_estimator = check.choice("kl_estimator", kl_estimator, reference.KL_ESTIMATORS)
    importance_sampling_level = check.choice("importance_sampling_level", importance_sampling_level,
                                             reference.IMPORTANCE_SAMPLING_LEVELS)
    aggregation = check.choice("aggregation", aggregation, reference.AGGREGATIONS)
    max_completion_length, num_items_in_batch, agg_norm = _normaliser(aggregation, bt, max_completion_length,
                                                                      num_items_in_batch, dt)
    return PolicyArgs(clip_low, clip_high, kl_coef, kl_estimator, aggregation, importance_sampling_level,
                      surrogate, max_completion_length, num_items_in_batch, agg_norm, dt)


def _normaliser(aggregation: str, bt: tuple[int, int], max_completion_length, num_items_in_batch,
                dtype: torch.dtype):
    """(max_completion_length, num_items_in_batch, the kernels' agg_norm), validated. Each argument belongs to one
    aggregation ('dr-grpo', 'dapo'), whose fixed divisor of the masked token sum agg_norm is (0.0 for the others,
    which do not read it)."""
    if max_completion_length is not None:
        if aggregation != "dr-grpo":
            raise ValueError(f"max_completion_length is read by aggregation='dr-grpo' only, got "
                             f"aggregation={aggregation!r}")
        max_completion_length = check.integer("max_completion_length", max_completion_length, minimum=1)
    if num_items_in_batch is not None and aggregation != "dapo":
        raise ValueError(f"num_items_in_batch is read by aggregation='dapo' only, got aggregation={aggregation!r}")
    if aggregation == "dr-grpo":
        return max_completion_length, None, float(bt[0] * (bt[1] if max_completion_length is None
                                                           else max_completion_length))
    if aggregation != "dapo":
        return None, None, 0.0
    if num_items_in_batch is None:
        raise ValueError("num_items_in_batch is needed by aggregation='dapo': the mask weight of the whole batch, "
                         "over processes and gradient-accumulation steps")
    num_items_in_batch = check.nonnegative_float(
        "num_items_in_batch", check.scalar_value("num_items_in_batch", num_items_in_batch), dtype)
    return None, num_items_in_batch, num_items_in_batch

"""The clipped policy-gradient loss fused with the lm_head: ``policy_loss(linear_logprobs(...))`` with an optional
entropy bonus, its gradients formed in the forward pass while each logits tile is in memory.

A GRPO / PPO loss is one scalar, so the upstream gradient of every token's log-prob is known in the forward pass:
for token-level ratios a token's dL/dlogp depends on its own log-prob and on aggregation weights the mask fixes up
front. The walk (``vocab_softmax_walk.ChunkedWalk.policy_loss``) takes chunks of whole vocabulary rows: one GEMM for
the logits tile, the tile kernels' log-sum-exp and entropy, the per-token coefficients below (a few [rows] torch
ops), the gradient tile written in place, two GEMMs to grad_hidden and grad_weight: 3 GEMMs per step where the
unfused ``linear_logprobs`` + ``policy_loss`` does 4 (its backward recomputes every tile) and eager 3 with the
[N, V] logits held. Sequence-level ratios (GSPO) need each sequence's summed log-ratio before any coefficient, so
they take a forward-only pass first (1 GEMM more: 4).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ra3.ops import _validate as check
from ra3.ops import registry, reference
from ra3.ops.kl import ESTIMATOR_CODE
from ra3.ops.policy_loss import AGGREGATION_CODE, RATIO_LEVEL_CODE, SURROGATE_CODE, check_policy_args
from ra3.ops.vocab_softmax import (check_linear_inputs, check_targets, logit_transform, needed_features,
                                   register_loss_autograd)
from ra3.ops.vocab_softmax_walk import DESIGNS, Head, Logits

_K1, _K2 = ESTIMATOR_CODE["k1"], ESTIMATOR_CODE["k2"]  # else k3
_TOKEN_MEAN, _SEQ_SUM, _SEQ_MEAN, _FIXED = 0, 1, 2, 3  # policy_loss.AGGREGATION_CODE
_CISPO = SURROGATE_CODE["cispo"]  # else ppo
_SEQUENCE = RATIO_LEVEL_CODE["sequence"]


class LinearPolicyLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable w.r.t. hidden, weight and bias
    clip_fraction: torch.Tensor  # scalar statistics over the masked tokens, as ``PolicyLoss``'s
    kl_mean: torch.Tensor
    ratio_mean: torch.Tensor
    entropy_mean: torch.Tensor  # mask-weighted mean of the per-token entropy (nats); always computed


class _TokenTerms:
    """The policy loss as a function of the per-token log-probs and entropies: its value, statistics and per-token
    partial derivatives in closed form (the arithmetic of ``reference.policy_loss``, which autograd differentiates
    there). Every tensor is flat [B * T] in the policy's compute dtype; tokens of mask weight 0 hold zeros."""

    def __init__(self, bt, old, adv, mask, ref, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high,
                 aggregation, agg_norm, ratio_level, surrogate):
        B, T = bt
        self.dt = old.dtype
        w = mask.to(self.dt)
        self.live = w != 0

        def alive(t):
            return torch.where(self.live, t, torch.zeros_like(t)).reshape(-1)

        self.w, self.old, self.bt = alive(w), alive(old), bt
        self.adv = alive(adv[:, None].expand(B, T) if adv.dim() == 1 else adv)
        self.ref = alive(ref) if ref is not None else None
        self.live = self.live.reshape(-1)
        self.kl_coef, self.kl_estimator, self.entropy_coef = kl_coef, kl_estimator, entropy_coef
        self.low, self.high = 1 - clip_low, 1 + clip_high
        self.ratio_level, self.surrogate = ratio_level, surrogate
        self.total = self.w.sum()
        # The aggregation as one weight per token: the loss is sum_t agg_t l_t. Known up front: it reads the mask.
        if aggregation == _TOKEN_MEAN:
            norm = self.total if self.total > 0 else None
        elif aggregation == _SEQ_SUM:
            norm = max(B, 1)
        elif aggregation == _FIXED:
            norm = agg_norm if agg_norm > 0 else None
        else:  # seq-mean-token-mean: each sequence's mean, then the mean over sequences
            per_seq = self.w.view(B, T).sum(1).clamp_min(torch.finfo(self.dt).tiny) * max(B, 1)
            norm = per_seq[:, None].expand(B, T).reshape(-1)
        self.agg = self.w / norm if norm is not None else torch.zeros_like(self.w)
        self.two_pass = ratio_level == _SEQUENCE
        self.seq_ratio: Optional[Tensor] = None

    def prepare(self, lp: Tensor) -> None:
        """Sequence-level ratios s_i = exp(sum_t w (lp - old) / sum_t w), 1 for a sequence without weight."""
        if not self.two_pass:
            return
        B, T = self.bt
        lp = torch.where(self.live, lp.to(self.dt), torch.zeros_like(self.w))
        seq_w = self.w.view(B, T).sum(1)
        has = seq_w != 0
        log_ratio = (self.w * (lp - self.old)).view(B, T).sum(1) / torch.where(has, seq_w, torch.ones_like(seq_w))
        self.seq_ratio = torch.where(has, log_ratio.exp(), torch.ones_like(log_ratio))[:, None].expand(B, T) \
            .reshape(-1)

    def per_token(self, sl: slice, lp: Tensor):
        """(l_t, dl_t/dlp_t, clipped, kl_t, r_t) of the tokens ``sl`` with log-probs ``lp``."""
        lp = torch.where(self.live[sl], lp.to(self.dt), torch.zeros_like(self.w[sl]))
        adv = self.adv[sl]
        if self.two_pass:
            ratio = slope = self.seq_ratio[sl]  # value s_i, d r_t / d lp_t = s_i (GSPO-token)
        else:
            ratio = slope = torch.exp(lp - self.old[sl])
        clamped = ratio.clamp(self.low, self.high)
        if self.surrogate == _CISPO:
            clipped = (ratio < self.low) | (ratio > self.high)
            loss = -clamped * adv * lp
            grad = -clamped * adv
        else:  # max(-r A, -clip(r) A): the clipped term, where it wins, is flat in r
            unclipped, clipped_term = -ratio * adv, -clamped * adv
            clipped = clipped_term > unclipped
            loss = torch.maximum(unclipped, clipped_term)
            grad = torch.where(clipped, torch.zeros_like(adv), -adv * slope)
        if self.ref is not None:
            d = lp - self.ref[sl]
            if self.kl_estimator == _K1:
                kl, dkl = d, torch.ones_like(d)
            elif self.kl_estimator == _K2:
                kl, dkl = 0.5 * d * d, d
            else:
                e = torch.exp(-d)
                kl, dkl = e - 1 + d, 1 - e
            loss = loss + self.kl_coef * kl
            grad = grad + self.kl_coef * dkl
        else:
            kl = torch.zeros_like(lp)
        return loss, grad, clipped, kl, ratio

    def coefficients(self, i0: int, i1: int, lp: Tensor, ent: Tensor):
        """(agg, dl/dlogp, -entropy_coef) of rows [i0, i1): dL/dlogp_t = agg_t dl_t/dlogp_t, dL/dentropy_t =
        -agg_t entropy_coef, the aggregation weight agg_t a factor of both."""
        sl = slice(i0, i1)
        _loss, grad, *_ = self.per_token(sl, lp)
        return self.agg[sl], grad, -self.entropy_coef

    def value(self, lp: Tensor, ent: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, stats [clip_fraction, kl_mean, ratio_mean, entropy_mean]) from every row's log-prob and entropy."""
        loss, _grad, clipped, kl, ratio = self.per_token(slice(None), lp)
        ent = torch.where(self.live, ent.to(self.dt), torch.zeros_like(self.w))
        total = (self.agg * loss).sum()
        if self.entropy_coef != 0.0:
            total = total - self.entropy_coef * (self.agg * ent).sum()
        w = self.w
        if self.total > 0:
            stats = torch.stack([(clipped.to(self.dt) * w).sum(), (kl * w).sum(), (ratio * w).sum(),
                                 (ent * w).sum()]) / self.total
        else:
            stats = torch.zeros(4, dtype=self.dt, device=w.device)
        return total, stats


# ``backend`` is a resolved design name of ``vocab_softmax_walk.DESIGNS``; hidden is [N, H], the per-token tensors
# [B, T] (targets int64 with -1 where ignored), advantages [B] or [B, T], mask in the policy's compute dtype.
@torch.library.custom_op("ra3::linear_policy_loss", mutates_args=())
def linear_policy_loss_op(backend: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                          old_logprobs: Tensor, advantages: Tensor, mask: Tensor, ref_logprobs: Optional[Tensor],
                          inv_temp: float, scale: float, softcap: float, clip_low: float, clip_high: float,
                          kl_coef: float, kl_estimator: int, entropy_coef: float, aggregation: int, agg_norm: float,
                          ratio_level: int, surrogate: int, need_grad: bool,
                          need_weight_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias, stats [4]); gradients empty when not need_grad (grad_weight and
    grad_bias when not need_weight_grad)."""
    terms = _TokenTerms(tuple(targets.shape), old_logprobs, advantages, mask, ref_logprobs, kl_coef, kl_estimator,
                        entropy_coef, clip_low, clip_high, aggregation, agg_norm, ratio_level, surrogate)
    lp, ent, gh, gw, gb = DESIGNS[backend].policy_loss(Head(hidden, weight, bias), targets.reshape(-1),
                                                       Logits(inv_temp, scale, softcap), terms, need_grad,
                                                       need_weight_grad)
    loss, stats = terms.value(lp, ent)
    return loss, gh, gw, gb, stats


@linear_policy_loss_op.register_fake
def _(backend, hidden, weight, bias, targets, old_logprobs, advantages, mask, ref_logprobs, inv_temp, scale, softcap,
      clip_low, clip_high, kl_coef, kl_estimator, entropy_coef, aggregation, agg_norm, ratio_level, surrogate,
      need_grad, need_weight_grad):
    dt = check.compute_dtype(hidden, weight, bias)
    pdt = mask.dtype
    if not need_grad:
        grads = (hidden.new_empty(0, dtype=dt), hidden.new_empty(0, dtype=dt), hidden.new_empty(0, dtype=dt))
    else:
        grads = (hidden.new_empty(hidden.shape, dtype=dt),
                 weight.new_empty(weight.shape, dtype=dt) if need_weight_grad else hidden.new_empty(0, dtype=dt),
                 bias.new_empty(bias.shape, dtype=dt) if bias is not None and need_weight_grad
                 else hidden.new_empty(0, dtype=dt))
    return (hidden.new_empty((), dtype=pdt), *grads, hidden.new_empty(4, dtype=pdt))


register_loss_autograd(linear_policy_loss_op, "linear_policy_loss", 23, weight_grad_flag=True)


def linear_policy_loss(hidden, weight, targets, old_logprobs, advantages, mask, *, bias=None,
                       temperature: float = 1.0, ignore_index: int = -100, scale: float = 1.0,
                       softcap: float | None = None, clip_low: float = 0.2, clip_high: float = 0.2,
                       ref_logprobs=None, kl_coef: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0,
                       aggregation: str = "token-mean", importance_sampling_level: str = "token",
                       surrogate: str = "ppo", max_completion_length: int | None = None, num_items_in_batch=None,
                       backend: str = "auto") -> LinearPolicyLoss:
    """Clipped policy-gradient loss of the lm_head's log-probs, fused with its GEMM, with an entropy bonus:

        loss = policy_loss(lp, old_logprobs, advantages, mask, ...).loss - entropy_coef * agg(entropy)
        lp = linear_logprobs(hidden, weight, targets, bias=..., temperature=..., ...).reshape(B, T)

    where agg aggregates the per-token entropy of softmax(logits / temperature) exactly as the policy terms are
    aggregated (the same ``aggregation``, mask weights and normaliser). Every argument means what it means in
    ``linear_logprobs`` (the lm_head: bias, temperature, ignore_index, scale, softcap) and ``policy_loss`` (the rest;
    see its docstring for the ratios, surrogates, KL estimators and aggregations).

    hidden: [B, T, H] or [B * T, H] fp32|bf16|fp16; weight: [V, H]; bias: [V] | None; targets: [B, T] int;
    old_logprobs, mask, ref_logprobs: [B, T]; advantages: [B] or [B, T]; entropy_coef >= 0.
    ignore_index: such a target's log-prob is 0 and passes no gradient, as in ``linear_logprobs``; its token still
    counts where its mask weight is not 0 (give those tokens mask 0).
    Returns LinearPolicyLoss(loss, clip_fraction, kl_mean, ratio_mean, entropy_mean): float32 (float64 for float64
    inputs); ``loss`` is differentiable w.r.t. hidden, weight and bias; the statistics are detached, over the masked
    tokens, entropy_mean always computed (the tile kernel's entropy mode folds it into the log-sum-exp pass).

    The gradients are formed in the forward pass and scaled by the upstream gradient in the backward, so the [N, V]
    logits never exist at once (peak extra memory: one [rows, V] tile). GEMMs per step on
    every native backend: 3 with token-level ratios (logits tile, grad_hidden, grad_weight), 4 with
    importance_sampling_level='sequence' (a forward-only pass first: each coefficient needs its sequence's whole
    log-ratio; on CPU that makes it slower than the unfused path, see benchmarks/NOTES.md), one fewer where weight and
    bias need no gradient (a frozen head), 1 without gradients. Backends 'cpu', 'cuda-torch' and 'triton' walk the tiles
    in Python with their tile kernels; 'cuda' runs that same walk over cuBLAS GEMMs (no extension loop for this op yet)
    and 'triton-fused' the 'triton' walk. 'torch' is ``reference.linear_policy_loss`` (materialised logits).
    Edges: as ``policy_loss`` and ``linear_logprobs``: NaN or inf in advantages or mask raises ValueError; tokens of
    mask weight 0 never reach the loss or the statistics (NaN in their hidden rows still reaches the weight's
    gradient, as in eager); B = 0, T = 0 or no masked token gives loss 0 and zero statistics.
    """
    check.tensor("targets", targets, ndim=2, floating=False)
    bt = tuple(targets.shape)
    check.tensor("hidden", hidden, ndim=(2, 3), floating=True)
    if tuple(hidden.shape[:-1]) not in (bt, (bt[0] * bt[1],)):
        raise ValueError(f"hidden must be [B, T, H] or [B * T, H] with [B, T] = {bt} (the shape of targets), got "
                         f"{tuple(hidden.shape)}")
    h2 = hidden.reshape(bt[0] * bt[1], hidden.shape[-1])
    n, vocab = check_linear_inputs("", h2, weight, bias)
    head_dt = check.compute_dtype(hidden, weight, bias)
    temperature, scale, softcap, logits = logit_transform(temperature, scale, softcap, "default", head_dt)
    tgt = check_targets(targets.reshape(-1), n, vocab, ignore_index, hidden.device)
    args = check_policy_args(bt, "targets", old_logprobs, advantages, mask, ref_logprobs, clip_low=clip_low,
                             clip_high=clip_high, kl_coef=kl_coef, kl_estimator=kl_estimator, aggregation=aggregation,
                             importance_sampling_level=importance_sampling_level, surrogate=surrogate,
                             max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
                             dtypes=(hidden, weight, bias))
    entropy_coef = check.nonnegative_float("entropy_coef", entropy_coef, args.dtype)
    device = check.same_device(hidden=hidden, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                               ref_logprobs=ref_logprobs)
    name = registry.resolve("linear_policy_loss", backend, device, needs=needed_features(softcap))
    policy_kw = dict(clip_low=args.clip_low, clip_high=args.clip_high, ref_logprobs=ref_logprobs,
                     kl_coef=args.kl_coef, kl_estimator=args.kl_estimator, aggregation=args.aggregation,
                     importance_sampling_level=args.importance_sampling_level, surrogate=args.surrogate,
                     max_completion_length=args.max_completion_length, num_items_in_batch=args.num_items_in_batch)
    if name == "torch":
        return LinearPolicyLoss(*reference.linear_policy_loss(
            hidden, weight, tgt.view(bt), old_logprobs, advantages, mask, bias=bias, temperature=temperature,
            ignore_index=-1, scale=scale, softcap=softcap, entropy_coef=entropy_coef, **policy_kw))
    dt = args.dtype
    use_ref = ref_logprobs is not None and args.kl_coef > 0

    def prep(t):
        return t.detach().to(dt).contiguous()

    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    need_weight_grad = need_grad and any(t is not None and t.requires_grad for t in (weight, bias))
    loss, _gh, _gw, _gb, stats = linear_policy_loss_op(
        name, h2, weight, bias, tgt.view(bt), prep(old_logprobs), prep(advantages), prep(mask),
        prep(ref_logprobs) if use_ref else None, *logits[:3], args.clip_low, args.clip_high, args.kl_coef,
        ESTIMATOR_CODE[args.kl_estimator], entropy_coef, AGGREGATION_CODE[args.aggregation], args.agg_norm,
        RATIO_LEVEL_CODE[args.importance_sampling_level], SURROGATE_CODE[args.surrogate], need_grad,
        need_weight_grad)
    stats = stats.detach()
    return LinearPolicyLoss(loss, *stats.unbind())

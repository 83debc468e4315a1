"""The policy-gradient update both trainers take: the E-step of RA3 (on decision and comment tokens) and GRPO (on
response tokens).

Given the behaviour policy's log-probs of the sampled tokens (``old_logprobs``), their advantages and weights, and
the frozen reference's log-probs: ``epochs`` passes over the batch in minibatches; on each, the loss of the current
policy (``_loss``, the one place it is computed), backward, gradient clipping, an optimizer step. The loss is
``ops.linear_policy_loss`` on the final hidden states when the tokens are plain next-token targets of the lm_head
(``PolicyTokens.head``: GRPO's responses): log-probs, PPO ratio and clip, KL and aggregation fused with the lm_head
GEMM, gradients formed in the forward pass (3 GEMMs, no [tokens x vocab] logits). Otherwise (``PolicyTokens.logprobs``:
the E-step, whose think decision is the log of a sum over the comment-opening tokens and whose comment tokens are
scored under a masked head) the log-probs come first and ``ops.policy_loss`` takes them.

Under ddp / fsdp each rank passes its own sequences; the loss is rescaled so that the gradients averaged over
ranks are those of one loss over every rank's minibatch (``ra3.distributed.scale_for_global_mean``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from ra3 import distributed as ranks
from ra3 import ops
from ra3.ops import reference as ops_reference

# aggregations of the update: every one of ops.policy_loss except 'dapo', whose normaliser counts the items of a
# whole optimizer step over gradient-accumulation steps; here each minibatch is one step, where it is token-mean
AGGREGATIONS = tuple(a for a in ops_reference.AGGREGATIONS if a != "dapo")
_PER_TOKEN = ("token-mean",)  # aggregations that are a mean over token weights (the rest: over sequences)


class HeadInputs(NamedTuple):
    """What the lm_head turns into the log-probs of a minibatch's tokens: hidden [b, T, H] final hidden states
    (with gradients) that predict targets [b, T] int64 (-100 where no token is), through weight [V, H] and
    bias [V] | None at ``temperature``."""
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    targets: torch.Tensor
    temperature: float


@dataclass
class PolicyTokens:
    """The sampled tokens an update trains on, laid out [B, T] (B sequences, T policy-token slots).

    logprobs: ``logprobs(model, index) -> [b, T] float32``, the log-probs under ``model`` (the unwrapped policy,
    with gradients) of the sampled tokens of the sequences ``index`` ([b] int64, on the batch's device); or None
    when ``head`` is given.
    head: ``head(model, index) -> HeadInputs``: the tokens are next-token targets of the lm_head, and the loss is
    fused with it (``ops.linear_policy_loss``).
    old_logprobs: [B, T] float32, the same under the policy that sampled them (no gradient).
    advantages: [B] or [B, T] float32. weights: [B, T] bool or float, 0 off the policy tokens.
    ref_logprobs: [B, T] float32 under the frozen reference, or None (no KL).
    """
    logprobs: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor
    ref_logprobs: Optional[torch.Tensor] = None
    head: Optional[Callable[[torch.nn.Module, torch.Tensor], HeadInputs]] = None

    @property
    def size(self) -> int:
        return self.old_logprobs.shape[0]


@dataclass(frozen=True)
class UpdateConfig:
    """The coefficients of an update (each trainer maps its config's fields onto these)."""
    epochs: int = 1  # passes over the batch
    minibatch_size: int = 0  # this rank's sequences per optimizer step; 0: the whole batch
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    aggregation: str = "token-mean"
    max_completion_length: Optional[int] = None  # 'dr-grpo' only: the fixed length of its normaliser
    grad_clip: float = 1.0
    backend: str = "auto"


# What an update reports, by the names of the E-step's and RLVR's step records: the clipped loss, the share of
# clipped tokens, the KL estimate to the reference, the mean importance ratio (per token) and the gradient norm.
UPDATE_METRICS = ("policy_loss", "clip_fraction", "ref_kl", "ratio_mean", "grad_norm")
# Those that are means over tokens (the rest is per optimizer step).
PER_TOKEN_METRICS = ("policy_loss", "clip_fraction", "ref_kl", "ratio_mean")


def policy_gradient_update(policy, optimizer, tokens: PolicyTokens, cfg: UpdateConfig) -> dict:
    """Train ``policy`` (wrapped by ``ra3.distributed.wrap_model`` or plain) on ``tokens``: ``cfg.epochs`` passes,
    each over minibatches of ``cfg.minibatch_size`` sequences (shuffled by torch's global RNG when there are
    several; in order otherwise).

    Returns the means over optimizer steps of ``UPDATE_METRICS`` (floats, this rank's), under the names both
    trainers' records use. Leaves ``policy`` in eval mode.
    """
    B = tokens.size
    device = tokens.old_logprobs.device
    mb = cfg.minibatch_size or B
    stats = {name: [] for name in UPDATE_METRICS}
    policy.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(B, device=device) if mb < B else torch.arange(B, device=device)
        for start in range(0, B, mb):
            idx = order[start:start + mb]
            result = ranks.forward(policy, lambda model: _loss(model, tokens, idx, cfg))
            optimizer.zero_grad(set_to_none=True)
            count = float(tokens.weights[idx].sum()) if cfg.aggregation in _PER_TOKEN else len(idx)
            ranks.scale_for_global_mean(result.loss, count).backward()
            grad_norm = ranks.clip_grad_norm_(policy, cfg.grad_clip)
            optimizer.step()
            for key, value in (("policy_loss", result.loss), ("clip_fraction", result.clip_fraction),
                               ("ref_kl", result.kl_mean), ("ratio_mean", result.ratio_mean),
                               ("grad_norm", grad_norm)):
                stats[key].append(float(value.detach()) if torch.is_tensor(value) else float(value))
    policy.eval()
    return {k: sum(v) / len(v) if v else 0.0 for k, v in stats.items()}


def _loss(model, tokens: PolicyTokens, idx: torch.Tensor, cfg: UpdateConfig):
    """The clipped loss of minibatch ``idx`` under ``model`` (the unwrapped policy): the update's one log-prob and
    loss computation. Returns ``ops.PolicyLoss`` or ``ops.LinearPolicyLoss`` (loss, clip_fraction, kl_mean,
    ratio_mean[, entropy_mean])."""
    ref = None if tokens.ref_logprobs is None else tokens.ref_logprobs[idx]
    kw = dict(clip_low=cfg.clip_low, clip_high=cfg.clip_high, ref_logprobs=ref, kl_coef=cfg.kl_coef,
              kl_estimator=cfg.kl_estimator, aggregation=cfg.aggregation, backend=cfg.backend)
    if cfg.aggregation == "dr-grpo":
        kw["max_completion_length"] = cfg.max_completion_length
    old, adv, weights = tokens.old_logprobs[idx], tokens.advantages[idx], tokens.weights[idx]
    if tokens.head is None:
        return ops.policy_loss(tokens.logprobs(model, idx), old, adv, weights, **kw)
    h = tokens.head(model, idx)
    return ops.linear_policy_loss(h.hidden, h.weight, h.targets, old, adv, weights, bias=h.bias,
                                  temperature=h.temperature, **kw)


__all__ = ["HeadInputs", "PolicyTokens", "UpdateConfig", "policy_gradient_update", "AGGREGATIONS"]

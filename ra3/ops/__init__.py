"""Fused loss ops for LLM RL and RA3 mid-training, each with a PyTorch reference and native backends.

Every op validates its arguments once here, then runs on the backend that ``registry.resolve`` picks
(``backend="auto"`` or a name of ``registry.BACKENDS``). Outputs are float32 (float64 when
inputs are float64), whatever the input dtype.
"""
from ra3.ops.group_advantages import group_advantages
from ra3.ops.kl import kl
from ra3.ops.linear_policy_loss import LinearPolicyLoss, linear_policy_loss
from ra3.ops.policy_loss import PolicyLoss, policy_loss
from ra3.ops.registry import available_backends
from ra3.ops.segment_sum import segment_sum
from ra3.ops.vocab_softmax import (SegmentLogProbs, entropy, exact_kl, linear_cross_entropy, linear_entropy,
                                   linear_exact_kl, linear_logprobs, logprobs)

__all__ = [
    "linear_logprobs", "logprobs", "linear_cross_entropy", "SegmentLogProbs", "linear_entropy", "entropy",
    "linear_exact_kl", "exact_kl",
    "kl", "segment_sum", "group_advantages", "policy_loss", "PolicyLoss", "linear_policy_loss", "LinearPolicyLoss",
    "available_backends",
]

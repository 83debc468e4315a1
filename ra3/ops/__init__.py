"""Fused loss ops for LLM RL and RA3 mid-training, each with a PyTorch reference and native backends.

Every op validates its arguments once here, then runs on the backend that ``registry.resolve`` picks
(``backend="auto"`` or an explicit 'torch' | 'cpu' | 'cuda' | 'triton'). Outputs are float32 (float64 when
inputs are float64), whatever the input dtype.
"""
from ra3.ops.cross_entropy import linear_cross_entropy
from ra3.ops.entropy import entropy, linear_entropy
from ra3.ops.exact_kl import exact_kl, linear_exact_kl
from ra3.ops.group_advantages import group_advantages
from ra3.ops.kl import kl
from ra3.ops.logprobs import SegmentLogProbs, linear_logprobs, logprobs
from ra3.ops.policy_loss import PolicyLoss, policy_loss
from ra3.ops.registry import available_backends
from ra3.ops.segment_sum import segment_sum

__all__ = [
    "linear_logprobs", "logprobs", "linear_cross_entropy", "SegmentLogProbs", "linear_entropy", "entropy", "linear_exact_kl", "exact_kl",
    "kl", "segment_sum", "group_advantages", "policy_loss", "PolicyLoss", "available_backends",
]

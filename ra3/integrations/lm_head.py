"""Per-token log-probs and entropy of an LM head's output, with no [N, V] logits in memory.

The head's logits are ``f = softcap(scale * (hidden @ weight.T + bias)) / temperature`` where
``softcap(x) = cap * tanh(x / cap)`` (Gemma 2/3's final-logit soft-capping; identity when ``cap`` is None): the
logit transform ``ra3.ops.linear_logprobs`` / ``linear_entropy`` take as arguments.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ra3 import ops


class HeadLogProbs(NamedTuple):
    logprobs: Tensor  # [N] float32 (float64 for float64 input): log p(targets[i])
    entropy: Optional[Tensor]  # [N] same dtype, or None when not asked for


def head_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                  scale: float = 1.0, softcap: Optional[float] = None, temperature: float = 1.0,
                  with_entropy: bool = False, backend: str = "auto") -> HeadLogProbs:
    """Log-probs of ``targets`` (and the entropy) under ``softcap(scale * (hidden @ weight.T + bias)) / T``.

    hidden: [N, H] fp32|bf16|fp16|fp64; weight: [V, H]; bias: [V] | None; targets: [N] int64, all valid
    (drop ignored positions before the call). scale > 0, softcap > 0 or None, temperature > 0 (checked by
    the ops, with errors that name them).
    Gradients flow to hidden, weight and bias.
    """
    # The head is computed in float32 (float64 for float64 input) whatever autocast says: under an enclosing
    # autocast (TRL and accelerate enable bf16 autocast, on CPU too) the tile GEMMs would otherwise run in
    # bfloat16 and lose the precision the fused path exists to keep.
    with torch.autocast(hidden.device.type, enabled=False):
        head = dict(bias=bias, temperature=temperature, scale=scale, softcap=softcap, backend=backend)
        lp = ops.linear_logprobs(hidden, weight, targets, **head)
        return HeadLogProbs(lp, ops.linear_entropy(hidden, weight, **head) if with_entropy else None)

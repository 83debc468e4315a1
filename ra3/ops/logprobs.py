"""Per-token (and per-segment) log-probabilities of given targets: from logits, or fused with the lm_head GEMM."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ra3.ops import _validate as check
from ra3.ops import reference
from ra3.ops._vocab_chunks import LOGPROB
from ra3.ops._vocab_inputs import linear_inputs, logits_input, run, targets_input
from ra3.ops.segment_sum import segment_sum


class SegmentLogProbs(NamedTuple):
    token_logprobs: torch.Tensor  # [N] float32 (float64 for float64 input), 0 where ignored
    segment_logprobs: torch.Tensor  # [num_segments], the sums of token_logprobs per segment id


def _with_segments(token_lp, segment_ids, num_segments, backend):
    if segment_ids is None:
        if num_segments is not None:
            raise ValueError("num_segments is given but segment_ids is None; pass both or neither")
        return token_lp
    if num_segments is None:
        raise ValueError("segment_ids is given but num_segments is None; pass the number of segments")
    return SegmentLogProbs(token_lp, segment_sum(token_lp, segment_ids, num_segments, backend=backend))


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature: float = 1.0, ignore_index: int = -100,
                    segment_ids=None, num_segments=None, backend: str = "auto"):
    """log softmax(hidden @ weight.T + bias) / temperature)[i, targets[i]] without materialising the logits.

    hidden: [N, H] fp32|bf16|fp16; weight: [V, H]; bias: [V] | None; targets: [N] int, ignore_index -> 0.
    segment_ids: [N] int (negative = no segment) with num_segments: also return per-segment sums.
    Returns [N] float32 (float64 for float64 input), or SegmentLogProbs(token_logprobs, segment_logprobs).
    Gradients flow to hidden, weight and bias.
    """
    n, vocab = linear_inputs("", hidden, weight, bias)
    temperature = check.positive_float("temperature", temperature)
    tgt = targets_input(targets, n, vocab, ignore_index, hidden.device)
    out = run("logprobs", LOGPROB, backend, hidden.device, hidden, weight, bias, None, None, None, tgt, temperature,
              lambda: reference.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                                ignore_index=ignore_index))
    return _with_segments(out, segment_ids, num_segments, backend)


def logprobs(logits, targets, *, temperature: float = 1.0, ignore_index: int = -100, segment_ids=None,
             num_segments=None, backend: str = "auto"):
    """log softmax(logits / temperature)[i, targets[i]] per row, for trainers that already hold logits.

    logits: [N, V] fp32|bf16|fp16; targets: [N] int. Returns as ``linear_logprobs``; gradients flow to logits.
    """
    n, vocab = logits_input("logits", logits)
    temperature = check.positive_float("temperature", temperature)
    tgt = targets_input(targets, n, vocab, ignore_index, logits.device)
    out = run("logprobs", LOGPROB, backend, logits.device, logits, None, None, None, None, None, tgt, temperature,
              lambda: reference.logprobs(logits, targets, temperature=temperature, ignore_index=ignore_index))
    return _with_segments(out, segment_ids, num_segments, backend)

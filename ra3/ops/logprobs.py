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


def _segment_args(segment_ids, num_segments, n: int, device) -> int | None:
    """Checks the optional segment arguments before any work is done; returns num_segments as an int (or None)."""
    if segment_ids is None:
        if num_segments is not None:
            raise ValueError("num_segments is given but segment_ids is None; pass both or neither")
        return None
    if num_segments is None:
        raise ValueError("segment_ids is given but num_segments is None; pass the number of segments")
    num_segments = check.integer("num_segments", num_segments, minimum=0, maximum=check.MAX_OUTPUT_ELEMENTS)
    check.segment_ids("segment_ids", segment_ids, n, num_segments)
    if segment_ids.device != device:
        raise ValueError(f"segment_ids is on {segment_ids.device} but the inputs are on {device}")
    return num_segments


def _with_segments(token_lp, segment_ids, num_segments, backend):
    if segment_ids is None:
        return token_lp
    return SegmentLogProbs(token_lp, segment_sum(token_lp, segment_ids, num_segments, backend=backend))


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature: float = 1.0, ignore_index: int = -100,
                    segment_ids=None, num_segments=None, backend: str = "auto"):
    """log softmax(hidden @ weight.T + bias) / temperature)[i, targets[i]] without materialising the logits.

    hidden: [N, H] fp32|bf16|fp16; weight: [V, H]; bias: [V] | None; targets: [N] int, ignore_index -> 0.
    segment_ids: [N] int (negative = no segment) with num_segments: also return per-segment sums.
    Returns [N] float32 (float64 for float64 input), or SegmentLogProbs(token_logprobs, segment_logprobs).
    Gradients flow to hidden, weight and bias.
    Edges: inputs are not scanned for NaN (a pass over the data): NaN or inf in hidden, weight or bias gives NaN
    (or -inf) in the rows it reaches, without an error; ignored rows are 0 whatever they hold; N = 0 gives [0].
    """
    n, vocab = linear_inputs("", hidden, weight, bias)
    temperature = check.temperature(temperature, check.compute_dtype(hidden, weight, bias))
    ignore_index = check.integer("ignore_index", ignore_index)
    tgt = targets_input(targets, n, vocab, ignore_index, hidden.device)
    num_segments = _segment_args(segment_ids, num_segments, n, hidden.device)
    out = run("logprobs", LOGPROB, backend, hidden.device, hidden, weight, bias, None, None, None, tgt, temperature,
              lambda: reference.linear_logprobs(hidden, weight, tgt, bias=bias, temperature=temperature,
                                                ignore_index=-1))
    return _with_segments(out, segment_ids, num_segments, backend)


def logprobs(logits, targets, *, temperature: float = 1.0, ignore_index: int = -100, segment_ids=None,
             num_segments=None, backend: str = "auto"):
    """log softmax(logits / temperature)[i, targets[i]] per row, for trainers that already hold logits.

    logits: [N, V] fp32|bf16|fp16; targets: [N] int. Returns as ``linear_logprobs``; gradients flow to logits.
    Edges: a -inf logit is a token of probability 0 (a -inf target gives -inf); NaN or +inf logits, or a row all
    -inf, give NaN in that row, without an error (not scanned for); ignored rows are 0 whatever they hold; N = 0
    gives [0].
    """
    n, vocab = logits_input("logits", logits)
    temperature = check.temperature(temperature, check.compute_dtype(logits))
    ignore_index = check.integer("ignore_index", ignore_index)
    tgt = targets_input(targets, n, vocab, ignore_index, logits.device)
    num_segments = _segment_args(segment_ids, num_segments, n, logits.device)
    out = run("logprobs", LOGPROB, backend, logits.device, logits, None, None, None, None, None, tgt, temperature,
              lambda: reference.logprobs(logits, tgt, temperature=temperature, ignore_index=-1))
    return _with_segments(out, segment_ids, num_segments, backend)

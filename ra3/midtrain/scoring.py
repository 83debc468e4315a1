"""Every log-probability RA3 needs from one forward pass, through the fused ``ra3.ops``.

- expert lines: ``ops.linear_logprobs(hidden, lm_head.weight, targets, segment_ids=line ids)``, full vocabulary;
- the act/think decision q(z_t): a two-way softmax over the "\\n" and "\\n#" logits (``linear_logprobs`` on
  those two rows of lm_head);
- comment tokens: a softmax over the comment vocabulary (no newline inside a comment, the closing "\\n" as the
  only way out), i.e. ``linear_logprobs`` / ``linear_entropy`` on those rows of lm_head.
Per-boundary sums go through ``ops.segment_sum``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ra3 import ops
from ra3.data.sequences import DecisionTokens
from ra3.midtrain.batch import PackedBatch


def output_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] | None) of the model's lm_head."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def hidden_states(model, batch: PackedBatch) -> torch.Tensor:
    """Final (normed) hidden states feeding lm_head, shifted: [B * (T - 1), H] rows, row p predicting p + 1."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and decoder is not model:
        h = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    else:  # models without a separate decoder: ask for the hidden states, compute one logit only
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True,
                    use_cache=False, logits_to_keep=1)
        h = out.hidden_states[-1]
    return h[:, :-1].reshape(-1, h.shape[-1])


class HeadRows:
    """The lm_head restricted to the decision tokens and to the comment vocabulary (index maps precomputed)."""

    def __init__(self, tokens: DecisionTokens, vocab_size: int, device):
        self.decision_ids = torch.tensor([tokens.act_id, tokens.think_id], device=device)
        self.comment_ids = torch.tensor(tokens.comment_ids, device=device)
        self.comment_index = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
        self.comment_index[self.comment_ids] = torch.arange(len(tokens.comment_ids), device=device)
        self.comment_vocab_size = len(tokens.comment_ids)

    @staticmethod
    def _rows(weight, bias, ids):
        return weight.index_select(0, ids), (None if bias is None else bias.index_select(0, ids))

    def decision_logprobs(self, hidden, weight, bias, think, *, temperature, backend) -> torch.Tensor:
        """log q(decision) per row: hidden [N, H], think [N] bool (the decision taken). Returns [N] float32."""
        w, b = self._rows(weight, bias, self.decision_ids)
        return ops.linear_logprobs(hidden, w, think.long(), bias=b, temperature=temperature, backend=backend)

    def comment_logprobs(self, hidden, weight, bias, targets, *, temperature, backend) -> torch.Tensor:
        """log q(comment token) per row over the comment vocabulary: hidden [N, H], targets [N] vocab ids."""
        w, b = self._rows(weight, bias, self.comment_ids)
        local = self.comment_index[targets]
        if bool((local < 0).any()):
            raise ValueError("a comment token is outside the comment vocabulary (newline or special token)")
        return ops.linear_logprobs(hidden, w, local, bias=b, temperature=temperature, backend=backend)

    def comment_entropy(self, hidden, weight, bias, *, temperature, backend) -> torch.Tensor:
        w, b = self._rows(weight, bias, self.comment_ids)
        return ops.linear_entropy(hidden, w, bias=b, temperature=temperature, backend=backend)


def policy_logprobs(hidden, weight, bias, batch: PackedBatch, head: HeadRows, *, temperature: float,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log q of every policy token (decisions and sampled comment tokens), laid out per rollout.

    Returns (logprobs [B, P] float32, mask [B, P] bool, boundary [B, P] int64 global boundary index b * A + t),
    P = the most policy tokens of any rollout; differentiable w.r.t. hidden / weight.
    """
    rows = torch.cat([batch.decision_rows, batch.comment_rows])
    bound = torch.cat([batch.decision_boundary, batch.comment_boundary])
    lp = torch.cat([
        head.decision_logprobs(hidden[batch.decision_rows], weight, bias, batch.decision_think,
                               temperature=temperature, backend=backend),
        head.comment_logprobs(hidden[batch.comment_rows], weight, bias, batch.targets[batch.comment_rows],
                              temperature=temperature, backend=backend)])
    order = torch.argsort(rows)  # sequence order
    rows, bound, lp = rows[order], bound[order], lp[order]
    T1 = hidden.shape[0] // batch.size
    seq = rows // T1
    counts = torch.bincount(seq, minlength=batch.size)
    P = max(int(counts.max()), 1) if len(rows) else 1
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(rows), device=rows.device) - starts[seq]
    out = lp.new_zeros(batch.size, P)
    out = out.index_put((seq, slot), lp)
    mask = torch.zeros(batch.size, P, dtype=torch.bool, device=rows.device)
    mask[seq, slot] = True
    boundary = torch.full((batch.size, P), -1, dtype=torch.long, device=rows.device)
    boundary[seq, slot] = bound
    return out, mask, boundary


@dataclass
class RolloutScores:
    """Per-boundary terms of each rollout, [B, A] float32 (0 outside a document's actions) unless noted.

    line_logprobs: log pi(a_t | s_t, z_<=t) of the expert action. decision_logq: log q of the decision taken;
    think_logq: log q(think). comment_logq / comment_entropy: summed over the comment's sampled tokens.
    comment_sampled: how many comment tokens were sampled (the forced closing newline is not). thinks,
    truncated, valid: bool. comment_len: content tokens of each comment (int64).
    """
    line_logprobs: torch.Tensor
    decision_logq: torch.Tensor
    think_logq: torch.Tensor
    comment_logq: torch.Tensor
    comment_entropy: torch.Tensor
    comment_sampled: torch.Tensor
    thinks: torch.Tensor
    truncated: torch.Tensor
    valid: torch.Tensor
    comment_len: torch.Tensor


@torch.no_grad()
def score_rollouts(model, batch: PackedBatch, head: HeadRows, *, temperature: float = 1.0,
                   backend: str = "auto", hidden: torch.Tensor | None = None) -> RolloutScores:
    """All per-boundary terms of the rollouts in ``batch`` from one forward pass (no gradients)."""
    weight, bias = output_head(model)
    h = hidden_states(model, batch) if hidden is None else hidden
    B, A = batch.size, batch.max_actions
    n = B * A
    line = ops.linear_logprobs(h[batch.code_rows], weight, batch.targets[batch.code_rows], bias=bias,
                               segment_ids=batch.code_lines, num_segments=n, backend=backend).segment_logprobs
    dec_h = h[batch.decision_rows]
    dec_taken = head.decision_logprobs(dec_h, weight, bias, batch.decision_think, temperature=temperature,
                                       backend=backend)
    dec_think = head.decision_logprobs(dec_h, weight, bias, torch.ones_like(batch.decision_think),
                                       temperature=temperature, backend=backend)
    com_h = h[batch.comment_rows]
    com_lp = head.comment_logprobs(com_h, weight, bias, batch.targets[batch.comment_rows], temperature=temperature,
                                   backend=backend)
    com_ent = head.comment_entropy(com_h, weight, bias, temperature=temperature, backend=backend)

    def per_boundary(values, boundary):
        return ops.segment_sum(values, boundary, n, backend=backend).view(B, A)

    return RolloutScores(
        line_logprobs=line.view(B, A),
        decision_logq=per_boundary(dec_taken, batch.decision_boundary),
        think_logq=per_boundary(dec_think, batch.decision_boundary),
        comment_logq=per_boundary(com_lp, batch.comment_boundary),
        comment_entropy=per_boundary(com_ent, batch.comment_boundary),
        comment_sampled=per_boundary(torch.ones_like(com_lp), batch.comment_boundary),
        thinks=batch.thinks, truncated=batch.truncated, valid=batch.valid, comment_len=batch.comment_len)

"""Pad (annotated) sequences into one batch and index the token positions each RA3 term needs.

Position p of the model's output predicts token p + 1, so every per-token array here is already shifted:
``targets[b, p] = input_ids[b, p + 1]`` and ``target_kinds[b, p]`` is that token's kind. Flat indices point
into the ``[B * (T - 1)]`` rows of the shifted hidden states.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ra3.data.sequences import KIND_ACT, KIND_CODE, KIND_COMMENT, KIND_THINK, Sequence

PAD_KIND = -1


@dataclass
class PackedBatch:
    """B sequences padded to T tokens, with the flat row indices of each kind of target.

    input_ids, attention_mask: [B, T] int64. targets: [B*(T-1)] int64 (the token each row predicts).
    code_rows / code_lines: rows predicting expert-code tokens and their global line index b * A + t.
    decision_rows / decision_think / decision_boundary: rows predicting an act/think token, whether it is
    think, and its global boundary index b * A + t. comment_rows / comment_boundary: rows predicting a
    *sampled* comment token (forced closing newlines excluded), and its global boundary index.
    sep_rows: rows predicting any non-code token after BOS (decisions and all comment tokens).
    thinks, comment_len, truncated, valid: [B, A] per-boundary facts (A = max actions in the batch).
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    code_rows: torch.Tensor
    code_lines: torch.Tensor
    decision_rows: torch.Tensor
    decision_think: torch.Tensor
    decision_boundary: torch.Tensor
    comment_rows: torch.Tensor
    comment_boundary: torch.Tensor
    sep_rows: torch.Tensor
    thinks: torch.Tensor
    comment_len: torch.Tensor
    truncated: torch.Tensor
    valid: torch.Tensor
    num_actions: torch.Tensor

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def max_actions(self) -> int:
        return self.valid.shape[1]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def pack(seqs: list[Sequence], pad_id: int, max_rationale_tokens: int, device="cpu") -> PackedBatch:
    """Right-pad ``seqs`` and index their targets. A comment of ``max_rationale_tokens`` content tokens had its
    closing newline forced (not sampled), so that newline is left out of the policy's tokens."""
    if not seqs:
        raise ValueError("seqs is empty")
    B = len(seqs)
    T = max(len(s) for s in seqs)
    A = max(s.num_actions for s in seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    kinds = torch.full((B, T), PAD_KIND, dtype=torch.long)
    lines = torch.full((B, T), -1, dtype=torch.long)
    bounds = torch.full((B, T), -1, dtype=torch.long)
    thinks = torch.zeros((B, A), dtype=torch.bool)
    comment_len = torch.zeros((B, A), dtype=torch.long)
    valid = torch.zeros((B, A), dtype=torch.bool)
    for b, s in enumerate(seqs):
        n = len(s)
        ids[b, :n] = torch.tensor(s.input_ids)
        mask[b, :n] = 1
        kinds[b, :n] = torch.tensor(s.kinds)
        lines[b, :n] = torch.tensor(s.line_ids)
        bounds[b, :n] = torch.tensor(s.boundary_ids)
        valid[b, :s.num_actions] = True
    kinds_t = kinds[:, 1:]
    offset = (torch.arange(B) * A)[:, None]
    is_comment = kinds_t == KIND_COMMENT
    # comment content length per boundary (the closing newline is the last comment token)
    for b, s in enumerate(seqs):
        if s.thinks:
            thinks[b, s.thinks] = True
    comment_counts = torch.zeros(B * A, dtype=torch.long)
    flat_bound = (bounds[:, 1:] + offset).reshape(-1)
    comment_counts.index_add_(0, flat_bound[is_comment.reshape(-1)],
                              torch.ones(int(is_comment.sum()), dtype=torch.long))
    comment_len = (comment_counts.view(B, A) - 1).clamp(min=0) * thinks
    truncated = thinks & (comment_len >= max_rationale_tokens)
    # the forced closing newline: the last comment token of a truncated comment
    is_last_comment = is_comment & ~torch.cat([is_comment[:, 1:], torch.zeros(B, 1, dtype=torch.bool)], 1)
    forced = is_last_comment & truncated.view(-1)[flat_bound.clamp(min=0)].view(B, T - 1)
    sampled_comment = is_comment & ~forced
    is_decision = (kinds_t == KIND_ACT) | (kinds_t == KIND_THINK)
    is_code = kinds_t == KIND_CODE
    flat = lambda m: m.reshape(-1).nonzero().squeeze(1)  # noqa: E731
    flat_lines = (lines[:, 1:] + offset).reshape(-1)
    code_rows, decision_rows, comment_rows = flat(is_code), flat(is_decision), flat(sampled_comment)
    return PackedBatch(
        input_ids=ids.to(device), attention_mask=mask.to(device), targets=ids[:, 1:].reshape(-1).to(device),
        code_rows=code_rows.to(device), code_lines=flat_lines[code_rows].to(device),
        decision_rows=decision_rows.to(device),
        decision_think=(kinds_t.reshape(-1)[decision_rows] == KIND_THINK).to(device),
        decision_boundary=flat_bound[decision_rows].to(device),
        comment_rows=comment_rows.to(device), comment_boundary=flat_bound[comment_rows].to(device),
        sep_rows=flat(is_decision | is_comment).to(device), thinks=thinks.to(device),
        comment_len=comment_len.to(device), truncated=truncated.to(device), valid=valid.to(device),
        num_actions=torch.tensor([s.num_actions for s in seqs], device=device))

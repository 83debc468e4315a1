"""Pad (annotated) sequences into one batch and index the token positions each RA3 term needs.

Position p of the model's output predicts token p + 1, so every per-token array here is already shifted:
``targets[b, p] = input_ids[b, p + 1]``. Flat indices point into the ``[B * (T - 1)]`` rows of the shifted
hidden states; a global line or boundary index is ``b * A + t`` (A = most actions of any sequence).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ra3.data.sequences import KIND_CODE, KIND_COMMENT, KIND_SPECIAL, Sequence


@dataclass
class PackedBatch:
    """B sequences padded to T tokens, with the flat row indices of each kind of target.

    input_ids, attention_mask: [B, T] int64. targets: [B*(T-1)] int64 (the token each row predicts).
    code_rows / code_lines: rows predicting expert-code tokens and their global line index.
    decision_rows / decision_think / decision_boundary / decision_set: one row per decision point (predicting
    the token where the comment and expert paths part ways), whether the rollout thought, its global boundary
    index and its decision-set id (``CommentVocab.sets``). decision_code: for an act, the index into code_rows
    of the same row (that token is expert code), else -1.
    comment_rows / comment_boundary: rows predicting a *sampled* comment token (the think token itself and forced
    tokens excluded), and the global boundary index. token_rows: rows predicting any non-special token.
    thinks, truncated, empty, valid, decision_valid: [B, A] bool per action; comment_len: [B, A] sampled comment
    tokens.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    code_rows: torch.Tensor
    code_lines: torch.Tensor
    decision_rows: torch.Tensor
    decision_think: torch.Tensor
    decision_boundary: torch.Tensor
    decision_set: torch.Tensor
    decision_code: torch.Tensor
    comment_rows: torch.Tensor
    comment_boundary: torch.Tensor
    token_rows: torch.Tensor
    thinks: torch.Tensor
    comment_len: torch.Tensor
    truncated: torch.Tensor
    empty: torch.Tensor
    valid: torch.Tensor
    decision_valid: torch.Tensor
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


def pack(seqs: list[Sequence], pad_id: int, device="cpu") -> PackedBatch:
    """Right-pad ``seqs`` and index their targets."""
    if not seqs:
        raise ValueError("seqs is empty")
    B = len(seqs)
    T = max(len(s) for s in seqs)
    A = max(s.num_actions for s in seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    kinds = torch.full((B, T), KIND_SPECIAL, dtype=torch.long)
    lines = torch.full((B, T), -1, dtype=torch.long)
    bounds = torch.full((B, T), -1, dtype=torch.long)
    forced = torch.zeros((B, T), dtype=torch.bool)
    thinks = torch.zeros((B, A), dtype=torch.bool)
    trunc = torch.zeros((B, A), dtype=torch.bool)
    empty = torch.zeros((B, A), dtype=torch.bool)
    valid = torch.zeros((B, A), dtype=torch.bool)
    decision_valid = torch.zeros((B, A), dtype=torch.bool)
    dec_rows, dec_think, dec_bound, dec_set = [], [], [], []
    for b, s in enumerate(seqs):
        n = len(s)
        ids[b, :n] = torch.tensor(s.input_ids)
        mask[b, :n] = 1
        kinds[b, :n] = torch.tensor(s.kinds)
        lines[b, :n] = torch.tensor(s.line_ids)
        bounds[b, :n] = torch.tensor(s.boundary_ids)
        forced[b, s.forced] = True
        valid[b, :s.num_actions] = True
        thinks[b, s.thinks] = True
        trunc[b, s.truncated] = True
        empty[b, s.empty] = True
        for d in s.decisions:
            decision_valid[b, d.action] = True
            dec_rows.append(b * (T - 1) + d.position - 1)
            dec_think.append(d.think)
            dec_bound.append(b * A + d.action)
            dec_set.append(d.set_id)
    kinds_t, forced_t = kinds[:, 1:], forced[:, 1:]
    offset = (torch.arange(B) * A)[:, None]
    flat = lambda m: m.reshape(-1).nonzero().squeeze(1)  # noqa: E731
    flat_lines = (lines[:, 1:] + offset).reshape(-1)
    flat_bound = (bounds[:, 1:] + offset).reshape(-1)
    is_code = (kinds_t == KIND_CODE) & (mask[:, 1:] > 0)
    is_comment = (kinds_t == KIND_COMMENT) & ~forced_t
    code_rows, comment_rows = flat(is_code), flat(is_comment)
    decision_rows = torch.tensor(dec_rows, dtype=torch.long)
    decision_think = torch.tensor(dec_think, dtype=torch.bool)
    # an act's token at the decision position is expert code: where it sits among the code rows
    code_index = torch.full((B * (T - 1),), -1, dtype=torch.long)
    code_index[code_rows] = torch.arange(len(code_rows))
    decision_code = torch.where(decision_think, torch.full_like(decision_rows, -1), code_index[decision_rows]) \
        if len(decision_rows) else decision_rows
    comment_bound = flat_bound[comment_rows]
    comment_len = torch.bincount(comment_bound, minlength=B * A).view(B, A) if len(comment_rows) else \
        torch.zeros(B, A, dtype=torch.long)
    to = lambda t: t.to(device)  # noqa: E731
    return PackedBatch(
        input_ids=to(ids), attention_mask=to(mask), targets=to(ids[:, 1:].reshape(-1)),
        code_rows=to(code_rows), code_lines=to(flat_lines[code_rows]),
        decision_rows=to(decision_rows), decision_think=to(decision_think),
        decision_boundary=to(torch.tensor(dec_bound, dtype=torch.long)),
        decision_set=to(torch.tensor(dec_set, dtype=torch.long)), decision_code=to(decision_code),
        comment_rows=to(comment_rows), comment_boundary=to(comment_bound),
        token_rows=to(flat((kinds_t != KIND_SPECIAL) & (mask[:, 1:] > 0))), thinks=to(thinks),
        comment_len=to(comment_len), truncated=to(trunc), empty=to(empty), valid=to(valid), decision_valid=to(decision_valid),
        num_actions=to(torch.tensor([s.num_actions for s in seqs])))

"""Every log-probability RA3 needs from one forward pass, through the fused ``ra3.ops``.

- expert lines: ``ops.linear_logprobs(hidden, lm_head.weight, targets, segment_ids=line ids)``, the full
  vocabulary; at an act the token where the paths part ways is expert code, and its probability given the act
  is p(token) / q(act), so log q(act) is taken off its line;
- the think decision q(think at t): the summed probability of the decision set (the tokens that begin the
  comment line, ``CommentVocab.decision_set``) at the position where the paths part ways. It is computed as
  log p(token there) (fused, full vocabulary) + logsumexp over the set of the logit differences to that token,
  so only the set's rows of lm_head are multiplied; q(act) = 1 - q(think);
- comment tokens: the model's own distribution with special and added tokens masked out (as they are sampled),
  ``ops.linear_logprobs`` / ``ops.linear_entropy`` with a masking bias.
Per-boundary sums go through ``ops.segment_sum``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ra3 import ops
from ra3.data.sequences import CommentVocab
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


def log_not(log_q: torch.Tensor) -> torch.Tensor:
    """log(1 - q) from log q (q < 1), stable near both ends."""
    return torch.log(-torch.expm1(log_q.clamp(max=-1e-7)))


class PolicyHead:
    """The lm_head seen as the E-step's policy: decision sets and the comment vocabulary's masking bias.

    vocab: the tokenizer's CommentVocab (its sets grow as new decision points are seen); device: lm_head's."""

    def __init__(self, vocab: CommentVocab, device):
        self.vocab = vocab
        self.device = device
        self._set_ids: dict[int, torch.Tensor] = {}
        excluded = torch.zeros(vocab.vocab_size, dtype=torch.bool)
        excluded[sorted(vocab.excluded)] = True
        self.excluded = excluded.to(device)
        self.comment_vocab_size = vocab.vocab_size - len(vocab.excluded)

    def set_ids(self, set_id: int) -> torch.Tensor:
        if set_id not in self._set_ids:
            self._set_ids[set_id] = torch.tensor(self.vocab.sets[set_id], dtype=torch.long, device=self.device)
        return self._set_ids[set_id]

    def comment_bias(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """[V] bias that masks every special / added token out of the softmax (finite, so entropies stay finite
        at any temperature)."""
        big = -6e4 if weight.dtype == torch.float16 else -1e9
        mask = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        mask = mask.masked_fill(self.excluded[:weight.shape[0]], big)
        return mask if bias is None else bias + mask

    def think_logq(self, hidden, weight, bias, targets, set_ids, *, temperature, backend) -> torch.Tensor:
        """log q(think) per decision row: hidden [n, H] (the row before the decision position), targets [n] (the
        token there), set_ids [n] (decision-set ids). Returns [n] float32, differentiable."""
        lp = ops.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, backend=backend)
        rel = torch.zeros_like(lp)
        for sid in torch.unique(set_ids).tolist():
            rows = (set_ids == sid).nonzero().squeeze(1)
            ids = self.set_ids(sid)
            h = hidden[rows]
            z = h @ weight[ids].T
            zt = (h * weight[targets[rows]]).sum(-1)
            if bias is not None:
                z, zt = z + bias[ids], zt + bias[targets[rows]]
            z, zt = z.to(lp.dtype), zt.to(lp.dtype)  # float32 (float64 for float64 input), as lp
            rel = rel.index_copy(0, rows, torch.logsumexp((z - zt[:, None]) / temperature, dim=1))
        return (lp + rel).clamp(max=0.0)

    def decisions(self, hidden, weight, bias, batch: PackedBatch, *, temperature, backend):
        """(log q of the decision taken, log q(think)) per decision row of ``batch``, each [n] float32."""
        rows = batch.decision_rows
        if len(rows) == 0:
            empty = hidden.new_zeros(0, dtype=torch.float32)
            return empty, empty
        lq_think = self.think_logq(hidden[rows], weight, bias, batch.targets[rows], batch.decision_set,
                                   temperature=temperature, backend=backend)
        return torch.where(batch.decision_think, lq_think, log_not(lq_think)), lq_think

    def comment_logprobs(self, hidden, weight, bias, targets, *, temperature, backend) -> torch.Tensor:
        """log q(comment token) per row (special / added tokens masked out): hidden [N, H], targets [N]."""
        return ops.linear_logprobs(hidden, weight, targets, bias=self.comment_bias(weight, bias),
                                   temperature=temperature, backend=backend)

    def comment_entropy(self, hidden, weight, bias, *, temperature, backend) -> torch.Tensor:
        return ops.linear_entropy(hidden, weight, bias=self.comment_bias(weight, bias), temperature=temperature,
                                  backend=backend)


def policy_logprobs(hidden, weight, bias, batch: PackedBatch, head: PolicyHead, *, temperature: float,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log q of every policy token (decisions and sampled comment tokens, never expert code or forced tokens),
    laid out per rollout.

    Returns (logprobs [B, P] float32, mask [B, P] bool, boundary [B, P] int64 global boundary index b * A + t),
    P = the most policy tokens of any rollout; differentiable w.r.t. hidden / weight.
    """
    rows = torch.cat([batch.decision_rows, batch.comment_rows])
    bound = torch.cat([batch.decision_boundary, batch.comment_boundary])
    taken, _ = head.decisions(hidden, weight, bias, batch, temperature=temperature, backend=backend)
    lp = torch.cat([taken, head.comment_logprobs(hidden[batch.comment_rows], weight, bias,
                                                 batch.targets[batch.comment_rows], temperature=temperature,
                                                 backend=backend)])
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

    line_logprobs: log pi(a_t | s_t, z_<=t) of the expert action (given the decision taken). decision_logq:
    log q of the decision taken; think_logq: log q(think) (both 0 where t is no decision point).
    comment_logq / comment_entropy: summed over the comment's sampled tokens. comment_sampled: how many comment
    tokens were sampled. thinks, truncated, empty, valid, decision_valid: bool. comment_len: sampled comment tokens.
    """
    line_logprobs: torch.Tensor
    decision_logq: torch.Tensor
    think_logq: torch.Tensor
    comment_logq: torch.Tensor
    comment_entropy: torch.Tensor
    comment_sampled: torch.Tensor
    thinks: torch.Tensor
    truncated: torch.Tensor
    empty: torch.Tensor
    valid: torch.Tensor
    decision_valid: torch.Tensor
    comment_len: torch.Tensor


@torch.no_grad()
def score_rollouts(model, batch: PackedBatch, head: PolicyHead, *, temperature: float = 1.0,
                   backend: str = "auto", hidden: torch.Tensor | None = None) -> RolloutScores:
    """All per-boundary terms of the rollouts in ``batch`` from one forward pass (no gradients)."""
    weight, bias = output_head(model)
    h = hidden_states(model, batch) if hidden is None else hidden
    B, A = batch.size, batch.max_actions
    n = B * A

    def per_boundary(values, boundary):
        return ops.segment_sum(values.float(), boundary, n, backend=backend).view(B, A)

    line = ops.linear_logprobs(h[batch.code_rows], weight, batch.targets[batch.code_rows], bias=bias,
                               segment_ids=batch.code_lines, num_segments=n, backend=backend).segment_logprobs
    taken, lq_think = head.decisions(h, weight, bias, batch, temperature=temperature, backend=backend)
    # an act's decision token is expert code: its probability given the act is p / q(act) (at temperature 1)
    acts = batch.decision_code >= 0
    if bool(acts.any()):
        _, lq1 = (taken, lq_think) if temperature == 1.0 else \
            head.decisions(h, weight, bias, batch, temperature=1.0, backend=backend)
        line = line - ops.segment_sum(log_not(lq1[acts]), batch.code_lines[batch.decision_code[acts]], n,
                                      backend=backend)
    com_h = h[batch.comment_rows]
    com_lp = head.comment_logprobs(com_h, weight, bias, batch.targets[batch.comment_rows], temperature=temperature,
                                   backend=backend)
    com_ent = head.comment_entropy(com_h, weight, bias, temperature=temperature, backend=backend)
    return RolloutScores(
        line_logprobs=line.view(B, A),
        decision_logq=per_boundary(taken, batch.decision_boundary),
        think_logq=per_boundary(lq_think, batch.decision_boundary),
        comment_logq=per_boundary(com_lp, batch.comment_boundary),
        comment_entropy=per_boundary(com_ent, batch.comment_boundary),
        comment_sampled=per_boundary(torch.ones_like(com_lp), batch.comment_boundary),
        thinks=batch.thinks, truncated=batch.truncated, empty=batch.empty, valid=batch.valid, decision_valid=batch.decision_valid,
        comment_len=batch.comment_len)

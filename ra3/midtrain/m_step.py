"""M-step: next-token prediction on the expert code with the sampled comments inserted (the NTP baseline is the
same step on the code alone), through the fused ``ops.linear_logprobs``; and the held-out NTP loss."""
from __future__ import annotations

import time

import torch

from ra3 import ops
from ra3.data.sequences import Sequence
from ra3.midtrain.batch import PackedBatch, pack
from ra3.midtrain.scoring import hidden_states, output_head


def _rows(batch: PackedBatch, tokens: str) -> torch.Tensor:
    """Rows the loss covers: 'code' (expert tokens only) or 'all' (every token after BOS)."""
    if tokens == "code":
        return batch.code_rows
    return torch.sort(torch.cat([batch.code_rows, batch.sep_rows])).values


def ntp_logprobs(model, batch: PackedBatch, *, tokens: str = "all", backend: str = "auto") -> torch.Tensor:
    """log p(token | prefix) of every covered target token, [N] float32 (differentiable)."""
    weight, bias = output_head(model)
    rows = _rows(batch, tokens)
    h = hidden_states(model, batch)[rows]
    return ops.linear_logprobs(h, weight, batch.targets[rows], bias=bias, backend=backend)


def m_step(model, optimizer, seqs: list[Sequence], *, pad_id: int, max_rationale_tokens: int, tokens: str = "all",
           grad_clip: float = 1.0, backend: str = "auto") -> dict:
    """One NTP update on ``seqs`` (mean negative log-likelihood per covered token). Returns the step's metrics."""
    t0 = time.perf_counter()
    device = output_head(model)[0].device
    batch = pack(seqs, pad_id, max_rationale_tokens, device)
    model.train()
    loss = -ntp_logprobs(model, batch, tokens=tokens, backend=backend).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    model.eval()
    elapsed = time.perf_counter() - t0
    return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "tokens": batch.num_tokens,
            "tokens_per_s": batch.num_tokens / max(elapsed, 1e-9), "time_s": elapsed}


@torch.no_grad()
def heldout_ntp_loss(model, seqs: list[Sequence], *, pad_id: int, batch_size: int = 64,
                     backend: str = "auto") -> float:
    """Mean NLL per token (nats) of plain documents (every token after BOS), the same for RA3 and NTP models."""
    if not seqs:
        return float("nan")
    device = output_head(model)[0].device
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        batch = pack(seqs[start:start + batch_size], pad_id, 0, device)
        lp = ntp_logprobs(model, batch, tokens="all", backend=backend)
        total -= float(lp.double().sum())
        count += lp.numel()
    return total / max(count, 1)

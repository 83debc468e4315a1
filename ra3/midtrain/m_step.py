"""M-step: next-token prediction on the expert code with the sampled comments inserted (the NTP baseline is the
same step on the code alone), through the fused ``ops.linear_cross_entropy`` (its gradients formed in the forward
pass: 3 GEMMs over the vocabulary, not 4); and the held-out NTP loss.

Under ddp / fsdp each rank trains on its share of the batch; the gradients and the reported loss are those of
the mean over every rank's tokens (what one process on the whole batch computes)."""
from __future__ import annotations

import time

import torch

from ra3 import distributed as ranks
from ra3 import ops
from ra3.data.sequences import Sequence
from ra3.midtrain.batch import PackedBatch, pack
from ra3.midtrain.scoring import hidden_states, output_head


def _rows(batch: PackedBatch, tokens: str) -> torch.Tensor:
    """Rows the loss covers: 'code' (expert-code tokens, their line breaks included), 'code-only' (those, less the
    decision positions: a line's first token, whose probability holds the model's choice not to comment) or 'all'
    (every token but the special ones)."""
    if tokens == "all":
        return batch.token_rows
    if tokens == "code-only":
        keep = torch.ones_like(batch.code_rows, dtype=torch.bool)
        keep[batch.decision_code[batch.decision_code >= 0]] = False
        return batch.code_rows[keep]
    return batch.code_rows


def ntp_loss(model, batch: PackedBatch, *, tokens: str = "all", reduction: str = "mean",
             backend: str = "auto") -> tuple[torch.Tensor, int]:
    """(the mean or summed NLL of every covered target token, a float32 scalar (differentiable); their count)."""
    weight, bias = output_head(model)
    rows = _rows(batch, tokens)
    h = hidden_states(model, batch)[rows]
    loss = ops.linear_cross_entropy(h, weight, batch.targets[rows], bias=bias, reduction=reduction, backend=backend)
    return loss, len(rows)


def m_step(model, optimizer, seqs: list[Sequence], *, pad_id: int, tokens: str = "all", grad_clip: float = 1.0,
           backend: str = "auto") -> dict:
    """One NTP update on ``seqs`` (mean negative log-likelihood per covered token; under ddp / fsdp ``seqs`` is
    this rank's share of the batch). Returns the step's metrics, over all ranks."""
    t0 = time.perf_counter()
    device = output_head(ranks.unwrap(model))[0].device
    batch = pack(seqs, pad_id, device)
    model.train()
    loss, count = ranks.forward(model, lambda m: ntp_loss(m, batch, tokens=tokens, backend=backend))
    optimizer.zero_grad(set_to_none=True)
    ranks.scale_for_global_mean(loss, count).backward()
    grad_norm = ranks.clip_grad_norm_(model, grad_clip)
    optimizer.step()
    model.eval()
    elapsed = time.perf_counter() - t0
    m = ranks.reduce_metrics({"loss": float(loss.detach()), "grad_norm": float(grad_norm), "tokens": batch.num_tokens,
                             "code_tokens": len(batch.code_rows), "time_s": elapsed},
                            weights={"loss": count}, sums=("tokens", "code_tokens"),
                            maxes=("time_s",))
    return {"loss": m["loss"], "grad_norm": m["grad_norm"], "tokens": m["tokens"], "code_tokens": m["code_tokens"],
            "tokens_per_s": m["tokens"] / max(m["time_s"], 1e-9), "time_s": m["time_s"]}


@torch.no_grad()
def heldout_loss(model, seqs: list[Sequence], *, pad_id: int, tokens: str = "code-only", batch_size: int = 64,
                 backend: str = "auto") -> float:
    """Mean NLL per token (nats) of ``seqs`` over the rows ``tokens`` names (``_rows``: 'code-only' leaves out
    comments, think tokens and decision positions; 'all' every non-special token). Under ddp / fsdp each rank
    scores its share of ``seqs``; the mean is over all of them."""
    if not seqs:
        return float("nan")
    mine = ranks.shard(seqs)
    total, count = 0.0, 0
    with ranks.full_params(model) as q:
        device = output_head(q)[0].device
        q.eval()
        for start in range(0, len(mine), batch_size):
            batch = pack(mine[start:start + batch_size], pad_id, device)
            nll, n = ntp_loss(q, batch, tokens=tokens, reduction="sum", backend=backend)
            total += float(nll)
            count += n
    return ranks.reduce_metrics({"nll": total / max(count, 1)}, weights={"nll": count})["nll"]

"""Validation and dispatch shared by the softmax-over-vocabulary ops (log-probs, entropy, exact KL)."""
from __future__ import annotations

import torch

from ra3.ops import _validate as check
from ra3.ops import registry, reference
from ra3.ops._vocab_chunks import vocab_softmax_op


def linear_inputs(prefix: str, hidden, weight, bias) -> tuple[int, int]:
    """Checks hidden [N, H], weight [V, H], bias [V] | None; returns (N, V)."""
    check.tensor(f"{prefix}hidden", hidden, ndim=2, floating=True)
    check.tensor(f"{prefix}weight", weight, ndim=2, floating=True)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{prefix}weight must be [V, H] with H = {prefix}hidden.shape[1] = {hidden.shape[1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{prefix}weight must have at least one vocabulary row")
    if bias is not None:
        check.tensor(f"{prefix}bias", bias, ndim=1, floating=True)
        check.shape(f"{prefix}bias", bias, (weight.shape[0],), "one entry per vocabulary row of weight")
    check.same_device(**{f"{prefix}hidden": hidden, f"{prefix}weight": weight, f"{prefix}bias": bias})
    return hidden.shape[0], weight.shape[0]


def logits_input(name: str, logits) -> tuple[int, int]:
    check.tensor(name, logits, ndim=2, floating=True)
    if logits.shape[1] == 0:
        raise ValueError(f"{name} must have at least one vocabulary column")
    return logits.shape


def targets_input(targets, n: int, vocab: int, ignore_index: int, device) -> torch.Tensor:
    """Checks targets [N] and returns them as contiguous int64 with ignored positions set to -1 (so the reference
    is called with these and ``ignore_index=-1``: compared in int64, never in a narrow dtype that wraps -100).

    ``ignore_index`` is expected already checked by ``check.integer`` (a Python int within int64)."""
    check.tensor("targets", targets, ndim=1, floating=False)
    check.shape("targets", targets, (n,), "one target per row")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but the inputs are on {device}")
    check.targets_in_range("targets", targets, vocab, ignore_index)
    targets = targets.long()
    return torch.where(targets == ignore_index, torch.full_like(targets, -1), targets).contiguous()


def run(op: str, mode: int, backend: str, device, hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
        targets, temperature: float, reference_fn):
    """Dispatches to the reference (backend 'torch') or the custom op of the resolved backend; returns [N] in the
    compute dtype."""
    name = registry.resolve(op, backend, device)
    if name == "torch":
        return reference_fn()
    # Logits-input kernels read rows through a stride but need unit stride along the vocabulary.
    if weight is None:
        hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
        if ref_hidden is not None and ref_hidden.stride(1) != 1:
            ref_hidden = ref_hidden.contiguous()
    out, _lse, _lse_r = vocab_softmax_op(name, mode, hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                                         targets, 1.0 / temperature)
    return out


__all__ = ["linear_inputs", "logits_input", "targets_input", "run", "reference"]

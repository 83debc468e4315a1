"""Exact per-token KL(pi || pi_ref) summed over the whole vocabulary: from logits, or fused with the GEMMs."""
from __future__ import annotations

from ra3.ops import _validate as check
from ra3.ops import reference
from ra3.ops._vocab_chunks import EXACT_KL
from ra3.ops._vocab_inputs import linear_inputs, logits_input, run


def linear_exact_kl(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None, temperature: float = 1.0,
                    backend: str = "auto"):
    """KL(softmax(hidden @ weight.T + bias) || softmax(ref_hidden @ ref_weight.T + ref_bias)) per row, at temperature.

    hidden: [N, H]; weight: [V, H]; ref_hidden: [N, H_ref]; ref_weight: [V, H_ref]; biases [V] | None.
    Returns [N] float32 (float64 for float64). Gradients flow to the policy side only; the reference is a constant.
    Edges: inputs are not scanned for NaN: NaN or inf on either side gives NaN (or inf) in the rows it reaches,
    without an error; N = 0 gives [0].
    """
    n, vocab = linear_inputs("", hidden, weight, bias)
    n_ref, vocab_ref = linear_inputs("ref_", ref_hidden, ref_weight, ref_bias)
    if (n_ref, vocab_ref) != (n, vocab):
        raise ValueError(f"ref_hidden/ref_weight describe {n_ref} rows x {vocab_ref} vocabulary entries but "
                         f"hidden/weight describe {n} x {vocab}; they must match")
    check.same_device(hidden=hidden, ref_hidden=ref_hidden)
    temperature = check.temperature(temperature, check.compute_dtype(hidden, weight, bias, ref_hidden, ref_weight,
                                                                     ref_bias))
    return run("exact_kl", EXACT_KL, backend, hidden.device, hidden, weight, bias, ref_hidden.detach(),
               ref_weight.detach(), None if ref_bias is None else ref_bias.detach(), None, temperature,
               lambda: reference.linear_exact_kl(hidden, weight, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias,
                                                 temperature=temperature))


def exact_kl(logits, ref_logits, *, temperature: float = 1.0, backend: str = "auto"):
    """KL(softmax(logits / T) || softmax(ref_logits / T)) per row. logits, ref_logits: [N, V]. Returns [N].

    Edges: an entry whose logit is -inf adds 0, whatever ref_logits holds there; a -inf ref_logit under a finite
    logit gives +inf; NaN or +inf on either side, or a row all -inf, gives NaN in that row, without an error (not
    scanned for); N = 0 gives [0].
    """
    shape = logits_input("logits", logits)
    ref_shape = logits_input("ref_logits", ref_logits)
    if tuple(ref_shape) != tuple(shape):
        raise ValueError(f"ref_logits must have the shape of logits {tuple(shape)}, got {tuple(ref_shape)}")
    check.same_device(logits=logits, ref_logits=ref_logits)
    temperature = check.temperature(temperature, check.compute_dtype(logits, ref_logits))
    return run("exact_kl", EXACT_KL, backend, logits.device, logits, None, None, ref_logits.detach(), None, None,
               None, temperature, lambda: reference.exact_kl(logits, ref_logits, temperature=temperature))

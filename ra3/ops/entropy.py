"""Per-token entropy of the policy over the whole vocabulary: from logits, or fused with the lm_head GEMM."""
from __future__ import annotations

from ra3.ops import _validate as check
from ra3.ops import reference
from ra3.ops._vocab_chunks import ENTROPY
from ra3.ops._vocab_inputs import linear_inputs, logits_input, run


def linear_entropy(hidden, weight, *, bias=None, temperature: float = 1.0, backend: str = "auto"):
    """Entropy (nats) of softmax((hidden @ weight.T + bias) / temperature) per row, logits never materialised.

    hidden: [N, H] fp32|bf16|fp16; weight: [V, H]; bias: [V] | None. Returns [N] float32 (float64 for float64).
    Edges: inputs are not scanned for NaN: NaN or inf in hidden, weight or bias gives NaN in the rows it reaches,
    without an error; N = 0 gives [0].
    """
    linear_inputs("", hidden, weight, bias)
    temperature = check.temperature(temperature, check.compute_dtype(hidden, weight, bias))
    return run("entropy", ENTROPY, backend, hidden.device, hidden, weight, bias, None, None, None, None, temperature,
               lambda: reference.linear_entropy(hidden, weight, bias=bias, temperature=temperature))


def entropy(logits, *, temperature: float = 1.0, backend: str = "auto"):
    """Entropy (nats) of softmax(logits / temperature) per row. logits: [N, V]. Returns [N] float32.

    Edges: -inf logits are entries of probability 0 and add 0; NaN or +inf logits, or a row all -inf, give NaN in
    that row, without an error (not scanned for); N = 0 gives [0].
    """
    logits_input("logits", logits)
    temperature = check.temperature(temperature, check.compute_dtype(logits))
    return run("entropy", ENTROPY, backend, logits.device, logits, None, None, None, None, None, None, temperature,
               lambda: reference.entropy(logits, temperature=temperature))

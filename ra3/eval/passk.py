"""pass@k with the unbiased estimator of Chen et al. (2021), "Evaluating Large Language Models Trained on Code".

For a task with n samples of which c pass, pass@k = 1 - C(n - c, k) / C(n, k): the probability that at least
one of k samples drawn without replacement from the n passes. The product form below never builds the huge
binomials: C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task with ``n`` samples, ``c`` of them correct (0 <= c <= n, 1 <= k <= n)."""
    n, c, k = _count("n", n), _count("c", c), _count("k", k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> float:
    """pass@k averaged over tasks; ``num_samples[i]`` and ``num_correct[i]`` describe task i."""
    if len(num_samples) != len(num_correct):
        raise ValueError(f"num_samples has {len(num_samples)} tasks but num_correct has {len(num_correct)}")
    if not num_samples:
        raise ValueError("num_samples is empty: no tasks to average over")
    return sum(pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct)) / len(num_samples)


def pass_at_ks(num_samples: Sequence[int], num_correct: Sequence[int], ks: Iterable[int]) -> dict[int, float]:
    """{k: mean pass@k} for every k in ``ks`` that every task has enough samples for (k <= min n)."""
    smallest = min(num_samples) if num_samples else 0
    out = {}
    for k in sorted(set(_count("ks", k) for k in ks)):
        if k < 1:
            raise ValueError(f"ks must hold positive ints, got {k}")
        if k <= smallest:
            out[k] = mean_pass_at_k(num_samples, num_correct, k)
    return out

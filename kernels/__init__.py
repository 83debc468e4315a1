"""Triton kernels of ra3's ops, installed as ``ra3.kernels`` (setup.py maps this folder to that package).

One module per op; each holds the ``@triton.jit`` kernels and a launcher that takes torch tensors. The
launchers mirror the C ABI of ``ra3._C`` (csrc/ra3_native.h) argument for argument, with a tensor (or None) in
place of each pointer, so ``ra3.ops._kernels.call`` runs the same call site on every native backend.

Importing this package imports neither torch nor triton; ``launcher(name)`` loads the module that holds ``name``.
Under ``TRITON_INTERPRET=1`` the kernels run in Triton's interpreter on CPU tensors (the CPU test suite).
"""
from __future__ import annotations

import importlib

# Launcher name (the C ABI's, without the cpu_/cuda_ prefix) -> module that implements it.
_MODULES = {
    "vocab_softmax_fwd": "vocab_softmax",
    "vocab_softmax_grad": "vocab_softmax",
    "vocab_softmax_fused_fwd": "vocab_softmax_fused",
    "vocab_softmax_fused_grad": "vocab_softmax_fused",
    "segment_sum_fwd": "segment_sum",
    "segment_sum_bwd": "segment_sum",
    "kl_estimator_fwd": "kl_estimator",
    "kl_estimator_bwd": "kl_estimator",
    "group_adv_fwd": "group_advantages",
    "group_adv_bwd": "group_advantages",
    "policy_loss_fwd": "policy_loss",
}


def launcher(name: str):
    """The Python launcher of the Triton kernel ``name`` (e.g. 'vocab_softmax_fwd')."""
    try:
        module = _MODULES[name]
    except KeyError:
        raise ValueError(f"ra3.kernels has no Triton launcher {name!r}; known: {', '.join(sorted(_MODULES))}") \
            from None
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = ["launcher"]

"""Triton kernels of ra3's ops, installed as ``ra3.kernels`` (setup.py maps this folder to that package).

One module per op; each holds the ``@triton.jit`` kernels and their launchers. A launcher takes one argument,
the kernel's argument NamedTuple from ra3/ops/kernel_abi.py (``segment_sum_fwd(a: SegmentSumFwdArgs)``), which
mirrors the C ABI's struct of that name in csrc/ra3_native.h field for field, with a tensor (or None) in place of
each pointer; so ``ra3.ops.kernel_abi.call(backend, device, args)`` runs the same tuple on every native backend.
The dtype codes and softmax modes come from there too. The Triton-only fused launchers' tuples have no C twin;
they take a keyword-only ``splits`` after the tuple (a tuning knob, not part of the ABI).

Importing this package imports neither torch nor triton; ``launcher(name)`` loads the module that holds ``name``.
Under ``TRITON_INTERPRET=1`` the kernels run in Triton's interpreter on CPU tensors (the CPU test suite).
"""
from __future__ import annotations

import importlib

# Launcher name (the C ABI's, without the cpu_/cuda_ prefix; kernel_abi.kernel_name of its tuple) -> its module.
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

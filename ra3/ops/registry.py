"""The one place that decides which backend runs an op.

Backends:
  torch         the pure-PyTorch reference (``ra3.ops.reference``), any device, autograd does the backward.
  cpu           C++ kernels of ``ra3._C`` on CPU tensors (GEMMs of the fused linear ops go to torch's BLAS).
  cuda          CUDA kernels of ``ra3._C`` on CUDA tensors; the fused linear ops loop over the vocabulary inside the
                extension, calling cuBLAS there (linear_policy_loss: the cuda-torch walk, no extension loop yet).
  cuda-torch    the cuda backend's tile kernels with the vocabulary walked in Python over torch's GEMMs.
  triton        Triton kernels in ``ra3.kernels`` on CUDA tensors (or anywhere under TRITON_INTERPRET=1); the fused
                linear ops walk the vocabulary in Python over torch's GEMMs.
  triton-fused  Triton kernels that do the fused linear ops' GEMMs themselves, no logits tile in global memory.
``cuda-torch`` and ``triton-fused`` are designs of the vocabulary-softmax family (``VOCAB_OPS``; see
``ra3/ops/vocab_softmax_walk.py``); for any other op they run their base backend (``BASE``), which has one design.
``backend="auto"`` takes, for the op and the tensor's device type, the first available backend of the order the
recorded benchmarks measured (``auto_order.json``), then of the static ``AUTO_ORDER``, skipping those that lack a
feature the call needs (``FEATURES``).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import torch

from ra3 import _native

BACKENDS = ("torch", "cpu", "cuda", "cuda-torch", "triton", "triton-fused")
BASE = {"cuda-torch": "cuda", "triton-fused": "triton"}

# Which ops each backend implements (an op name naming a backend that lacks it raises).
VOCAB_OPS = ("logprobs", "entropy", "exact_kl", "cross_entropy", "linear_policy_loss")
OPS = VOCAB_OPS + ("kl", "segment_sum", "group_advantages", "policy_loss")
IMPLEMENTED = {name: set(OPS) for name in BACKENDS}

# Features of the vocabulary-softmax ops only some designs have: a logit soft-cap (applied per tile in the Python
# walk; the extension loop and the fused Triton kernels do not apply one).
FEATURES = {"softcap": {"torch", "cpu", "cuda-torch", "triton"}}

# Per device type, the order ``auto`` tries when the measured table below has no entry for the op.
AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "cuda-torch", "triton", "triton-fused", "torch")}

# Per device type and op, the backends fastest first as the recorded benchmarks measured them: written by
# ``python -m benchmarks.auto_order`` from benchmarks/results/ops-*.json (the file names its sources).
AUTO_TABLE_FILE = Path(__file__).with_name("auto_order.json")


@functools.lru_cache(maxsize=None)
def measured_order() -> dict:
    """{device type: {op: [backend, ...]}} from ``auto_order.json``; empty if it is missing or unreadable."""
    try:
        table = json.loads(AUTO_TABLE_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return {dev: {op: tuple(order) for op, order in ops.items()} for dev, ops in table.get("order", {}).items()}


def auto_order(op: str, device_type: str) -> tuple[str, ...]:
    """The order ``auto`` tries for ``op`` on ``device_type``: measured first, then the static fallback."""
    measured = measured_order().get(device_type, {}).get(op, ())
    fallback = AUTO_ORDER.get(device_type, ("torch",))
    return tuple(measured) + tuple(b for b in fallback if b not in measured)


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _usable(backend: str, device_type: str) -> bool:
    backend = BASE.get(backend, backend)
    if backend == "torch":
        return True
    if backend == "cpu":
        return device_type == "cpu" and _native.has_cpu()
    if backend == "cuda":
        return device_type == "cuda" and _native.has_cuda()
    if backend == "triton":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        return _triton_importable() and (device_type == "cuda" or interpret)
    return False


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends this install can run: for ``device`` if given, else for any device present.

    Probing CUDA happens here, lazily, never at import.
    """
    if device is not None:
        types = [torch.device(device).type]
    else:
        types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(_usable(b, t) and IMPLEMENTED[b] for t in types)]


def resolve(op: str, backend: str, device: torch.device, needs: tuple[str, ...] = ()) -> str:
    """The backend that runs ``op`` on ``device`` for the requested ``backend`` ('auto' or a name); ``needs``: the
    ``FEATURES`` the call uses. A design name outside its family resolves to its base backend."""
    if not isinstance(backend, str):  # before any ==: a tensor or an array compares elementwise
        raise TypeError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got a {type(backend).__name__}")

    def has(name: str) -> bool:
        return all(name in FEATURES[f] for f in needs)

    if backend == "auto":
        for name in auto_order(op, device.type):
            if op in IMPLEMENTED[name] and _usable(name, device.type) and has(name):
                return name if op in VOCAB_OPS else BASE.get(name, name)
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")
    if op not in IMPLEMENTED[backend]:
        raise ValueError(f"backend={backend!r} does not implement {op!r} yet; use backend='auto' or 'torch'")
    if not _usable(backend, device.type):
        why = {
            "cpu": "needs CPU tensors and the compiled ra3._C extension",
            "cuda": "needs CUDA tensors and ra3._C built with CUDA (RA3_CUDA=on)",
            "triton": "needs the triton package and CUDA tensors (or TRITON_INTERPRET=1)",
        }[BASE.get(backend, backend)]
        raise ValueError(f"backend={backend!r} cannot run on {device.type} tensors here: it {why}")
    for feature in needs:
        if backend not in FEATURES[feature]:
            raise ValueError(f"backend={backend!r} does not implement {feature}; use one of "
                             f"{', '.join(sorted(FEATURES[feature]))} or 'auto'")
    return backend if op in VOCAB_OPS else BASE.get(backend, backend)

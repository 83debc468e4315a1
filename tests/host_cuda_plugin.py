"""pytest plugin for the child run of test_vocab_softmax_loop.py: backend='cuda' on CPU tensors.

The cuda backend's fused linear ops then run the extension's real vocabulary loop (csrc/cuda/vocab_softmax_loop.cpp)
on host buffers (``ra3._C.testing.vocab_softmax_loop_*``), with the CPU tile kernels and, for cuBLAS, the stand-in named
by RA3_CUBLAS_LIBRARY (tests/fake_cublas.c). Every other cuda kernel call (logits-input ops, the float16
backward's torch-GEMM loop) runs its CPU twin. Loaded with ``-p host_cuda_plugin`` and tests/ on sys.path.
"""
from __future__ import annotations

import pytest
import torch

EXTENSION_LOOP = ("vocab_softmax_loop_fwd", "vocab_softmax_loop_grad", "vocab_softmax_loop_cross_entropy")
# Buffers the loop must overwrite before it reads them (scratch tiles, gradients), by argument position: they
# are NaN-poisoned first, so a GEMM that accumulated into one (beta = 1 where 0 belongs) shows as NaN.
OVERWRITTEN = {"vocab_softmax_loop_fwd": (18, 19), "vocab_softmax_loop_grad": (22, 23, 24, 26, 27, 28),
               "vocab_softmax_loop_cross_entropy": (13, 14, 19, 20, 21, 22)}


@pytest.fixture(autouse=True)
def host_cuda(monkeypatch, request):
    import conftest

    from ra3 import _native
    from ra3.ops import _kernels, registry

    mod = _native.load()
    calls: list[str] = []
    usable = registry._usable

    def call(backend, name, device, *args):
        assert backend == "cuda", f"{name} asked for backend {backend!r}"
        calls.append(name)
        for i in OVERWRITTEN.get(name, ()):
            if isinstance(args[i], torch.Tensor):
                args[i].fill_(float("nan"))
        raw = [_kernels.ptr(a) if a is None or isinstance(a, torch.Tensor) else a for a in args]
        return (getattr(mod.testing, name) if name in EXTENSION_LOOP else getattr(mod, "cpu_" + name))(*raw)

    monkeypatch.setattr(conftest, "backend_device", lambda backend: "cpu")
    monkeypatch.setattr(registry, "_usable", lambda backend, dev: backend == "cuda" or usable(backend, dev))
    monkeypatch.setattr(_kernels, "call", call)
    yield calls
    # A linear-op test that never reached the extension's loop would pass without testing it.
    name = request.node.name
    if "linear" in name and "logits" not in name:
        assert set(calls) & set(EXTENSION_LOOP), f"the extension loop never ran; kernel calls: {sorted(set(calls))}"

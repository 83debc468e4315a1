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
# Buffers the loop must overwrite before it reads them (scratch tiles, gradients), by field: they are NaN-poisoned
# first, so a GEMM that accumulated into one (beta = 1 where 0 belongs) shows as NaN.
OVERWRITTEN = {"vocab_softmax_loop_fwd": ("tile", "ref_tile"),
               "vocab_softmax_loop_grad": ("tile", "ref_tile", "tile16", "grad_hidden", "grad_weight", "grad_bias"),
               "vocab_softmax_loop_cross_entropy": ("tile", "tile16", "logs", "grad_hidden", "grad_weight",
                                                    "grad_bias")}


@pytest.fixture(autouse=True)
def host_cuda(monkeypatch, request):
    import conftest

    from ra3 import _native
    from ra3.ops import kernel_abi, registry

    mod = _native.load()
    calls: list[str] = []
    usable = registry._usable

    def call(backend, device, args):
        name = kernel_abi.kernel_name(type(args))
        assert backend == "cuda", f"{name} asked for backend {backend!r}"
        calls.append(name)
        for field in OVERWRITTEN.get(name, ()):
            if isinstance(getattr(args, field), torch.Tensor):
                getattr(args, field).fill_(float("nan"))
        kernel = getattr(mod.testing, name) if name in EXTENSION_LOOP else getattr(mod, "cpu_" + name)
        return kernel(args)

    monkeypatch.setattr(conftest, "backend_device", lambda backend: "cpu")
    monkeypatch.setattr(registry, "_usable", lambda backend, dev: backend == "cuda" or usable(backend, dev))
    monkeypatch.setattr(kernel_abi, "call", call)
    yield calls
    # A linear-op test that never reached the extension's loop would pass without testing it.
    name = request.node.name
    if "linear" in name and "logits" not in name:
        assert set(calls) & set(EXTENSION_LOOP), f"the extension loop never ran; kernel calls: {sorted(set(calls))}"

"""The one call site of every kernel: ``call(backend, name, device, *args)``.

``args`` follow the C ABI of ``ra3._C`` (csrc/ra3_native.h) with a tensor (or None) wherever the ABI takes a
pointer. Backend 'cpu' / 'cuda' turns them into raw addresses (0 for None) and calls ``cpu_<name>`` or
``cuda_<name>`` (on the current stream of ``device``) across the extension's torch-free boundary; backend
'triton' hands the tensors to the launcher ``ra3.kernels.launcher(name)``, imported only then (``import ra3.ops``
never imports triton).
"""
from __future__ import annotations

import torch

from ra3 import _native

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODE[dtype]


def ptr(t: torch.Tensor | None) -> int:
    """The address the kernel reads, 0 for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()


def call(backend: str, name: str, device: torch.device, *args):
    """Runs kernel ``name`` of ``backend`` ('cpu', 'cuda' or 'triton') with ``args`` (tensors for pointers)."""
    if backend == "triton":
        from ra3 import kernels  # noqa: PLC0415  (lazy: triton loads on the first Triton kernel only)

        launch = kernels.launcher(name)
        if device.type == "cuda":
            with torch.cuda.device(device):  # Triton launches on the current device (and its current stream)
                return launch(*args)
        return launch(*args)
    mod = _native.load()
    if mod is None:
        raise RuntimeError(f"ra3._C is not available; {_native.REBUILD_HINT}")
    raw = [ptr(a) if a is None or isinstance(a, torch.Tensor) else a for a in args]
    if backend == "cuda":
        stream = torch.cuda.current_stream(device).cuda_stream
        return getattr(mod, "cuda_" + name)(*raw, stream)
    if backend == "cpu":
        return getattr(mod, "cpu_" + name)(*raw)
    raise ValueError(f"no kernels for backend {backend!r}")

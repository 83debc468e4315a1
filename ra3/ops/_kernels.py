"""Calls into ``ra3._C`` across its torch-free boundary: pointers, sizes, a dtype tag and, on CUDA, the stream."""
from __future__ import annotations

import torch

from ra3 import _native

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODE[dtype]


def ptr(t: torch.Tensor | None) -> int:
    """The address the kernel reads, 0 for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()


def call(name: str, device: torch.device, *args):
    """Runs ``cpu_<name>`` or ``cuda_<name>`` (on the current stream of ``device``) with ``args``."""
    mod = _native.load()
    if mod is None:
        raise RuntimeError(f"ra3._C is not available; {_native.REBUILD_HINT}")
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device).cuda_stream
        return getattr(mod, "cuda_" + name)(*args, stream)
    return getattr(mod, "cpu_" + name)(*args)

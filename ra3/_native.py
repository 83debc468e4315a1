"""Loads the compiled extension ``ra3._C`` once, lazily; never fails ``import ra3``.

The extension is torch-ABI-free: it takes raw pointers (``tensor.data_ptr()``), sizes and a CUDA stream handle,
so one build works with any installed torch. When it is missing or broken, ops fall back to the PyTorch path
with a single warning saying why and how to rebuild.
"""
from __future__ import annotations

import functools
import warnings

REBUILD_HINT = "rebuild it with `pip install -e .` from the ra3 checkout (see README, 'Build')"


@functools.lru_cache(maxsize=None)
def load():
    """The ``ra3._C`` module, or None (with one warning) if it cannot be imported."""
    try:
        from ra3 import _C  # noqa: PLC0415
    except Exception as exc:  # an ImportError, or a broken .so raising anything
        warnings.warn(
            f"ra3's native extension ra3._C is unavailable ({type(exc).__name__}: {exc}); "
            f"ops fall back to the PyTorch backend. To get the C++/CUDA kernels, {REBUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _C


def has_cpu() -> bool:
    return load() is not None


def has_cuda() -> bool:
    mod = load()
    return mod is not None and bool(mod.has_cuda())

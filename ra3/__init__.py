"""ra3: RA3 mid-training for code LLMs and a fused fast-loss backend for RL trainers.

``import ra3`` is lean: it imports no torch, touches no device and builds nothing. Submodules
(``ra3.ops``, ``ra3.midtrain``, ...) load on first access.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("ops", "models", "data", "midtrain", "eval", "rlvr", "integrations", "generation", "distributed")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"ra3.{name}")
    raise AttributeError(f"module 'ra3' has no attribute {name!r}")

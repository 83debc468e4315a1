"""Argument checks shared by every op: they run once, in Python, before any kernel sees a pointer.

Every failure is a ``TypeError`` (wrong type or dtype) or ``ValueError`` (shape, device, range) whose message
starts with the argument's name.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def tensor(name: str, value, *, ndim: int | tuple[int, ...] | None = None, floating: bool | None = None) -> torch.Tensor:
    """Checks that ``value`` is a tensor of the given rank and kind (floating or integer)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")
    if floating is True and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {value.dtype}")
    if floating is False and value.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64 preferred), got {value.dtype}")
    return value


def optional_tensor(name: str, value, **kw) -> torch.Tensor | None:
    return None if value is None else tensor(name, value, **kw)


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Checks that all given tensors live on one device and returns it."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device")
    return first.device


def shape(name: str, value: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(value.shape)}")


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite positive number, got {value}")
    return value


def nonnegative_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (value >= 0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def choice(name: str, value, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}")
    return value


def integer(name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value.item())
        else:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def targets_in_range(name: str, targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Targets must lie in [0, vocab) except entries equal to ``ignore_index``."""
    if targets.numel() == 0:
        return
    live = targets[targets != ignore_index]
    if live.numel() and (int(live.min()) < 0 or int(live.max()) >= vocab):
        bad = live[(live < 0) | (live >= vocab)][0].item()
        raise ValueError(f"{name} holds {bad}, outside [0, {vocab}) and not ignore_index={ignore_index}")


def segment_ids(name: str, ids: torch.Tensor, n: int, num_segments: int) -> None:
    """Segment ids: [n] integers < num_segments; negative ids mean 'in no segment'."""
    tensor(name, ids, ndim=1, floating=False)
    shape(name, ids, (n,), "one id per value")
    if ids.numel() and int(ids.max()) >= num_segments:
        raise ValueError(f"{name} holds {int(ids.max())}, which is >= num_segments={num_segments}")


def finite(name: str, value: torch.Tensor) -> None:
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any floating input is float64 (tests, gradcheck), else float32: accumulation and outputs."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32

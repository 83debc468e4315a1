"""Argument checks shared by every op: they run once, in Python, before any kernel sees a pointer.

Every failure is a ``TypeError`` (wrong type or dtype) or ``ValueError`` (shape, device, range) whose message
starts with the argument's name. The checks never overflow (a scalar too large for a float or an int64 is a
``ValueError``) and never read a tensor that holds no values (the meta device is refused before any value check).
Scalars may be Python or NumPy numbers; bools are refused wherever a number is asked for.
"""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# The most elements an output sized by an argument (num_segments) may ask for: its bytes in float64 fit an int64.
MAX_OUTPUT_ELEMENTS = INT64_MAX // 8


def tensor(name: str, value, *, ndim: int | tuple[int, ...] | None = None, floating: bool | None = None) -> torch.Tensor:
    """Checks that ``value`` is a tensor of the given rank and kind (floating or integer)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values; pass a CPU or CUDA tensor")
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


def _number(name: str, value) -> float:
    """``value`` as a float: a Python or NumPy real number (not a bool), never an OverflowError."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # an int (or Fraction) beyond float range, e.g. 10**400
        raise ValueError(f"{name} must be a finite number, got one too large for a float") from None


def _below_max(name: str, value: float, dtype: torch.dtype | None) -> None:
    if dtype is not None and value > torch.finfo(dtype).max:
        raise ValueError(f"{name} must be at most {torch.finfo(dtype).max:.3g} (finite in {dtype}), got {value:g}")


def positive_float(name: str, value, dtype: torch.dtype | None = None) -> float:
    """A finite number > 0 (and finite in ``dtype``, the compute dtype, when given)."""
    value = _number(name, value)
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite positive number, got {value}")
    _below_max(name, value, dtype)
    return value


def nonnegative_float(name: str, value, dtype: torch.dtype | None = None) -> float:
    """A finite number >= 0 (and finite in ``dtype``, the compute dtype, when given)."""
    value = _number(name, value)
    if not (value >= 0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    _below_max(name, value, dtype)
    return value


def temperature(value, dtype: torch.dtype) -> float:
    """A temperature T whose value and reciprocal are both normal numbers in the compute dtype: the reference
    divides by T and the kernels multiply by 1 / T, so neither may round to 0 or inf (T = 1e-300 would)."""
    value = positive_float("temperature", value)
    tiny = torch.finfo(dtype).tiny
    if not tiny <= value <= 1 / tiny:
        raise ValueError(f"temperature must be in [{tiny:.3g}, {1 / tiny:.3g}] for {dtype} inputs (it and its "
                         f"reciprocal must be normal {dtype} numbers), got {value:g}")
    return value


def scalar_value(name: str, value):
    """A one-element real tensor (a global count, say) as its Python number; anything else as given, for the number
    checks above. Reading it waits for the tensor's device."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.device.type == "meta" or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a number or a one-element real tensor, got a {value.dtype} tensor of "
                            f"shape {tuple(value.shape)} on {value.device}")
        return value.item()
    return value


def choice(name: str, value, options: tuple[str, ...]) -> str:
    want = ", ".join(repr(o) for o in options)
    if not isinstance(value, str):  # before ``in``: a tensor or an array compares elementwise
        raise TypeError(f"{name} must be one of {want}; got a {type(value).__name__}")
    if value not in options:
        raise ValueError(f"{name} must be one of {want}; got {value!r}")
    return value


def integer(name: str, value, *, minimum: int | None = None, maximum: int = INT64_MAX) -> int:
    """An int in [minimum, maximum] (int64 at most): a Python or NumPy integer, or a one-element integer tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype not in INDEX_DTYPES or value.device.type == "meta":
            raise TypeError(f"{name} must be an int, got a {value.dtype} tensor of shape {tuple(value.shape)} "
                            f"on {value.device}")
        value = int(value.item())
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    else:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        got = value if value >= INT64_MIN else f"an int of {value.bit_length()} bits"
        raise ValueError(f"{name} must be >= {minimum}, got {got}")
    if not INT64_MIN <= value <= maximum:  # never format a huge int: 10**5000 has no str() in Python >= 3.11
        raise ValueError(f"{name} must be in [{INT64_MIN if minimum is None else minimum}, {maximum}], got an int "
                         f"of {value.bit_length()} bits")
    return value


def targets_in_range(name: str, targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Targets must lie in [0, vocab) except entries equal to ``ignore_index``."""
    if targets.numel() == 0:
        return
    # Compared in int64: in a narrow dtype torch wraps the scalar (uint8 targets != -100 compares with 156).
    targets = targets.long()
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

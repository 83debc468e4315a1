"""Shared fixtures: the backends under test, per-dtype tolerances, small vocabulary chunks."""
from __future__ import annotations

import os

import pytest
import torch

# Without a CUDA GPU the triton backend runs in Triton's interpreter on CPU tensors. Triton reads the variable
# when a kernel is decorated, so it must be set before anything imports ra3.kernels (ra3 never imports triton at
# import time). An explicit TRITON_INTERPRET in the environment wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ra3.ops import registry  # noqa: E402

# Every backend runs every case where it can; one that cannot run here is skipped with the reason.
ALL_BACKENDS = ("torch", "cpu", "cuda", "triton")


def backend_device(backend: str) -> str:
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else \
        ("cpu" if backend in ("torch", "cpu", "triton") else "cuda")


def require_backend(backend: str, op: str = "logprobs") -> torch.device:
    """The device to test ``backend`` on, or a skip saying why it cannot run here."""
    device = torch.device(backend_device(backend))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"backend {backend!r} needs a CUDA GPU; none here")
    if op not in registry.IMPLEMENTED[backend]:
        pytest.skip(f"backend {backend!r} does not implement {op!r} (tracked in issue 4)")
    try:
        registry.resolve(op, backend, device)
    except ValueError as exc:
        pytest.skip(str(exc))
    return device


# Relative tolerance of a result against the float64 reference, by the dtype the result is compared in.
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """|actual - expected| <= rtol * (|expected| + max|expected| * 1e-2 + 1e-6), elementwise, rtol by dtype."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values in result"
    scale = e.abs().max().item() if e.numel() else 0.0
    tol = RTOL[dtype] * (e.abs() + 1e-2 * scale + 1e-6)
    err = (a - e).abs()
    worst = (err / tol).max().item() if e.numel() else 0.0
    assert worst <= 1.0, f"{what}: max error {err.max().item():.3e} is {worst:.2f}x the {dtype} tolerance"


@pytest.fixture
def small_chunks(monkeypatch):
    """Vocabulary chunks of 7 columns, so every multi-chunk path (and a ragged last chunk) runs on tiny shapes."""
    from ra3.ops import _vocab_chunks

    monkeypatch.setattr(_vocab_chunks, "MIN_CHUNK", 1)
    monkeypatch.setattr(_vocab_chunks, "chunk_size", lambda n, vocab: min(vocab, 7))

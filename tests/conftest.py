"""Shared fixtures: the backends under test, per-dtype tolerances, small vocabulary chunks."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

# Without a CUDA GPU the triton backend runs in Triton's interpreter on CPU tensors. Triton reads the variable
# when a kernel is decorated, so it must be set before anything imports ra3.kernels (ra3 never imports triton at
# import time). An explicit TRITON_INTERPRET in the environment wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ra3  # noqa: E402
from ra3.ops import registry  # noqa: E402

# test_cpu_isa_builds.py runs suites against a copy of the package with a module built for one ISA: make sure the
# copy is what they import.
if os.environ.get("RA3_EXPECT_PACKAGE"):
    assert os.path.realpath(ra3.__file__).startswith(os.path.realpath(os.environ["RA3_EXPECT_PACKAGE"])), ra3.__file__

# Every backend runs every case where it can; one that cannot run here is skipped with the reason.
ALL_BACKENDS = ("torch", "cpu", "cuda", "triton")


def backend_device(backend: str) -> str:
    backend = registry.BASE.get(backend, backend)  # a design runs where its base backend runs
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


# A 16-bit result may be at most this many times as far from the float64 reference as torch eager's own result in
# that dtype, on the same inputs (the bound of Cut Cross-Entropy's tests; ../shared/STYLE.md).
EAGER_FACTOR = 2.0


def assert_within_eager(actual: torch.Tensor, expected: torch.Tensor, eager: torch.Tensor, what: str = "") -> None:
    """max|actual - expected| <= EAGER_FACTOR * max|eager - expected| (+ 1e-6 of max|expected| for exact eager
    results), where ``eager`` is torch eager's result in the 16-bit dtype itself and ``expected`` float64."""
    a, e, g = (t.detach().double().cpu() for t in (actual, expected, eager))
    assert a.shape == e.shape == g.shape, f"{what}: shapes {tuple(a.shape)}, {tuple(e.shape)}, {tuple(g.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values in result"
    if not e.numel():
        return
    err, eager_err = (a - e).abs().max().item(), (g - e).abs().max().item()
    bound = EAGER_FACTOR * eager_err + 1e-6 * e.abs().max().item()
    assert err <= bound, (f"{what}: max error {err:.3e} is {err / max(eager_err, 1e-30):.2f}x torch eager's own "
                          f"{eager_err:.3e} (at most {EAGER_FACTOR}x)")


@contextlib.contextmanager
def eager_in(dtype: torch.dtype):
    """The reference computes in ``dtype`` itself inside this block, as torch eager does on a 16-bit model."""
    from ra3.ops import reference

    saved = reference.compute_dtype
    reference.compute_dtype = lambda *tensors: dtype
    try:
        yield
    finally:
        reference.compute_dtype = saved


@pytest.fixture
def small_chunks(monkeypatch):
    """Vocabulary chunks of 7 columns, so every multi-chunk path (and a ragged last chunk) runs on tiny shapes."""
    from ra3.ops import vocab_softmax_walk

    monkeypatch.setattr(vocab_softmax_walk, "MIN_CHUNK", 1)
    monkeypatch.setattr(vocab_softmax_walk, "chunk_size", lambda n, vocab, device: min(vocab, 7))

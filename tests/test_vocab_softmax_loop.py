"""The cuda backend's fused linear loop (csrc/cuda/vocab_softmax_loop.cpp) and its cuBLAS loader, on a machine without
a GPU.

The loop's GEMM calls (column-major views, transposes, leading dimensions, the bias as a rank-1 update, the first
chunk overwriting grad_hidden, grad_bias as d^T @ ones, bfloat16 rounding of the gradient tile) and the Python glue
in ra3/ops/vocab_softmax_walk.py are checked against the float64 reference by running the real loop on host buffers:
``ra3._C.testing.vocab_softmax_loop_*`` swaps only the tile kernels (CPU twins) and cuBLAS (tests/fake_cublas.c, a
stand-in built here that multiplies host memory and refuses what cuBLAS refuses). The cases are test_vocab_softmax.py's
own cuda cases plus the ones below, in a child process (the loader keeps the first cuBLAS it finds). On a GPU the
same test_vocab_softmax.py cases also run for real, on cuBLAS.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_close

from ra3 import _native, ops
from ra3.ops import kernel_abi as abi
from ra3.ops import reference

TESTS = Path(__file__).parent
CHILD = os.environ.get("RA3_HOST_CUDA_CHILD") == "1"

needs_cuda_build = pytest.mark.skipif(not _native.has_cuda(), reason="ra3._C was built without CUDA (RA3_CUDA=off)")
child_only = pytest.mark.skipif(not CHILD, reason="runs in test_host_loop_matches_reference's child process")
parent_only = pytest.mark.skipif(CHILD, reason="the parent's test")


def _cuda_major() -> int:
    return int(_native.load().build_info()["cuda_version"].split(".")[0])


def _build_fake(tmp_path: Path, name: str, *defines: str) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the cuBLAS stand-in")
    out = tmp_path / f"lib{name}.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", *defines, "-o", str(out), str(TESTS / "fake_cublas.c")],
                   check=True)
    return out


def _child(env_extra: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           **env_extra}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False, cwd=TESTS.parent)


def _cublas_error(library: str) -> str:
    probe = ("import ra3._C as C\ntry:\n    C.cublas_info()\nexcept RuntimeError as e:\n    print(e)\n"
             "else:\n    print('LOADED')")
    res = _child({"RA3_CUBLAS_LIBRARY": library}, "-c", probe)
    assert res.returncode == 0, res.stderr
    return res.stdout


@needs_cuda_build
@parent_only
def test_loader_names_every_place_it_tried(tmp_path):
    out = _cublas_error(str(tmp_path / "missing.so"))
    if "LOADED" in out:
        pytest.skip("a real cuBLAS is on the loader's search path here")
    assert "could not be loaded" in out and str(tmp_path / "missing.so") in out
    assert f"libcublas.so.{_cuda_major()}" in out


@needs_cuda_build
@parent_only
def test_loader_refuses_another_major_version_and_missing_symbols(tmp_path):
    wrong = _build_fake(tmp_path, "old_cublas", f"-DFAKE_MAJOR={_cuda_major() - 1}")
    out = _cublas_error(str(wrong))
    assert f"is cuBLAS {_cuda_major() - 1}, this build needs cuBLAS {_cuda_major()}" in out
    no_gemm = _build_fake(tmp_path, "no_gemm", f"-DFAKE_MAJOR={_cuda_major()}", "-DFAKE_OMIT_GEMM")
    assert "has no symbol cublasGemmEx" in _cublas_error(str(no_gemm))


@needs_cuda_build
@parent_only
def test_host_loop_matches_reference(tmp_path):
    fake = _build_fake(tmp_path, "fake_cublas", f"-DFAKE_MAJOR={_cuda_major()}")
    assert "LOADED" in _cublas_error(str(fake))
    res = _child({"RA3_CUBLAS_LIBRARY": str(fake), "RA3_HOST_CUDA_CHILD": "1"},
                 "-m", "pytest", "-q", "-p", "host_cuda_plugin", "-p", "no:cacheprovider",
                 "tests/test_vocab_softmax.py", "tests/test_vocab_softmax_loop.py", "-k", "cuda or host")
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, tail
    assert " passed" in res.stdout and "failed" not in res.stdout, tail


def _cublas_header_dir() -> Path | None:
    """A folder holding cublas_api.h: RA3_CUBLAS_INCLUDE (.ci/run extracts it from the nvidia-cublas wheel), the
    CUDA toolkit's include folder, or the nvidia-cublas package beside torch."""
    import importlib.util

    places = [os.environ.get("RA3_CUBLAS_INCLUDE", ""), "/usr/local/cuda/include"]
    spec = importlib.util.find_spec("nvidia")
    places += [str(Path(p) / "cu13" / "include") for p in (spec.submodule_search_locations or [])] if spec else []
    return next((Path(p) for p in places if p and (Path(p) / "cublas_api.h").is_file()), None)


@parent_only
def test_declared_cublas_abi_matches_the_header():
    """csrc/cuda/cublas_loader.cpp declares cuBLAS's entry points and constants itself (the module links no
    cuBLAS); compiled beside the real header, its static_asserts compare every one of them."""
    header = _cublas_header_dir()
    if header is None:
        pytest.skip("no cublas_api.h here (.ci/run takes it from the nvidia-cublas wheel: RA3_CUBLAS_INCLUDE)")
    nvcc = shutil.which("nvcc")
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    roots += [str(Path(nvcc).resolve().parent.parent)] if nvcc else []
    cuda_include = next((Path(r) / "include" for r in roots
                         if r and (Path(r) / "include" / "cuda_runtime.h").is_file()), None)
    if cuda_include is None:
        pytest.skip(f"no CUDA runtime headers under {roots}")
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    res = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-DRA3_REQUIRE_CUBLAS_HEADER", f"-I{cuda_include}",
                          f"-I{header}", str(TESTS.parent / "csrc" / "cuda" / "cublas_loader.cpp")],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-4000:]


# --- cases for the child run (backend='cuda' on CPU tensors, see host_cuda_plugin.py) ------------------------------

def _pair(n, h, v, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 2).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).to(dtype).requires_grad_() if bias else None
    return hidden, weight, b


def _ref64(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


@child_only
@pytest.mark.parametrize("mode", ("logprobs", "entropy", "exact_kl"))
def test_host_float64(mode, small_chunks):
    """float64 runs float64 GEMMs (compute type 64F) and matches the reference to float64 precision."""
    hidden, weight, b = _pair(9, 6, 23, torch.float64, 0)
    rh, rw, rb = _pair(9, 4, 23, torch.float64, 1)
    targets = torch.randint(0, 23, (9,))
    fns = {
        "logprobs": lambda m, h, w, bb: m.linear_logprobs(h, w, targets, bias=bb, temperature=0.8,
                                                           **({"backend": "cuda"} if m is ops else {})),
        "entropy": lambda m, h, w, bb: m.linear_entropy(h, w, bias=bb, **({"backend": "cuda"} if m is ops else {})),
        "exact_kl": lambda m, h, w, bb: m.linear_exact_kl(h, w, rh.detach(), rw.detach(), bias=bb,
                                                          ref_bias=rb.detach(),
                                                          **({"backend": "cuda"} if m is ops else {})),
    }
    out = fns[mode](ops, hidden, weight, b)
    h64, w64, b64 = _ref64(hidden, weight, b)
    want = fns[mode](reference, h64, w64, b64)
    assert out.dtype == torch.float64
    assert_close(out, want, torch.float64, mode)
    got = torch.autograd.grad(out.sum(), (hidden, weight, b))
    exp = torch.autograd.grad(want.sum(), (h64, w64, b64))
    for name, g1, g2 in zip(("hidden", "weight", "bias"), got, exp):
        assert_close(g1, g2, torch.float64, f"grad {name}")


@child_only
def test_host_frozen_weight_and_mixed_dtypes(small_chunks):
    """A frozen weight skips grad_weight; hidden and weight of different dtypes are promoted to one; a bf16
    reference beside a float32 policy forms its tiles from bf16 operands."""
    hidden, weight, _ = _pair(12, 8, 30, torch.float32, 2, bias=False)
    weight = weight.detach().to(torch.bfloat16)
    rh, rw, _ = _pair(12, 8, 30, torch.bfloat16, 3, bias=False)
    out = ops.linear_exact_kl(hidden, weight, rh.detach(), rw.detach(), backend="cuda")
    h64, w64 = _ref64(hidden, weight)
    want = reference.linear_exact_kl(h64, w64.detach(), rh.detach().double(), rw.detach().double())
    assert_close(out, want, torch.float32, "exact KL")
    (gh,) = torch.autograd.grad(out.sum(), (hidden,))
    (gh_want,) = torch.autograd.grad(want.sum(), (h64,))
    assert_close(gh, gh_want, torch.float32, "grad hidden")


@child_only
@pytest.mark.parametrize("op", ("logprobs", "cross_entropy"))
def test_host_bf16_gradient_precision_default_and_high(op, small_chunks, monkeypatch, host_cuda):
    """bf16 backward passes: the default rounds the gradient tile once (1 bf16 term per GEMM); precision='high'
    splits it into hi + lo (2 terms) and lands within the fixed bf16 tolerance of float64, closer than the default."""
    from ra3.ops import vocab_softmax_walk

    monkeypatch.setattr(vocab_softmax_walk, "ce_rows", lambda vocab, device: 5)
    hidden, weight, b = _pair(13, 16, 50, torch.bfloat16, 4)
    targets = torch.randint(0, 50, (13,), generator=torch.Generator().manual_seed(4))
    h64, w64, b64 = _ref64(hidden, weight, b)
    fn = {"logprobs": lambda m, h, w, bb, **kw: m.linear_logprobs(h, w, targets, bias=bb, temperature=0.8, **kw).sum(),
          "cross_entropy": lambda m, h, w, bb, **kw: m.linear_cross_entropy(h, w, targets, bias=bb, temperature=0.8,
                                                                            **kw)}[op]
    want = torch.autograd.grad(fn(reference, h64, w64, b64), (h64, w64))
    errors = {}
    for precision in ("default", "high"):
        host_cuda.clear()
        got = torch.autograd.grad(fn(ops, hidden, weight, b, backend="cuda", precision=precision), (hidden, weight))
        assert set(host_cuda) & {"vocab_softmax_loop_grad", "vocab_softmax_loop_cross_entropy"}, host_cuda
        errors[precision] = max((g1.double() - g2).abs().max().item() for g1, g2 in zip(got, want))
        if precision == "high":
            for name, g1, g2 in zip(("hidden", "weight"), got, want):
                assert_close(g1, g2, torch.bfloat16, f"grad {name}, precision='high'")
    assert errors["high"] < errors["default"], errors


@parent_only
def test_the_extension_loop_runs_only_where_it_can(monkeypatch):
    """Backend 'cuda' + a linear op + cuBLAS loadable -> the extension; float16 backward passes and logits inputs
    take the Python walk ('cuda-torch'); a cuBLAS that does not load falls back with one warning."""
    from ra3.ops import vocab_softmax_walk as vw

    class Module:
        calls = 0
        fail = False

        def cublas_info(self):
            Module.calls += 1
            if Module.fail:
                raise RuntimeError("ra3._C: cuBLAS 13 could not be loaded")
            return {"path": "libcublas.so.13", "version": "13.1.1"}

    monkeypatch.setattr(vw._native, "load", lambda: Module())
    vw._cublas_loads.cache_clear()
    runs = vw.DESIGNS["cuda"]._runs
    h16, w16 = torch.zeros(2, 3, dtype=torch.float16), torch.zeros(5, 3, dtype=torch.float16)
    h, w = torch.zeros(2, 3), torch.zeros(5, 3)
    try:
        assert runs(vw.Head(h, w, None), False) and runs(vw.Head(h, w, None), True)
        assert runs(vw.Head(h16, w16, None), False) and not runs(vw.Head(h16, w16, None), True)
        assert runs(vw.Head(h16, w, None), True)  # mixed dtypes are promoted to float32
        assert not runs(vw.Head(h, None, None), False)
        assert isinstance(vw.DESIGNS["cuda-torch"], vw.ChunkedWalk) and vw.DESIGNS["cuda-torch"].kernels == "cuda"
        assert Module.calls == 1  # loaded once per process
        vw._cublas_loads.cache_clear()
        Module.fail = True
        with pytest.warns(RuntimeWarning, match="fall back to torch's GEMMs .*: ra3._C: cuBLAS 13 could not be loaded"):
            assert not runs(vw.Head(h, w, None), False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning, no second attempt
            assert not runs(vw.Head(h, w, None), False)
        assert Module.calls == 2
    finally:
        vw._cublas_loads.cache_clear()


@needs_cuda_build
@parent_only
@pytest.mark.parametrize(("change", "message"), [
    ({"bf16_terms": 3}, "bf16_terms must be 1 or 2, got 3"),
    ({"in_dtype": 3}, "float16 operands are not taken where gradients are formed"),
    ({"in_dtype": 7}, "in_dtype must be 0 (float32), 1 (float64), 2 (bfloat16) or 3 (float16), got 7"),
    ({"tile16": None}, "tile16 is required"),
    ({"dtype": 1}, "in_dtype 2 does not go with compute dtype 1"),
    ({"chunk": 0}, "chunk must be > 0, got 0"),
    ({"hidden": None}, "hidden and its weight are required"),
    ({"grad_bias": "buffer"}, "grad_bias is given but bias is not"),
    ({"mode": 5}, "mode must be 0 (logprob), 1 (entropy) or 2 (exact KL), got 5"),
])
def test_the_loop_refuses_bad_arguments_before_any_gemm(change, message):
    """The extension's own checks (the Python side never sends such calls): a ValueError naming the argument,
    raised before cuBLAS is needed, so they hold on any machine."""
    buf = torch.zeros(64)
    change = {k: buf if v == "buffer" else v for k, v in change.items()}
    source = abi.LinearSourceArgs(in_dtype=abi.BFLOAT16, hidden=buf, weight=buf, bias=None, h=4)
    source = source._replace(**{k: change.pop(k) for k in source._fields if k in change})
    args = abi.VocabSoftmaxLoopGradArgs(
        mode=abi.LOGPROB, dtype=abi.FLOAT32, n=2, vocab=5, chunk=3, source=source, ref_source=abi.NO_SOURCE,
        inv_temp=1.0, targets=None, m=buf, logs=buf, q=None, g=buf, ones=None, tile=buf, ref_tile=None, tile16=buf,
        bf16_terms=2, grad_hidden=buf, grad_weight=None, grad_bias=None)._replace(**change)
    with pytest.raises(ValueError, match=re.escape(message)):
        _native.load().testing.vocab_softmax_loop_grad(args)

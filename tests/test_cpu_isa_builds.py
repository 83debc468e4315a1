"""The CPU kernels built for one ISA, without the per-ISA clones the portable build picks at load time.

This machine's portable build runs its AVX-512 clone, so the AVX2 (x86-64-v3) and baseline x86-64 loops, which
sum in other orders (8 or 4 lanes instead of 16) and, at baseline, without fma, would otherwise never be tested
here. Each case configures CMake with RA3_CPU_ARCH into a temporary folder (CPU kernels only), puts the module into
a copy of the package, and runs the CPU kernels' precision and edge tests against that copy in a child process.
The shared ``ra3/_C*.so`` is never touched. About a minute per ISA on 2 cores.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests of the cpu backend's kernels whose sums and roundings depend on the ISA.
SUITES = ["tests/test_cpu_precision.py", "tests/test_ops_segments.py", "tests/test_kernel_contracts.py"]

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or sys.platform != "linux",
    reason="the ISA levels built here are x86-64 ones (Linux)")


def _cmake() -> str:
    try:
        import cmake  # the test extra's wheel

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("cmake")
    if exe is None:
        pytest.skip("cmake is not installed (pip install -e '.[test]' brings it)")
    return exe


def _build(arch: str, folder: Path) -> Path:
    """A copy of the package with ``ra3._C`` built for ``arch``; returns the folder to put on PYTHONPATH."""
    pybind11 = pytest.importorskip("pybind11", reason="pybind11 is not installed (pip install -e '.[test]')")
    pkg = folder / "pkg"
    shutil.copytree(ROOT / "ra3", pkg / "ra3", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copytree(ROOT / "kernels", pkg / "ra3" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    build = folder / "build"
    configure = [_cmake(), "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DRA3_CUDA=off",
                 f"-DRA3_CPU_ARCH={arch}", f"-DRA3_OUTPUT_DIR={pkg / 'ra3'}", f"-DPython_EXECUTABLE={sys.executable}",
                 f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    jobs = os.environ.get("RA3_BUILD_JOBS", "2")
    for cmd in (configure, [_cmake(), "--build", str(build), "-j", jobs]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert list((pkg / "ra3").glob("_C*.so")), "the build wrote no module"
    return pkg


@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64"], ids=["avx2", "baseline"])
def test_cpu_kernels_built_for_one_isa(arch, tmp_path):
    pkg = _build(arch, tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pkg), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    # The child imports the copy (not the editable install) and its module is the one just built.
    probe = ("import ra3, ra3._native as n; info = n.load().build_info(); "
             "print(ra3.__file__); print(info['cpu_arch']); print(info['cpu_isa_variants'])")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    where, built_for, variants = out.stdout.splitlines()
    assert Path(where).is_relative_to(pkg), where
    assert built_for == arch and variants == "[]"
    # Run from the temporary folder: `python -m` puts the working directory first on sys.path, and in the checkout
    # that is the editable package, not the copy (conftest checks RA3_EXPECT_PACKAGE).
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={ROOT}",
                          *(str(ROOT / s) for s in SUITES), "-k", "cpu"],
                         env={**env, "RA3_EXPECT_PACKAGE": str(pkg)}, cwd=tmp_path, capture_output=True, text=True,
                         timeout=900)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, f"{arch}: {summary}\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
    assert " passed" in summary and "skipped" not in summary.split(" passed")[0], summary

"""Builds ra3 and its native extension ``ra3._C`` (CMake drives the C++/CUDA build, as in pybind11's cmake_example).

Environment variables:
    RA3_NO_NATIVE=1        skip the native build entirely: a pure-Python install, ops run on the PyTorch backend.
    RA3_CUDA=auto|on|off   CUDA kernels: auto (default) builds them iff CMake finds a toolkit (CUDACXX, nvcc on
                           PATH, /usr/local/cuda/bin/nvcc); on fails without one; off builds CPU kernels only.
    RA3_CUDA_ARCHS         CUDA architectures, CMAKE_CUDA_ARCHITECTURES syntax (default "80;90").
    RA3_CPU_ARCH           CPU kernels for one ISA, a -march value (native, x86-64-v3, ...), instead of the portable
                           build with per-ISA clones picked at load time (native: only for builds that stay here).
    RA3_BUILD_JOBS         parallel compile jobs (default: from the CPU count and free memory, ~2 GiB per job).

Metadata and dependencies live in pyproject.toml; this file adds the packages (with the top-level ``kernels/``
folder installed as ``ra3.kernels``), the package data and the extension.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
GIB = 1 << 30
MEMORY_PER_JOB = 2 * GIB  # nvcc on a .cu file for two architectures peaks near 1-2 GiB


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _env_flag(name: str) -> bool:
    value = _env(name).lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 0 or 1, got {os.environ[name]!r}")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def build_jobs() -> int:
    """RA3_BUILD_JOBS, else min(usable cores, free memory / MEMORY_PER_JOB), at least 1."""
    if _env("RA3_BUILD_JOBS"):
        try:
            jobs = int(_env("RA3_BUILD_JOBS"))
        except ValueError:
            jobs = 0
        if jobs < 1:
            raise ValueError(f"RA3_BUILD_JOBS must be a positive integer, got {os.environ['RA3_BUILD_JOBS']!r}")
        return jobs
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory = _available_memory()
    by_memory = cores if memory is None else memory // MEMORY_PER_JOB
    return max(1, min(cores, by_memory))


def _cmake_executable() -> str:
    try:  # the `cmake` wheel from the build requirements
        import cmake  # noqa: PLC0415

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except (ImportError, AttributeError):
        pass
    exe = shutil.which("cmake")
    if exe is None:
        raise RuntimeError("building ra3._C needs CMake >= 3.24 (`pip install cmake`), or set RA3_NO_NATIVE=1")
    return exe


class CMakeExtension(Extension):
    """An extension whose sources CMake knows (CMakeLists.txt); setuptools only picks where the module goes."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11  # noqa: PLC0415  (a build requirement, present in the isolated build env)

        cuda = _env("RA3_CUDA", "auto").lower()
        if cuda not in ("auto", "on", "off"):
            raise ValueError(f"RA3_CUDA must be auto, on or off, got {os.environ['RA3_CUDA']!r}")
        archs = _env("RA3_CUDA_ARCHS", "80;90").replace(",", ";")
        if _env("RA3_NATIVE_ARCH"):
            raise ValueError("RA3_NATIVE_ARCH was replaced by RA3_CPU_ARCH: set RA3_CPU_ARCH=native")
        cpu_arch = _env("RA3_CPU_ARCH")
        if cpu_arch and not all(c.isalnum() or c in "-_." for c in cpu_arch):
            raise ValueError(f"RA3_CPU_ARCH must be a -march value such as native or x86-64-v3, got {cpu_arch!r}")
        # Built into the folder setuptools expects: build/lib* for wheels; an editable install copies it into ra3/.
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_type = "Debug" if self.debug else "Release"
        # A fixed build folder (setuptools' build_temp is a fresh temporary one for editable installs): a rebuild
        # recompiles only what changed; the kernels' objects survive a new isolated build environment.
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}-{build_type.lower()}"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            _cmake_executable(), "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DRA3_OUTPUT_DIR={out_dir}",
            f"-DRA3_CUDA={cuda}",
            f"-DRA3_CUDA_ARCHS={archs}",
            f"-DRA3_CPU_ARCH={cpu_arch}",
        ]
        cache = build_dir / "CMakeCache.txt"
        if shutil.which("ninja") and not cache.exists():
            configure += ["-G", "Ninja"]
        if cuda != "off" and not _env("CUDACXX") and not shutil.which("nvcc") \
                and Path("/usr/local/cuda/bin/nvcc").exists():
            os.environ["CUDACXX"] = "/usr/local/cuda/bin/nvcc"
        jobs = build_jobs()
        start = time.monotonic()
        print(f"ra3: building ra3._C (RA3_CUDA={cuda}, archs {archs}, {jobs} jobs) in {build_dir}", flush=True)
        subprocess.run(configure, check=True)
        subprocess.run([configure[0], "--build", str(build_dir), "--config", build_type, "-j", str(jobs)], check=True)
        print(f"ra3: built ra3._C in {time.monotonic() - start:.0f} s", flush=True)

    def copy_extensions_to_source(self) -> None:
        # Editable installs copy the module into ra3/. Unlink the old one first so the copy gets a new inode:
        # copying over it in place would truncate a file that running Python processes have mapped (SIGBUS).
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            try:
                inplace_file, _ = self._get_inplace_equivalent(build_py, ext)
            except AttributeError:  # a setuptools without this helper: keep its plain copy
                break
            if os.path.exists(inplace_file):
                os.unlink(inplace_file)
        super().copy_extensions_to_source()


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = find_packages(where=str(ROOT), include=["ra3", "ra3.*"])
    package_dir = {}
    if (ROOT / "kernels").is_dir():
        # Installed as ra3.kernels, never as a top-level `kernels` (that name belongs to another PyPI project).
        package_dir["ra3.kernels"] = "kernels"
        packages.append("ra3.kernels")
        packages += ["ra3.kernels." + p for p in find_packages(where=str(ROOT / "kernels"))]
    return packages, package_dir


packages, package_dir = _packages()
ext_modules = [] if _env_flag("RA3_NO_NATIVE") else [CMakeExtension("ra3._C")]
if not ext_modules and any((ROOT / "ra3").glob("_C.*")):
    # Wheels never carry it (it is not package data), but an editable install would still import it.
    print("ra3: RA3_NO_NATIVE=1, but ra3/ holds a previously built _C module that an editable install will still "
          "import; delete ra3/_C.* for a pure-Python checkout", file=sys.stderr)

setup(
    packages=packages,
    package_dir=package_dir,
    # The embedded corpora (with the PSF license of their source) and the pretrained ra3-tiny weights.
    package_data={"ra3": ["data/*.jsonl", "data/*.jsonl.gz", "data/*.txt", "data/*.md", "models/ra3-tiny/*",
                          "configs/*.yaml", "ops/auto_order.json"]},
    include_package_data=False,
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)

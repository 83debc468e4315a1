"""What every benchmark script shares: the device's name, /proc/self/status readings, and writing a report as
JSON + Markdown under benchmarks/results/."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    """'NVIDIA H200' for CUDA devices, the CPU model and core count otherwise."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def versions() -> dict:
    import torch

    import ra3

    return {"ra3": ra3.__version__, "torch": torch.__version__, "python": platform.python_version()}


def command(module: str, args: list[str]) -> str:
    """The command as run, with the RA3_* settings in effect in front (e.g. RA3_CUBLAS_LIBRARY), so a recorded row
    can be reproduced."""
    env = [f"{k}={v}" for k, v in sorted(os.environ.items())
           if (k.startswith("RA3_") and k != "RA3_BUILD_JOBS") or k == "TRITON_INTERPRET"]
    return " ".join([*env, "python -m " + module, *args])


def status_bytes(field: str) -> int | None:
    """A byte count from /proc/self/status (VmRSS, VmHWM, ...), None where there is no such file or field."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def write_report(out_dir: str | Path, stem: str, report: dict, markdown: Callable[[dict], str],
                 announce: bool = True) -> Path:
    """Writes ``out_dir/stem.json`` and ``.md``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    if announce:
        print(f"wrote {out / stem}.json and .md")
    return out

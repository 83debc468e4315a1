"""Microbenchmark of every ra3 op backend against torch eager and torch.compile: forward+backward time, peak memory.

    python -m benchmarks.ops [--preset cpu|quick] [--ops linear_logprobs,policy_loss] [--repeats 5]
    ra3 bench ...                                  (the same, from an editable install)

Each (op, implementation) runs in a fresh subprocess, so its peak memory is its own: on CUDA the allocator's
``max_memory_allocated``, on CPU the growth of the process's peak resident set over its resident set with the
inputs in place (the kernel's high-water mark VmHWM, reset through /proc/self/clear_refs just before the step;
``ru_maxrss`` where that is not possible). Peak extra memory therefore counts everything the forward+backward allocates, gradients included.
Writes ``benchmarks/results/ops-<device>-<date>.json`` and ``.md`` with the command, device and versions.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# op -> list of shape dicts, per preset. 'cpu' holds the CPU target (N=2048, H=512, V=32000).
PRESETS = {
    "cpu": {
        "linear_logprobs": [dict(N=2048, H=512, V=32000)],
        "linear_entropy": [dict(N=2048, H=512, V=32000)],
        "linear_cross_entropy": [dict(N=2048, H=512, V=32000)],
        "kl": [dict(N=1 << 22)],
        "segment_sum": [dict(N=1 << 22, S=4096)],
        "group_advantages": [dict(N=1 << 20, G=16)],
        "policy_loss": [dict(B=256, T=4096)],
    },
    "quick": {
        "linear_logprobs": [dict(N=256, H=64, V=2000)],
        "linear_entropy": [dict(N=256, H=64, V=2000)],
        "linear_cross_entropy": [dict(N=256, H=64, V=2000)],
        "kl": [dict(N=1 << 14)],
        "segment_sum": [dict(N=1 << 14, S=64)],
        "group_advantages": [dict(N=1 << 12, G=8)],
        "policy_loss": [dict(B=16, T=256)],
    },
}


def _make_case(op: str, shape: dict, device: str, dtype):
    """Returns (make_inputs() -> tuple, run(impl, inputs) -> scalar loss) for one op."""
    import torch

    from ra3 import ops
    from ra3.ops import reference

    g = torch.Generator().manual_seed(0)

    def rand(*s, scale=1.0, grad=False):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(grad)

    if op in ("linear_logprobs", "linear_entropy", "linear_cross_entropy"):
        N, H, V = shape["N"], shape["H"], shape["V"]

        def make():
            return rand(N, H, grad=True), rand(V, H, scale=H ** -0.5, grad=True), \
                torch.randint(0, V, (N,), generator=g).to(device)

        def eager(h, w, t):
            logits = (h @ w.T).float()
            if op == "linear_cross_entropy":
                return torch.nn.functional.cross_entropy(logits, t)
            logp = torch.log_softmax(logits, -1)
            if op == "linear_logprobs":
                return logp.gather(1, t[:, None])[:, 0]
            return -(logp.exp() * logp).sum(-1)

        def fused(h, w, t, backend):
            if op == "linear_cross_entropy":
                return ops.linear_cross_entropy(h, w, t, backend=backend)
            if op == "linear_logprobs":
                return ops.linear_logprobs(h, w, t, backend=backend)
            return ops.linear_entropy(h, w, backend=backend)
        return make, eager, fused
    if op == "kl":
        N = shape["N"]
        return (lambda: (rand(N, grad=True), rand(N)),
                lambda a, b: reference.kl(a, b, "k3"),
                lambda a, b, backend: ops.kl(a, b, "k3", backend=backend))
    if op == "segment_sum":
        N, S = shape["N"], shape["S"]
        return (lambda: (rand(N, grad=True), torch.randint(0, S, (N,), generator=g).to(device)),
                lambda v, i: reference.segment_sum(v, i, S),
                lambda v, i, backend: ops.segment_sum(v, i, S, backend=backend))
    if op == "group_advantages":
        N, G = shape["N"], shape["G"]
        return (lambda: (rand(N, grad=True),),
                lambda r: reference.group_advantages(r, torch.arange(N, device=device) // G, N // G),
                lambda r, backend: ops.group_advantages(r, group_size=G, backend=backend))
    if op == "policy_loss":
        B, T = shape["B"], shape["T"]

        def make():
            old = -torch.rand(B, T, generator=g).to(device)
            return ((old + 0.1 * torch.randn(B, T, generator=g).to(device)).to(dtype).requires_grad_(), old,
                    torch.randn(B, generator=g).to(device), (torch.rand(B, T, generator=g) > 0.2).to(device),
                    old + 0.05)

        return (make,
                lambda lp, old, adv, m, ref: reference.policy_loss(lp, old, adv, m, ref_logprobs=ref, kl_coef=0.05)[0],
                lambda lp, old, adv, m, ref, backend: ops.policy_loss(lp, old, adv, m, ref_logprobs=ref,
                                                                      kl_coef=0.05, backend=backend).loss)
    raise ValueError(f"unknown op {op!r}")


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_memory_baseline() -> int:
    """Resident bytes now, with the peak reset to now: freed temporaries of the input set-up must not hide the
    step's own peak (they would under a never-reset high-water mark)."""
    import ctypes
    import resource

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so "resident" means "live"
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
        rss = _status_bytes("VmRSS")
        if rss is not None and _status_bytes("VmHWM") is not None:
            return rss
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_peak_resident() -> int:
    import resource

    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure(op: str, shape: dict, impl: str, device: str, dtype_name: str, repeats: int) -> dict:
    """Runs in the child process: returns time (ms, median) and peak extra memory (MiB) of forward+backward."""
    import torch

    dtype = getattr(torch, dtype_name)

    def implementation(make_case):
        make, eager, fused = make_case
        if impl == "torch-eager":
            return make, eager
        if impl == "torch-compile":
            return make, torch.compile(eager, dynamic=False)
        backend = impl.split(":", 1)[1]
        return make, lambda *a: fused(*a, backend)

    def step_of(make, fn):
        inputs = make()
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

        def step():
            for t in leaves:
                t.grad = None
            out = fn(*inputs)
            out.float().sum().backward()
        return step

    # Warm up on the quick preset's shape first: one-time costs (torch.library's first dispatch of a custom op
    # holds ~100 MiB, BLAS buffers, thread pools) are process set-up, not the op's memory at the measured shape.
    step_of(*implementation(_make_case(op, PRESETS["quick"][op][0], device, dtype)))()
    step = step_of(*implementation(_make_case(op, shape, device, dtype)))

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _cpu_memory_baseline()
    step()  # first run: compilation for torch.compile, and the memory high-water mark
    sync()
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _cpu_peak_resident() - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"time_ms": statistics.median(times), "time_ms_min": min(times), "peak_extra_mib": peak / 2 ** 20}


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _implementations(device: str, with_compile: bool) -> list[str]:
    from ra3 import ops

    impls = ["torch-eager"] + (["torch-compile"] if with_compile else [])
    return impls + [f"ra3:{b}" for b in ops.available_backends(device) if b != "torch"] + ["ra3:torch"]


def _markdown(report: dict) -> str:
    rows = ["| op | shape | implementation | fwd+bwd ms (median) | peak extra MiB | speed-up vs eager |",
            "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            rows.append(f"| {r['op']} | {r['shape']} | {r['impl']} | error: {r['error']} | | |")
            continue
        rows.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {r['time_ms']:.1f} | {r['peak_extra_mib']:.1f} "
                    f"| {r.get('speedup_vs_eager', float('nan')):.2f}x |")
    head = [f"# ra3 op benchmark: {report['device_name']}", "",
            f"- command: `{report['command']}`", f"- date: {report['date']}",
            f"- versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}",
            f"- dtype: {report['dtype']}, repeats: {report['repeats']}, threads: {report['threads']}", ""]
    return "\n".join(head + rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ra3 bench", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--ops", default=None, help="comma-separated subset of the preset's ops")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one measurement, in its own process
        spec = json.loads(args.child)
        print(json.dumps(_measure(spec["op"], spec["shape"], spec["impl"], args.device, args.dtype, args.repeats)))
        return 0
    import torch

    import ra3

    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    preset = PRESETS[args.preset]
    wanted = preset if args.ops is None else {k: preset[k] for k in args.ops.split(",") if k in preset}
    unknown = set() if args.ops is None else set(args.ops.split(",")) - set(preset)
    if unknown:
        parser.error(f"--ops: unknown op(s) {sorted(unknown)}; choose from {sorted(preset)}")
    root = Path(__file__).resolve().parent.parent
    rows = []
    for op, shapes in wanted.items():
        for shape in shapes:
            for impl in _implementations(args.device, not args.no_compile):
                spec = json.dumps({"op": op, "shape": shape, "impl": impl})
                cmd = [sys.executable, "-m", "benchmarks.ops", "--child", spec, "--device", args.device,
                       "--dtype", args.dtype, "--repeats", str(args.repeats)]
                proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
                row = {"op": op, "shape": shape, "impl": impl}
                if proc.returncode == 0:
                    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                else:
                    row["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
                rows.append(row)
                shown = f"{row['time_ms']:9.1f} ms {row['peak_extra_mib']:9.1f} MiB" if "time_ms" in row \
                    else row["error"]
                print(f"{op:18s} {json.dumps(shape):32s} {impl:16s} {shown}", flush=True)
    for row in rows:
        eager = next((r for r in rows if r["op"] == row["op"] and r["shape"] == row["shape"]
                      and r["impl"] == "torch-eager" and "time_ms" in r), None)
        if eager and "time_ms" in row:
            row["speedup_vs_eager"] = eager["time_ms"] / row["time_ms"]
            row["memory_vs_eager"] = row["peak_extra_mib"] / max(eager["peak_extra_mib"], 1e-9)
    now = _dt.datetime.now(_dt.timezone.utc)
    report = {
        "command": " ".join(["python -m benchmarks.ops"] + (argv if argv is not None else sys.argv[1:])),
        "date": now.isoformat(timespec="seconds"), "device": args.device, "device_name": _device_name(args.device),
        "dtype": args.dtype, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "versions": {"ra3": ra3.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "rows": rows,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ops-{args.preset}-{args.device}-{now:%Y%m%d}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(_markdown(report))
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

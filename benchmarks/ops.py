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
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._report import RESULTS, command, device_name, status_bytes, versions, write_report

_LINEAR_GPU = [dict(N=n, H=h, V=v) for n in (4096, 16384, 65536) for h in (2048, 4096) for v in (32000, 151936)]

# op -> list of shape dicts, per preset. 'cpu' holds the CPU target (N=2048, H=512, V=32000); 'gpu' the
# GPU comparison's shapes (run it with --dtype bfloat16).
PRESETS = {
    "gpu": {
        "linear_cross_entropy": _LINEAR_GPU,
        "linear_logprobs": _LINEAR_GPU,
        "linear_grpo": [dict(B=8, T=512, H=2048, V=32000), dict(B=16, T=1024, H=4096, V=151936)],
        "kl": [dict(N=1 << 28)],
        "segment_sum": [dict(N=1 << 28, S=1 << 16)],
        "group_advantages": [dict(N=1 << 26, G=16)],
        "policy_loss": [dict(B=4096, T=16384)],
    },
    "cpu": {
        "linear_logprobs": [dict(N=2048, H=512, V=32000)],
        "linear_entropy": [dict(N=2048, H=512, V=32000)],
        "linear_cross_entropy": [dict(N=2048, H=512, V=32000)],
        "linear_grpo": [dict(B=4, T=512, H=512, V=32000)],
        "kl": [dict(N=1 << 22)],
        "segment_sum": [dict(N=1 << 22, S=4096)],
        "group_advantages": [dict(N=1 << 20, G=16)],
        "policy_loss": [dict(B=256, T=4096)],
    },
    "quick": {
        "linear_logprobs": [dict(N=256, H=64, V=2000)],
        "linear_entropy": [dict(N=256, H=64, V=2000)],
        "linear_cross_entropy": [dict(N=256, H=64, V=2000)],
        "linear_grpo": [dict(B=4, T=64, H=64, V=2000)],
        "kl": [dict(N=1 << 14)],
        "segment_sum": [dict(N=1 << 14, S=64)],
        "group_advantages": [dict(N=1 << 12, G=8)],
        "policy_loss": [dict(B=16, T=256)],
    },
}


def _liger(h, w, t):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss()(w, h, t)


def _cce(h, w, t):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(h, w, t)


# GRPO's loss as the benchmark's linear_grpo case computes it: PPO-clipped surrogate (0.2 / 0.2) plus a k3 KL
# penalty of this weight, per sequence token-mean then batch mean (Liger's loss_type "grpo", ra3's aggregation
# "seq-mean-token-mean"; the two gave identical losses on a CPU check, 2026-12-01).
GRPO_BETA = 0.05
PRECISION = "default"  # the fused linear ops' precision argument; --precision sets it for the run


def _liger_grpo(h, w, t, mask, adv, old, ref):
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

    loss = LigerFusedLinearGRPOLoss(beta=GRPO_BETA, loss_type="grpo", compiled=h.is_cuda)
    out = loss(h, w, t, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
    return out[0] if isinstance(out, tuple) else out


# Peers by op and implementation name: fused linear cross-entropy (mean over tokens, as ra3's
# linear_cross_entropy) and Liger's fused linear GRPO loss; with the module each needs.
PEERS = {"linear_cross_entropy": {"liger": _liger, "cce": _cce}, "linear_grpo": {"liger": _liger_grpo}}
_PEER_MODULES = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}
# Ops whose peers run on CPU too (Liger's chunked losses are plain torch; its other kernels are Triton, CUDA only).
CPU_PEERS = ("linear_grpo",)
# Ops with an unfused ra3 row beside the fused op: 'ra3-unfused:<backend>' (linear_logprobs, then policy_loss).
UNFUSED = ("linear_grpo",)


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
            if backend in PEERS.get(op, {}):
                return PEERS[op][backend](h, w, t)
            if op == "linear_cross_entropy":
                return ops.linear_cross_entropy(h, w, t, precision=PRECISION, backend=backend)
            if op == "linear_logprobs":
                return ops.linear_logprobs(h, w, t, precision=PRECISION, backend=backend)
            return ops.linear_entropy(h, w, precision=PRECISION, backend=backend)
        return make, eager, fused
    if op == "linear_grpo":  # per-token log-probs through the lm_head, then the GRPO policy loss
        B, T, H, V = shape["B"], shape["T"], shape["H"], shape["V"]

        def make():
            old = -4 * torch.rand(B, T, generator=g).to(device)
            ref = old + 0.05 * torch.randn(B, T, generator=g).to(device)
            targets = torch.randint(0, V, (B, T), generator=g).to(device)
            mask = (torch.rand(B, T, generator=g) > 0.1).to(device)
            return (rand(B, T, H, grad=True), rand(V, H, scale=H ** -0.5, grad=True), targets, mask,
                    torch.randn(B, generator=g).to(device), old, ref)

        def loss_of(lp, mask, adv, old, ref, backend="torch"):
            fn = (lambda *a, **k: reference.policy_loss(*a, **k)[0]) if backend == "torch" else \
                (lambda *a, **k: ops.policy_loss(*a, **k, backend=backend).loss)
            return fn(lp, old, adv, mask, ref_logprobs=ref, kl_coef=GRPO_BETA, aggregation="seq-mean-token-mean")

        def eager(h, w, t, mask, adv, old, ref):
            logp = torch.log_softmax((h.reshape(B * T, H) @ w.T).float(), -1)
            return loss_of(logp.gather(1, t.reshape(-1, 1))[:, 0].reshape(B, T), mask, adv, old, ref)

        def fused(h, w, t, mask, adv, old, ref, backend, unfused=False):
            if backend in PEERS[op]:
                return PEERS[op][backend](h, w, t, mask, adv, old, ref)
            if unfused:  # the per-token op (its backward recomputes every logits tile: 4 GEMMs), then the loss
                lp = ops.linear_logprobs(h.reshape(B * T, H), w, t.reshape(-1), precision=PRECISION,
                                         backend=backend).reshape(B, T)
                return loss_of(lp, mask, adv, old, ref, backend)
            return ops.linear_policy_loss(h, w, t, old, adv, mask, ref_logprobs=ref, kl_coef=GRPO_BETA,
                                          aggregation="seq-mean-token-mean", backend=backend).loss
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


def flops(op: str, shape: dict) -> float | None:
    """FLOPs of the fused linear ops' forward+backward: the three [N, H] x [H, V] GEMMs of eager, 6 N H V."""
    if op.startswith("linear_"):
        return 6.0 * shape.get("N", shape.get("B", 0) * shape.get("T", 0)) * shape["H"] * shape["V"]
    return None


def min_bytes(op: str, shape: dict, itemsize: int) -> float | None:
    """Bytes a memory-bound op's forward+backward must move at the least (each input read once, each output
    written once; int64 ids 8 bytes), for its effective bandwidth."""
    if op == "kl":  # fwd: lp, ref -> kl; bwd: lp, ref, grad -> grad_lp
        return 7.0 * shape["N"] * itemsize
    if op == "segment_sum":  # fwd: values, ids -> sums; bwd: grad_sums[ids], ids -> grad_values
        return 2.0 * shape["N"] * (itemsize + 8)
    if op == "group_advantages":  # fwd: rewards -> advantages; bwd: grad, rewards -> grad_rewards
        return 5.0 * shape["N"] * itemsize
    if op == "policy_loss":  # fwd: lp, old, mask, ref -> grad (saved); bwd: grad -> grad_lp
        return 7.0 * shape["B"] * shape["T"] * itemsize
    return None


def device_peaks(device: str, dtype_name: str) -> dict:
    """The device's dense matmul rate (TFLOP/s, in ``dtype``) and copy bandwidth (GB/s, read + write), measured
    here, so each row can say what fraction of the machine it reached."""
    import torch

    dtype = getattr(torch, dtype_name)
    cuda = device == "cuda"
    n = 8192 if cuda else 2048
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def best(fn, repeats=5):
        fn()
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    matmul_s = best(lambda: a @ b)
    a = b = None  # free before the copy buffers
    elements = (1 << 28) if cuda else (1 << 25)  # 1 GiB / 128 MiB of float32
    src = torch.empty(elements, device=device)
    dst = torch.empty_like(src)
    copy_s = best(lambda: dst.copy_(src))
    src = dst = None
    if cuda:
        torch.cuda.empty_cache()
    return {"matmul_tflops": 2 * n ** 3 / matmul_s / 1e12, "matmul_shape": [n, n, n], "matmul_dtype": dtype_name,
            "copy_gbps": 2 * elements * 4 / copy_s / 1e9, "copy_bytes": elements * 4}


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
        rss = status_bytes("VmRSS")
        if rss is not None and status_bytes("VmHWM") is not None:
            return rss
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_peak_resident() -> int:
    import resource

    hwm = status_bytes("VmHWM")
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
        kind, backend = impl.split(":", 1)
        if kind == "ra3-unfused":
            return make, lambda *a: fused(*a, backend, unfused=True)
        return make, lambda *a: fused(*a, backend)

    def step_of(make, fn):
        inputs = make()
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

        def step():
            for t in leaves:
                t.grad = None
            out = fn(*inputs).float().sum()
            out.backward()
            return out.detach()
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
    value = float(step())  # first run: compilation for torch.compile, the memory high-water mark, the result
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
    return {"time_ms": statistics.median(times), "time_ms_min": min(times), "peak_extra_mib": peak / 2 ** 20,
            "value": value}


def _error_line(stderr: str) -> str:
    """The exception line of a failed child (the last line naming an Error / Exception), else its last line."""
    lines = stderr.strip().splitlines() or ["failed"]
    named = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln.strip())]
    return (named or lines)[-1].strip()[:200]


def _implementations(op: str, device: str, with_compile: bool) -> list[str]:
    from ra3 import ops

    impls = ["torch-eager"] + (["torch-compile"] if with_compile else [])
    impls += [f"ra3:{b}" for b in ops.available_backends(device) if b != "torch"] + ["ra3:torch"]
    if op in UNFUSED:
        impls += [f"ra3-unfused:{b}" for b in ops.available_backends(device) if b != "torch"]
    if op in PEERS and (device == "cuda" or op in CPU_PEERS):
        import importlib.util

        impls += [f"peer:{name}" for name in PEERS[op] if importlib.util.find_spec(_PEER_MODULES[name])]
    return impls


def _summary(rows: list[dict]) -> list[dict]:
    """Per (op, shape, implementation) over the rounds of a ``--rounds`` run: the median time, peak memory and
    speed-up against the same round's eager row, and the spread of the speed-ups."""
    out: dict = {}
    for r in rows:
        if "time_ms" in r:
            out.setdefault((r["op"], json.dumps(r["shape"]), r["impl"]), []).append(r)
    summary = []
    for (op, shape, impl), rs in out.items():
        ups = [r["speedup_vs_eager"] for r in rs if "speedup_vs_eager" in r]
        summary.append({"op": op, "shape": json.loads(shape), "impl": impl, "rounds": len(rs),
                        "time_ms": statistics.median(r["time_ms"] for r in rs),
                        "peak_extra_mib": statistics.median(r["peak_extra_mib"] for r in rs),
                        **({"speedup_vs_eager": statistics.median(ups), "speedup_min": min(ups),
                            "speedup_max": max(ups)} if ups else {})})
    return summary


def _markdown(report: dict) -> str:
    rounds = report.get("rounds", 1) > 1
    rows = ["| op | shape | implementation | " + ("round | " if rounds else "") + "fwd+bwd ms (median) "
            "| peak extra MiB | speed-up vs eager | rate | output vs eager |",
            "|---|---|---|" + ("---|" if rounds else "") + "---|---|---|---|---|"]
    for r in report["rows"]:
        rnd = f" {r.get('round', '')} |" if rounds else ""
        if "error" in r:
            rows.append(f"| {r['op']} | {r['shape']} | {r['impl']} |{rnd} error: {r['error']} | | | | |")
            continue
        rate = ""
        if "tflops" in r:
            rate = f"{r['tflops']:.2f} TFLOP/s" + (f" ({100 * r['matmul_fraction']:.0f}% of matmul)"
                                                    if "matmul_fraction" in r else "")
        elif "gbps" in r:
            rate = f"{r['gbps']:.1f} GB/s" + (f" ({100 * r['copy_fraction']:.0f}% of copy)"
                                               if "copy_fraction" in r else "")
        diff = f"{r['value_rel_diff']:.1e}" if "value_rel_diff" in r else ""
        rows.append(f"| {r['op']} | {r['shape']} | {r['impl']} |{rnd} {r['time_ms']:.1f} | {r['peak_extra_mib']:.1f} "
                    f"| {r.get('speedup_vs_eager', float('nan')):.2f}x | {rate} | {diff} |")
    if rounds:
        rows += ["", f"Over the {report['rounds']} rounds (each round runs every implementation once, in turn; "
                 "speed-up against the same round's eager row):", "",
                 "| op | shape | implementation | rounds | median ms | median peak extra MiB "
                 "| speed-up vs eager: median (min-max) |", "|---|---|---|---|---|---|---|"]
        for r in report.get("summary", []):
            up = (f"{r['speedup_vs_eager']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})"
                  if "speedup_vs_eager" in r else "")
            rows.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {r['rounds']} | {r['time_ms']:.1f} "
                        f"| {r['peak_extra_mib']:.1f} | {up} |")
    head = [f"# ra3 op benchmark: {report['device_name']}", "",
            f"- command: `{report['command']}`", f"- date: {report['date']}",
            f"- versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}",
            f"- dtype: {report['dtype']}, repeats: {report['repeats']}, threads: {report['threads']}"
            + (f", rounds: {report['rounds']}" if report.get("rounds", 1) > 1 else "")]
    if report.get("load"):
        head.append(f"- load average (1 min) before each round: {', '.join(f'{x:.2f}' for x in report['load'])} "
                    f"on {report.get('cpus', '?')} CPUs")
    if report.get("peaks"):
        p = report["peaks"]
        head.append(f"- measured peaks: {p['matmul_tflops']:.2f} TFLOP/s {p['matmul_dtype']} matmul "
                    f"{p['matmul_shape']}, {p['copy_gbps']:.1f} GB/s copy (read + write of {p['copy_bytes'] >> 20} MiB)")
    head += ["- rate: TFLOP/s of the 6 N H V GEMM FLOPs (linear ops), or GB/s of the least bytes the op must move "
             "(memory-bound ops)",
             "- output vs eager: relative difference of the summed output (loss or per-token values) from eager's",
             ""]
    return "\n".join(head + rows) + "\n"


def _derive(rows: list[dict], peaks: dict | None, dtype_name: str) -> None:
    """Adds each measured row's rate (TFLOP/s or GB/s, fractions of the peaks) and its comparison with eager."""
    import torch

    for row in rows:
        eager = next((r for r in rows if r["op"] == row["op"] and r["shape"] == row["shape"]
                      and r.get("round") == row.get("round") and r["impl"] == "torch-eager" and "time_ms" in r),
                     None)
        if "time_ms" in row:
            seconds = row["time_ms"] * 1e-3
            if flops(row["op"], row["shape"]):
                row["tflops"] = flops(row["op"], row["shape"]) / seconds / 1e12
                if peaks:
                    row["matmul_fraction"] = row["tflops"] / peaks["matmul_tflops"]
            itemsize = getattr(torch, dtype_name).itemsize
            if min_bytes(row["op"], row["shape"], itemsize):
                row["gbps"] = min_bytes(row["op"], row["shape"], itemsize) / seconds / 1e9
                if peaks:
                    row["copy_fraction"] = row["gbps"] / peaks["copy_gbps"]
        if eager and "time_ms" in row:
            # Every implementation computes the same function of the same inputs: the sum of its output (the
            # loss, or the per-token values summed) says whether it did.
            row["value_rel_diff"] = abs(row["value"] - eager["value"]) / max(abs(eager["value"]), 1e-30)
            row["speedup_vs_eager"] = eager["time_ms"] / row["time_ms"]
            row["memory_vs_eager"] = row["peak_extra_mib"] / max(eager["peak_extra_mib"], 1e-9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ra3 bench", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--ops", default=None, help="comma-separated subset of the preset's ops")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="run every implementation this many times, in turn "
                        "(interleaved, so a change in the machine's load falls on all of them); the report adds "
                        "medians over the rounds")
    parser.add_argument("--precision", choices=("default", "high"), default="default",
                        help="the fused linear ops' precision argument (high: bf16 gradient tiles as hi + lo terms)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--impls", default=None, help="comma-separated subset of implementations, e.g. "
                        "torch-eager,ra3:cuda,peer:cce")
    parser.add_argument("--max-shapes", type=int, default=None, help="the first N shapes of each op only")
    parser.add_argument("--no-peaks", action="store_true", help="skip measuring the device's matmul / copy peak")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--name", default=None, help="file name of the report, without .json / .md "
                        "(default ops-<preset>-<device>-<date>)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global PRECISION
    PRECISION = args.precision
    if args.child:  # one measurement, in its own process
        spec = json.loads(args.child)
        print(json.dumps(_measure(spec["op"], spec["shape"], spec["impl"], args.device, args.dtype, args.repeats)))
        return 0
    import torch


    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    preset = PRESETS[args.preset]
    wanted = preset if args.ops is None else {k: preset[k] for k in args.ops.split(",") if k in preset}
    unknown = set() if args.ops is None else set(args.ops.split(",")) - set(preset)
    if unknown:
        parser.error(f"--ops: unknown op(s) {sorted(unknown)}; choose from {sorted(preset)}")
    root = Path(__file__).resolve().parent.parent
    peaks = None if args.no_peaks else device_peaks(args.device, args.dtype)
    if peaks:
        print(f"device peaks: {peaks['matmul_tflops']:.1f} TFLOP/s {args.dtype} matmul, "
              f"{peaks['copy_gbps']:.1f} GB/s copy", flush=True)
    rows = []
    load: list[float] = []
    now = _dt.datetime.now(_dt.timezone.utc)

    def write(announce: bool = True) -> None:
        # Rewritten after every row, so a run stopped early (a time cap on a lent GPU) keeps what it measured.
        _derive(rows, peaks, args.dtype)
        report = {
            "command": command("benchmarks.ops", argv if argv is not None else sys.argv[1:]),
            "date": now.isoformat(timespec="seconds"), "device": args.device,
            "device_name": device_name(args.device), "dtype": args.dtype, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "versions": versions(), "peaks": peaks, "rows": rows,
        }
        if args.rounds > 1:
            report.update(rounds=args.rounds, summary=_summary(rows), load=load, cpus=os.cpu_count())
        name = args.name or f"ops-{args.preset}-{args.device}-{now:%Y%m%d}"
        write_report(args.out_dir, name, report, _markdown, announce=announce)

    for op, shapes in wanted.items():
        impls = [i for i in _implementations(op, args.device, not args.no_compile)
                 if not args.impls or i in args.impls.split(",")]
        for shape in shapes[:args.max_shapes]:
            for rnd in range(args.rounds):  # every implementation once per round, in turn
                if args.rounds > 1:
                    load.append(os.getloadavg()[0])
                for impl in impls:
                    spec = json.dumps({"op": op, "shape": shape, "impl": impl})
                    cmd = [sys.executable, "-m", "benchmarks.ops", "--child", spec, "--device", args.device,
                           "--dtype", args.dtype, "--repeats", str(args.repeats), "--precision", args.precision]
                    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
                    row = {"op": op, "shape": shape, "impl": impl, **({"round": rnd} if args.rounds > 1 else {})}
                    if proc.returncode == 0:
                        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                    else:
                        row["error"] = _error_line(proc.stderr)
                    rows.append(row)
                    shown = f"{row['time_ms']:9.1f} ms {row['peak_extra_mib']:9.1f} MiB" if "time_ms" in row \
                        else row["error"]
                    print(f"{op:18s} {json.dumps(shape):32s} {impl:16s} {shown}", flush=True)
                    write(announce=False)
    write()

    return 0


if __name__ == "__main__":
    sys.exit(main())

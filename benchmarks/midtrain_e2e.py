"""End-to-end RA3 mid-training throughput: E-step and M-step tokens/s, fused ops backend vs the torch reference.

    python -m benchmarks.midtrain_e2e                       # the embedded default, one EM round, CPU
    python -m benchmarks.midtrain_e2e --device cuda --backends torch,auto --e-steps 8 --m-steps 40

Each backend runs the same seeded round of the embedded default (``ra3 midtrain`` with ``backend`` set) in
a fresh temporary run directory; the tokens/s come from the run's own metrics.jsonl (E-step: rollout tokens
per second of rollout + scoring + update; M-step: training tokens per second; annotate: rollout + ELBO pass).
Writes ``benchmarks/results/midtrain_e2e-<device>-<date>.json`` and ``.md`` with the command, device, versions.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._report import RESULTS, command, device_name, versions, write_report


def run_backend(backend: str, args) -> dict:
    from ra3.midtrain import MidtrainConfig, run_midtrain

    with tempfile.TemporaryDirectory(prefix="ra3-e2e-") as tmp:
        cfg = MidtrainConfig(out=tmp, objective="ra3", em_iterations=1, e_steps=args.e_steps, m_steps=args.m_steps,
                             annotate_docs=args.annotate_docs, device=args.device, backend=backend,
                             model=args.model, progress=False, num_samples=0, cpu_threads=args.cpu_threads)
        t0 = time.perf_counter()
        result = run_midtrain(cfg)
        wall = time.perf_counter() - t0
    steps = [r for r in result["records"] if r["kind"] == "step"]
    it = next(r for r in result["records"] if r["kind"] == "iteration")

    def rate(phase):
        rows = [r for r in steps if r["phase"] == phase]
        return sum(r["tokens"] for r in rows) / max(sum(r["time_s"] for r in rows), 1e-9), len(rows)

    e_tps, n_e = rate("e_step")
    m_tps, n_m = rate("m_step")
    return {"backend": backend, "estep_tokens_per_s": round(e_tps, 1), "mstep_tokens_per_s": round(m_tps, 1),
            "annotate_tokens_per_s": round(it["annotate_tokens_per_s"], 1), "e_steps": n_e, "m_steps": n_m,
            "elbo": it["elbo"], "heldout_ntp_loss": it["heldout_ntp_loss"], "wall_s": round(wall, 1)}


def _markdown(report: dict) -> str:
    lines = [f"# RA3 mid-training end to end ({report['date']})", "",
             f"- command: `{report['command']}`", f"- device: {report['device']}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}", "",
             "| backend (resolved) | E-step tokens/s | M-step tokens/s | annotate tokens/s | ELBO | held-out NTP loss "
             "| wall s |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['backend']} ({r['resolved']}) | {r['estep_tokens_per_s']:.0f} | "
                     f"{r['mstep_tokens_per_s']:.0f} | {r['annotate_tokens_per_s']:.0f} | {r['elbo']:.2f} | "
                     f"{r['heldout_ntp_loss']:.4f} | {r['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="torch,auto", help="comma-separated ops backends to compare")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="ra3-tiny")
    parser.add_argument("--e-steps", type=int, default=4)
    parser.add_argument("--m-steps", type=int, default=20)
    parser.add_argument("--annotate-docs", type=int, default=64)
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch

    from ra3.ops import registry

    rows = []
    for backend in args.backends.split(","):
        backend = backend.strip()
        row = run_backend(backend, args)
        # the backend that "auto" picks for the fused vocabulary ops on this device
        row["resolved"] = registry.resolve("logprobs", backend, torch.device(args.device))
        rows.append(row)
        print(json.dumps(row), flush=True)
    date = _dt.datetime.now().strftime("%Y-%m-%d")
    cli_args = sys.argv[1:] if argv is None else argv
    report = {"date": date, "command": command("benchmarks.midtrain_e2e", cli_args),
              "device": device_name(args.device), "rows": rows,
              "versions": versions()}
    print(_markdown(report))
    write_report(args.out, f"midtrain_e2e-{'cuda' if args.device.startswith('cuda') else 'cpu'}-{date}", report,
                 _markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

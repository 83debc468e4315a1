"""Writes ``ra3/ops/auto_order.json``, the per-op, per-device backend order of ``backend="auto"``, from recorded
``benchmarks.ops`` results: for each (device, op), ra3's backends fastest first by median forward+backward time
at the largest measured shape.

    python -m benchmarks.auto_order benchmarks/results/ops-cpu-cpu-20261201.json [more.json ...]

The fused linear ops never rank the ``torch`` backend: it is the reference, which materialises the [N, V]
logits that those ops exist to avoid. A later file overrides an earlier one for the same (device, op).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "ra3" / "ops" / "auto_order.json"

# benchmark op -> registry op
REGISTRY_OP = {"linear_logprobs": "logprobs", "linear_entropy": "entropy", "linear_cross_entropy": "cross_entropy",
               "kl": "kl", "segment_sum": "segment_sum", "group_advantages": "group_advantages",
               "policy_loss": "policy_loss"}
FUSED_LINEAR = {"logprobs", "entropy", "exact_kl", "cross_entropy"}


def _size(shape: dict) -> int:
    out = 1
    for v in shape.values():
        out *= int(v)
    return out


def order_from_report(report: dict) -> dict[str, list[str]]:
    """{registry op: [backend, ...] fastest first} from one benchmarks.ops report."""
    by_op: dict[str, list[dict]] = {}
    for row in report["rows"]:
        if "time_ms" not in row or not row["impl"].startswith("ra3:") or row["op"] not in REGISTRY_OP:
            continue
        by_op.setdefault(REGISTRY_OP[row["op"]], []).append(row)
    out = {}
    for op, rows in by_op.items():
        largest = max(_size(r["shape"]) for r in rows)
        timed = sorted((r["time_ms"], r["impl"].split(":", 1)[1]) for r in rows if _size(r["shape"]) == largest)
        ranked = [b for _, b in timed if not (op in FUSED_LINEAR and b == "torch")]
        if ranked:  # the reference alone ranks nothing
            out[op] = ranked
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.auto_order", description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="benchmarks.ops JSON reports")
    parser.add_argument("--out", type=Path, default=TABLE)
    args = parser.parse_args(argv)
    order: dict[str, dict[str, list[str]]] = {}
    sources = []
    for path in args.reports:
        report = json.loads(path.read_text())
        order.setdefault(report["device"], {}).update(order_from_report(report))
        sources.append({"file": str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT)
                        else str(path), "device_name": report["device_name"], "date": report["date"],
                        "dtype": report["dtype"]})
    table = {"generated_by": "python -m benchmarks.auto_order " + " ".join(map(str, args.reports)),
             "sources": sources, "order": order}
    args.out.write_text(json.dumps(table, indent=2) + "\n")
    print(json.dumps(order, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

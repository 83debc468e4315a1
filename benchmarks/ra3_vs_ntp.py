"""RA3 against NTP mid-training on the embedded base, matched data and budget, and the think-cost ablation.

    python -m benchmarks.ra3_vs_ntp                          # embedded default, 3 EM rounds, c = 0.05 / 0.01 / 0.2
    python -m benchmarks.ra3_vs_ntp --em-iterations 2 --costs 0.05 --set m_steps=20

One ``ra3 midtrain --objective both`` run at the main cost (RA3, then NTP on the same documents in the same
order and the same M-step budget), then RA3 alone at each other cost (NTP does not depend on the cost). Per
round: ELBO, thinks per 100 lines, the E-step's mean q(think), held-out code-only loss (the number the two
objectives are compared on) and held-out NTP loss on plain code. Writes
``benchmarks/results/ra3_vs_ntp-<device>-<date>.{json,md,png}`` with the command, device and versions.
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

KEYS = ("elbo", "thinks_per_100_lines", "think_q_mean", "heldout_code_loss", "heldout_ntp_loss", "mstep_loss",
        "mstep_code_tokens", "estep_tokens", "estep_time_s")


def run(objective: str, cost: float, args, overrides: dict) -> list[dict]:
    from ra3.midtrain import MidtrainConfig, run_midtrain

    with tempfile.TemporaryDirectory(prefix="ra3-vs-ntp-") as tmp:
        cfg = MidtrainConfig(out=tmp, objective=objective, em_iterations=args.em_iterations, think_cost=cost,
                             device=args.device, progress=False, num_samples=0, seed=args.seed)
        cfg = cfg.with_overrides(overrides).validate()
        t0 = time.perf_counter()
        records = run_midtrain(cfg)["records"]
        wall = time.perf_counter() - t0
    rows = []
    for r in records:
        if r.get("kind") == "iteration":
            row = {"objective": r["objective"], "think_cost": cost if r["objective"] == "ra3" else None,
                   "iteration": r["iteration"], **{k: r.get(k) for k in KEYS}, "run_wall_s": round(wall, 1)}
            if r["objective"] == "ntp":
                row["thinks_per_100_lines"] = None  # NTP annotates nothing: no rate to report
            rows.append(row)
    return rows


def _markdown(report: dict) -> str:
    lines = [f"# RA3 vs NTP mid-training ({report['date']})", "", f"- command: `{report['command']}`",
             f"- device: {report['device']}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}", "",
             "| objective | c | round | ELBO | thinks/100 lines | q(think) | held-out code loss | held-out NTP loss "
             "| M-step code tokens |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    for r in report["rows"]:
        lines.append(f"| {r['objective']} | {fmt(r['think_cost'], '{:g}')} | {r['iteration']} | "
                     f"{fmt(r['elbo'], '{:.2f}')} | {fmt(r['thinks_per_100_lines'], '{:.1f}')} | "
                     f"{fmt(r['think_q_mean'], '{:.3f}')} | {fmt(r['heldout_code_loss'], '{:.4f}')} | "
                     f"{fmt(r['heldout_ntp_loss'], '{:.4f}')} | {fmt(r['mstep_code_tokens'], '{}')} |")
    lines += ["", report.get("reading", "")]
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("heldout_code_loss", "held-out code-only loss (nats/token)"),
              ("think_q_mean", "E-step mean q(think) per decision point"),
              ("thinks_per_100_lines", "thinks per 100 lines (annotated rounds)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    groups: dict[str, list[dict]] = {}
    for r in report["rows"]:
        name = "NTP" if r["objective"] == "ntp" else f"RA3 c={r['think_cost']:g}"
        groups.setdefault(name, []).append(r)
    for ax, (key, title) in zip(axes, panels):
        for name, rows in groups.items():
            pts = [(r["iteration"], r[key]) for r in rows if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name, color="black" if name == "NTP" else None)
        ax.set_title(title)
        ax.set_xlabel("EM round")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reading(rows: list[dict], main_cost: float) -> str:
    last = max(r["iteration"] for r in rows)
    final = {(r["objective"], r["think_cost"]): r for r in rows if r["iteration"] == last}
    ntp, ra3 = final.get(("ntp", None)), final.get(("ra3", main_cost))
    out = []
    if ntp and ra3 and ntp["heldout_code_loss"] is not None and ra3["heldout_code_loss"] is not None:
        diff = ra3["heldout_code_loss"] - ntp["heldout_code_loss"]
        out.append(f"After round {last}: held-out code-only loss RA3 (c={main_cost:g}) "
                   f"{ra3['heldout_code_loss']:.4f} vs NTP {ntp['heldout_code_loss']:.4f} "
                   f"({'RA3 lower' if diff < 0 else 'NTP lower' if diff > 0 else 'equal'} by {abs(diff):.4f} nats per "
                   f"token).")
    costs = sorted({r["think_cost"] for r in rows if r["objective"] == "ra3"})
    rates = ", ".join(f"c={c:g}: {final[('ra3', c)]['thinks_per_100_lines']:.1f}" for c in costs
                      if ("ra3", c) in final)
    if rates:
        out.append(f"Thinks per 100 lines in the last round by cost: {rates}.")
    out.append("Each round's ELBO is measured on that round's own sample of documents (annotate_docs), so it is "
               "comparable between objectives and costs within a round, not between rounds.")
    return " ".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--em-iterations", type=int, default=3)
    parser.add_argument("--costs", default="0.05,0.01,0.2", help="think costs; the first one also runs NTP")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="any other midtrain config field, e.g. --set m_steps=20")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    costs = [float(c) for c in args.costs.split(",")]
    rows = run("both", costs[0], args, overrides)
    for cost in costs[1:]:
        rows += run("ra3", cost, args, overrides)
    for r in rows:
        print(json.dumps(r), flush=True)
    date = _dt.datetime.now().strftime("%Y-%m-%d")
    cli_args = sys.argv[1:] if argv is None else argv
    report = {"date": date, "command": command("benchmarks.ra3_vs_ntp", cli_args),
              "device": device_name(args.device), "versions": versions(), "rows": rows,
              "reading": _reading(rows, costs[0])}
    name = f"ra3_vs_ntp-{'cuda' if args.device.startswith('cuda') else 'cpu'}-{date}"
    print(_markdown(report))
    write_report(args.out, name, report, _markdown)
    _plot(report, args.out / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

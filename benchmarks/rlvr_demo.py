"""The RLVR demo recorded: `ra3 rlvr`'s toy preset from the shipped ra3-tiny, and optionally from its RA3 and
NTP mid-trained versions side by side (the paper's downstream experiment, at toy scale).

    python -m benchmarks.rlvr_demo                                   # from ra3-tiny
    python -m benchmarks.rlvr_demo --midtrain runs/midtrain          # + from runs/midtrain/{ra3,ntp}/final

Each run is the toy preset (``RLVRConfig.toy()``, the same seed, tasks and budget) with only the starting model
changed. Writes ``benchmarks/results/rlvr_demo-<device>-<date>.{json,md,png}``: the command, device and versions,
every step's reward, pass rate, KL, entropy and response length, the mean of the first and last 5 steps, and the
curves drawn by ``ra3 plot``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
from pathlib import Path

from benchmarks._report import RESULTS, command, device_name, versions, write_report

KEYS = ("reward_mean", "pass_rate", "ref_kl", "entropy", "response_length")
WINDOW = 5  # steps averaged at the start and at the end


def run(label: str, model: str, out: Path, overrides: dict) -> dict:
    from ra3.rlvr import RLVRConfig
    from ra3.rlvr.trainer import train

    cfg = RLVRConfig.toy(model=model, out=str(out / label), **overrides)
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (out / label / "metrics.jsonl").read_text().splitlines()]
    steps = [{"step": r["step"], **{k: r[k] for k in KEYS}} for r in rows]
    first, last = steps[:WINDOW], steps[-WINDOW:]
    return {"label": label, "model": model, "config": cfg.to_dict(), "steps": steps,
            "first": {k: sum(r[k] for r in first) / len(first) for k in KEYS},
            "last": {k: sum(r[k] for r in last) / len(last) for k in KEYS}}


def _markdown(report: dict) -> str:
    lines = [f"# RLVR demo: the toy preset (`ra3 rlvr`) ({report['date']})", "",
             f"- command: `{report['command']}`", f"- device: {report['device']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"- preset: {report['preset']}", "",
             f"Mean of the first and of the last {WINDOW} steps:", "",
             "| start model | steps | reward first -> last | pass rate first -> last | KL last | entropy first -> last "
             "| response tokens first -> last |", "|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        f, la = r["first"], r["last"]
        lines.append(f"| {r['label']} (`{r['model']}`) | {len(r['steps'])} | {f['reward_mean']:.3f} -> "
                     f"{la['reward_mean']:.3f} | {f['pass_rate']:.3f} -> {la['pass_rate']:.3f} | {la['ref_kl']:.3f} | "
                     f"{f['entropy']:.2f} -> {la['entropy']:.2f} | {f['response_length']:.2f} -> "
                     f"{la['response_length']:.2f} |")
    lines += ["", f"![RLVR demo curves]({report['png']})", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--midtrain", type=Path, help="a `ra3 midtrain` run directory: also start from its "
                                                      "ra3/final and ntp/final")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="an RLVR config field on top of the toy preset, e.g. --set steps=30")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is fastest for this "
                                                                 "model on a busy small machine)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch
    import yaml

    torch.set_num_threads(args.threads)
    from ra3.cli import quiet_libraries

    quiet_libraries("benchmarks.rlvr_demo")  # no transformers bars per checkpoint

    from ra3.rlvr.config import TOY_PRESET

    overrides = {name: yaml.safe_load(value) for name, value in (kv.split("=", 1) for kv in args.set)}
    starts = [("ra3-tiny", "ra3-tiny")]
    if args.midtrain:
        starts += [(f"{o.upper()} mid-trained", str(args.midtrain / o / "final")) for o in ("ra3", "ntp")]
    date = _dt.datetime.now().strftime("%Y-%m-%d")
    name = f"rlvr_demo-cpu-{date}"
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run(label, model, Path(tmp), overrides) for label, model in starts]
        from ra3.plot import plot_runs

        png = plot_runs([Path(tmp) / label for label, _ in starts], args.out / f"{name}.png", metrics=KEYS,
                        labels=[label for label, _ in starts], title="ra3 rlvr (toy preset)")
    report = {"date": date, "command": command("benchmarks.rlvr_demo", sys.argv[1:] if argv is None else argv),
              "device": device_name("cpu"), "versions": versions(), "preset": {**TOY_PRESET, **overrides},
              "runs": runs, "png": png.name}
    print(_markdown(report))
    write_report(args.out, name, report, _markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`ra3 plot`: training curves of one or more runs on one figure, one panel per metric, saved as PNG.

    ra3 plot runs/rlvr-ra3 runs/rlvr-ntp --labels RA3,NTP --metrics reward_mean,pass_rate --out rl.png

A run is a directory holding ``metrics.jsonl`` (or the file itself): one JSON object per step with a
``step`` key, as ``ra3 rlvr`` and ``ra3 midtrain`` write. This is how "RA3-initialised RL converges faster
and higher than NTP-initialised RL" is shown. matplotlib is imported only here.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULT_METRICS = ("reward_mean", "pass_rate", "kl", "entropy", "response_length", "clip_fraction")


def read_metrics(run) -> list[dict]:
    """The rows of a run's metrics.jsonl (``run``: the run directory or the file)."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"run {str(run)!r} has no metrics.jsonl")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno} is not valid JSON: {exc}") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}:{lineno} has no 'step'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average (TensorBoard's smoothing, debiased); weight 0 leaves values as they are."""
    if not 0 <= weight < 1:
        raise ValueError(f"smooth must be in [0, 1), got {weight}")
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def plot_runs(runs: list, out, *, metrics=DEFAULT_METRICS, labels=None, smoothing: float = 0.0,
              title: str | None = None) -> Path:
    """Render ``metrics`` of every run (one line each, per panel) to the PNG ``out``; returns its path.

    Metrics no run logged are skipped; a metric some runs lack is drawn for the others.
    """
    if not runs:
        raise ValueError("runs is empty: give at least one run directory")
    labels = list(labels) if labels else [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"labels has {len(labels)} entries for {len(runs)} runs")
    data = [read_metrics(r) for r in runs]
    present = [m for m in metrics if any(any(m in row for row in rows) for rows in data)]
    if not present:
        raise ValueError(f"none of the metrics {list(metrics)} is in the runs")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    cols = min(3, len(present))
    nrows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, present):
        for rows, label in zip(data, labels):
            points = [(row["step"], row[metric]) for row in rows
                      if isinstance(row.get(metric), (int, float)) and math.isfinite(row[metric])]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, smooth(list(values), smoothing), label=label, linewidth=1.6)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ra3 plot", description="plot metrics.jsonl curves of runs to a PNG")
    p.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", default="curves.png", help="PNG file to write")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric names")
    p.add_argument("--labels", help="comma-separated legend labels, one per run (default: directory names)")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA smoothing weight in [0, 1)")
    p.add_argument("--title")
    args = p.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    try:
        path = plot_runs(args.runs, args.out, metrics=metrics, labels=labels, smoothing=args.smooth,
                         title=args.title)
    except ValueError as exc:
        print(f"ra3 plot: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

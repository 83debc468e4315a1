"""`ra3 plot`: training curves of one or more runs on one figure, one panel per metric, saved as PNG.

    ra3 plot runs/midtrain --out midtrain.png                 # ELBO, thinks, held-out code loss, M-step loss
    ra3 plot runs/rlvr-ra3 runs/rlvr-ntp --labels RA3,NTP --metrics reward_mean,pass_rate --out rl.png

A run is a directory holding ``metrics.jsonl`` (or the file itself), as ``ra3 midtrain`` and ``ra3 rlvr``
write (``ra3.train.run``: every record has its ``kind`` and ``objective``). The plot reads which kind of run it
is: a mid-training run's objectives are ra3 / ntp, with one record per optimizer ``step`` and one per EM
``iteration``; an RLVR run (objective grpo) has one record per step. Each panel draws one kind of record, with the x axis in that record's unit, and one line per (run,
objective), so RA3 and NTP of one run are two lines in distinct colours. A panel is ``metric`` or
``metric@records`` with records one of ``iteration`` (x = EM iteration), ``step`` (x = step), ``e_step`` /
``m_step`` (x = E-steps / M-steps done by that objective, so RA3 and NTP line up on their matched M-step budget).
matplotlib is imported only here.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

RLVR_METRICS = ("reward_mean", "pass_rate", "ref_kl", "entropy", "response_length", "clip_fraction")
MIDTRAIN_METRICS = ("elbo@iteration", "thinks_per_100_lines@iteration", "heldout_code_loss@iteration",
                    "loss@m_step")
DEFAULT_METRICS = {"rlvr": RLVR_METRICS, "midtrain": MIDTRAIN_METRICS}
RECORDS = ("iteration", "step", "e_step", "m_step")  # what may follow '@' in a panel name
X_LABELS = {"iteration": "EM iteration", "step": "step", "e_step": "E-steps done", "m_step": "M-steps done"}
TITLES = {  # panel titles of the metrics people plot most; others are titled by their name
    ("elbo", "iteration"): "ELBO (nats/doc)",
    ("thinks_per_100_lines", "iteration"): "thinks per 100 lines",
    ("heldout_code_loss", "iteration"): "held-out code-only loss",
    ("heldout_ntp_loss", "iteration"): "held-out NTP loss",
    ("mstep_loss", "iteration"): "M-step loss (last step of the round)",
    ("loss", "m_step"): "M-step loss",
    ("return_mean", "e_step"): "E-step return",
    ("reward_mean", "step"): "mean reward",
    ("pass_rate", "step"): "pass rate",
    ("ref_kl", "step"): "KL to the initial policy",
    ("entropy", "step"): "entropy (nats/token)",
    ("response_length", "step"): "response length (tokens)",
    ("clip_fraction", "step"): "clip fraction",
}


# An RLVR record's old metric names -> the names the E-step's records share (ra3/train/update.py).
_RLVR_RENAMED = {"kl": "ref_kl", "loss": "policy_loss", "seconds_generation": "rollout_s", "seconds_reward": "reward_s",
                 "seconds_step": "time_s", "generation_tokens_per_s": "rollout_tokens_per_s"}


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
        if row.get("objective") == "grpo":  # RLVR records written before 2026-12-02 named some metrics otherwise
            row = {_RLVR_RENAMED.get(k, k): v for k, v in row.items()}
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


MIDTRAIN_OBJECTIVES = ("ra3", "ntp")


def run_kind(rows: list[dict]) -> str:
    """'midtrain' when the records' objectives are ``ra3 midtrain``'s, else 'rlvr'."""
    return "midtrain" if any(row.get("objective") in MIDTRAIN_OBJECTIVES for row in rows) else "rlvr"


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


@dataclass
class Line:
    label: str
    xs: list
    ys: list


@dataclass
class Panel:
    metric: str
    records: str  # one of RECORDS
    title: str
    xlabel: str
    lines: list[Line] = field(default_factory=list)


def parse_panel(name: str) -> tuple[str, str | None]:
    """'metric' -> (metric, None); 'metric@records' -> (metric, records), records one of RECORDS."""
    metric, _, records = name.partition("@")
    if not metric or (records and records not in RECORDS):
        raise ValueError(f"metric {name!r} must be NAME or NAME@RECORDS with RECORDS one of {RECORDS}")
    return metric, records or None


def _value(row: dict, metric: str):
    v = row.get(metric)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _selected(rows: list[dict], records: str) -> list[tuple[float, dict]]:
    """(x, row) of the rows of one (run, objective) that a panel of ``records`` draws."""
    if records == "iteration":
        return [(row.get("iteration", 0), row) for row in rows if row.get("kind") == "iteration"]
    if records == "step":
        return [(row["step"], row) for row in rows if row.get("kind", "step") == "step"]
    phase = [row for row in rows if row.get("kind", "step") == "step" and row.get("phase") == records]
    return list(zip(range(1, len(phase) + 1), phase))


def _resolve(metric: str, series: list[tuple[str, list[dict]]]) -> str:
    """Which records a bare metric name is drawn from: EM iterations when any run records it there, else steps."""
    if any(_value(row, metric) is not None for _, rows in series for row in rows if row.get("kind") == "iteration"):
        return "iteration"
    return "step"


def build_panels(runs: list, *, metrics=None, labels=None) -> list[Panel]:
    """The panels ``plot_runs`` draws: one per metric that some run recorded, each with one ``Line`` per (run,
    objective) that has a value there. ``metrics`` default to the runs' kind (DEFAULT_METRICS)."""
    if not runs:
        raise ValueError("runs is empty: give at least one run directory")
    labels = list(labels) if labels else [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"labels has {len(labels)} entries for {len(runs)} runs")
    data = [read_metrics(r) for r in runs]
    kinds = [run_kind(rows) for rows in data]
    if metrics is None:
        if len(set(kinds)) > 1:
            named = ", ".join(f"{label} ({kind})" for label, kind in zip(labels, kinds))
            raise ValueError(f"the runs are of different kinds ({named}): plot them separately, or name the "
                             f"panels with --metrics")
        metrics = DEFAULT_METRICS[kinds[0]]
    # one series per (run, objective), in the order the objectives ran
    series: list[tuple[str, list[dict]]] = []
    for label, rows, kind in zip(labels, data, kinds):
        if kind != "midtrain":  # one objective: a line per run, named by its label
            series.append((label, rows))
            continue
        objectives = list(dict.fromkeys(row.get("objective") for row in rows))
        for objective in objectives:
            name = label if objective is None else objective.upper() if len(runs) == 1 else \
                f"{label} {objective.upper()}"
            series.append((name, [row for row in rows if row.get("objective") == objective]))
    panels = []
    for spec in metrics:
        metric, records = parse_panel(spec)
        records = records or _resolve(metric, series)
        panel = Panel(metric, records, TITLES.get((metric, records), metric if records in ("step", "iteration")
                                                  else f"{metric} ({records.replace('_', '-')})"), X_LABELS[records])
        for name, rows in series:
            points = [(x, _value(row, metric)) for x, row in _selected(rows, records)]
            points = [(x, v) for x, v in points if v is not None]
            if points:
                xs, ys = zip(*points)
                panel.lines.append(Line(name, list(xs), list(ys)))
        if panel.lines:
            panels.append(panel)
    if not panels:
        raise ValueError(f"none of the metrics {list(metrics)} is in the runs")
    return panels


def plot_runs(runs: list, out, *, metrics=None, labels=None, smoothing: float = 0.0,
              title: str | None = None) -> Path:
    """Render the panels of ``build_panels`` to the PNG ``out``; returns its path. Every (run, objective) keeps
    one colour across panels; one legend names them. ``smoothing`` (EMA weight) applies to per-step panels."""
    smooth([], smoothing)  # validates the weight before any work
    panels = build_panels(runs, metrics=metrics, labels=labels)
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(dict.fromkeys(line.label for panel in panels for line in panel.lines))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    cols = min(3, len(panels)) if len(panels) != 4 else 2
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.8 * cols, 3.4 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        per_iteration = panel.records == "iteration"
        for line in panel.lines:
            ys = line.ys if per_iteration else smooth(line.ys, smoothing)
            ax.plot(line.xs, ys, label=line.label, color=colours[line.label], linewidth=1.6,
                    marker="o" if per_iteration or len(line.xs) < 12 else None, markersize=4)
        ax.set_title(panel.title)
        ax.set_xlabel(panel.xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colours[name], linewidth=1.6) for name in names]
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ra3 plot", description="plot metrics.jsonl curves of runs to a PNG")
    p.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", default="curves.png", help="PNG file to write (default: %(default)s)")
    p.add_argument("--metrics", help="comma-separated panels, NAME or NAME@RECORDS with RECORDS one of "
                                     f"{', '.join(RECORDS)} (default: by the runs' kind; midtrain: "
                                     f"{','.join(MIDTRAIN_METRICS)}; rlvr: {','.join(RLVR_METRICS)})")
    p.add_argument("--labels", help="comma-separated legend labels, one per run (default: directory names)")
    p.add_argument("--smooth", type=float, default=0.0,
                   help="EMA smoothing weight in [0, 1) for per-step panels (default: %(default)s)")
    p.add_argument("--title", help="figure title")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
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

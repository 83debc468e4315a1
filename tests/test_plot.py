"""`ra3 plot` reads the kind of run: a mid-training run gets its own panels, one line per (run, objective), one
record kind per panel with the x axis in that record's unit; an RLVR run gets RLVR's."""
from __future__ import annotations

import json

import pytest

from ra3.plot import MIDTRAIN_METRICS, RLVR_METRICS, build_panels, main, parse_panel, run_kind


def _midtrain_rows(rounds: int = 2, e_steps: int = 2, m_steps: int = 3) -> list[dict]:
    """Records in the order `ra3 midtrain` writes them: RA3's rounds (E-steps, M-steps, the round's record),
    then NTP's (M-steps and the round's record; NTP's step counter has no E-steps)."""
    rows = []
    for objective in ("ra3", "ntp"):
        step = 0
        for it in range(rounds):
            for phase, n in (("e_step", e_steps if objective == "ra3" else 0), ("m_step", m_steps)):
                for s in range(n):
                    step += 1
                    metric = {"thinks_per_100_lines": 5.0 + s, "return_mean": -100.0 + step} if phase == "e_step" \
                        else {"loss": 3.0 - 0.1 * step}
                    rows.append({"kind": "step", "objective": objective, "iteration": it, "phase": phase,
                                 "step": step, "phase_step": s + 1, **metric})
            rows.append({"kind": "iteration", "objective": objective, "iteration": it, "step": step,
                         "elbo": -300.0 + 10 * it if objective == "ra3" else None,
                         "thinks_per_100_lines": 1.5 + it if objective == "ra3" else None,
                         "heldout_code_loss": 3.0 - 0.01 * it - (0.001 if objective == "ra3" else 0),
                         "mstep_loss": 2.9 - 0.1 * it})
    return rows


def _write(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def midtrain_run(tmp_path):
    return _write(tmp_path / "midtrain", _midtrain_rows())


@pytest.fixture
def rlvr_run(tmp_path):
    return _write(tmp_path / "rlvr", [{"step": s, "reward_mean": 0.1 * s, "pass_rate": 0.05 * s, "ref_kl": 0.01 * s}
                                      for s in range(1, 6)])


def test_a_midtrain_run_gets_its_own_panels_one_line_per_objective(midtrain_run):
    panels = {(p.metric, p.records): p for p in build_panels([midtrain_run])}
    assert list(panels) == [parse_panel(m) for m in MIDTRAIN_METRICS]
    elbo = panels["elbo", "iteration"]
    assert [line.label for line in elbo.lines] == ["RA3"]  # NTP has no ELBO
    assert elbo.xlabel == "EM iteration" and elbo.lines[0].xs == [0, 1] and elbo.lines[0].ys == [-300.0, -290.0]
    thinks = panels["thinks_per_100_lines", "iteration"]  # the round's rate, not the E-steps' rates
    assert [(line.label, line.ys) for line in thinks.lines] == [("RA3", [1.5, 2.5])]
    code = panels["heldout_code_loss", "iteration"]
    assert [(line.label, line.xs) for line in code.lines] == [("RA3", [0, 1]), ("NTP", [0, 1])]
    # M-step loss: x = M-steps done by each objective, so RA3 (whose steps include E-steps) lines up with NTP
    loss = panels["loss", "m_step"]
    assert [(line.label, line.xs) for line in loss.lines] == [("RA3", list(range(1, 7))), ("NTP", list(range(1, 7)))]
    assert loss.lines[0].ys[:3] == pytest.approx([2.7, 2.6, 2.5])  # steps 3-5 of RA3: after its 2 E-steps
    assert loss.title == "M-step loss" and loss.xlabel == "M-steps done"


def test_no_line_zigzags_between_objectives_or_record_kinds(midtrain_run):
    for spec in ("thinks_per_100_lines", "heldout_code_loss", "thinks_per_100_lines@step", "loss@step",
                 "return_mean@e_step", "step@iteration"):
        for panel in build_panels([midtrain_run], metrics=[spec]):
            for line in panel.lines:
                assert line.xs == sorted(set(line.xs)), (spec, line)


def test_a_bare_metric_takes_the_em_iteration_records_when_there_are_any(midtrain_run):
    (panel,) = build_panels([midtrain_run], metrics=["thinks_per_100_lines"])
    assert panel.records == "iteration"
    (panel,) = build_panels([midtrain_run], metrics=["return_mean"])  # only in step records
    assert panel.records == "step" and [line.label for line in panel.lines] == ["RA3"]
    assert panel.lines[0].xs == [1, 2, 6, 7]  # the run's own step counter


def test_several_runs_name_run_and_objective(midtrain_run, tmp_path):
    other = _write(tmp_path / "other", _midtrain_rows(rounds=1))
    (panel,) = build_panels([midtrain_run, other], metrics=["heldout_code_loss"], labels=["c=0.05", "c=0.2"])
    assert [line.label for line in panel.lines] == ["c=0.05 RA3", "c=0.05 NTP", "c=0.2 RA3", "c=0.2 NTP"]


def test_an_rlvr_run_gets_rlvr_panels(rlvr_run, midtrain_run):
    assert run_kind(json.loads(line) for line in (rlvr_run / "metrics.jsonl").read_text().splitlines()) == "rlvr"
    panels = build_panels([rlvr_run])
    assert [p.metric for p in panels] == [m for m in RLVR_METRICS if m in ("reward_mean", "pass_rate", "ref_kl")]
    assert all(p.xlabel == "step" and [line.label for line in p.lines] == ["rlvr"] for p in panels)
    with pytest.raises(ValueError, match="different kinds.*midtrain.*rlvr"):
        build_panels([midtrain_run, rlvr_run])
    with pytest.raises(ValueError, match="NAME@RECORDS"):
        build_panels([midtrain_run], metrics=["loss@epoch"])


def test_an_older_rlvr_record_is_read_under_the_shared_names(tmp_path):
    """RLVR records from before the E-step and RLVR shared their update's metric names still plot."""
    old = _write(tmp_path / "old", [{"kind": "step", "objective": "grpo", "step": s, "reward_mean": 0.1 * s,
                                     "kl": 0.01 * s, "loss": 1.0, "seconds_step": 2.0} for s in range(1, 4)])
    panels = {p.metric: p for p in build_panels([old])}
    assert list(panels) == ["reward_mean", "ref_kl"] and panels["ref_kl"].lines[0].ys == [0.01, 0.02, 0.03]
    loss, seconds = build_panels([old], metrics=["policy_loss", "time_s"])
    assert loss.lines[0].ys == [1.0, 1.0, 1.0] and seconds.lines[0].ys == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("kind", ["midtrain", "rlvr"])
def test_cli_renders_the_default_panels(kind, midtrain_run, rlvr_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    png = tmp_path / f"{kind}.png"
    assert main([str(midtrain_run if kind == "midtrain" else rlvr_run), "--out", str(png)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    with Image.open(png) as image:
        width, height = image.size
        colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 24)}
    assert width > 400 and height > 300
    blue, orange = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours: RA3, NTP
    assert blue in colours and (orange in colours) == (kind == "midtrain")

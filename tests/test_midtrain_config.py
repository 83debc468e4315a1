"""The midtrain config and CLI: defaults, files, overrides, and bad values that fail at start naming the field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ra3.midtrain import MidtrainConfig, run_midtrain
from ra3.midtrain.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "ra3" / "configs"


def test_default_yaml_spells_out_the_dataclass_defaults():
    data = yaml.safe_load((CONFIGS / "midtrain_default.yaml").read_text())
    assert data == MidtrainConfig().to_dict()
    assert MidtrainConfig.from_file(CONFIGS / "midtrain_default.yaml") == MidtrainConfig()


def test_every_shipped_config_is_valid():
    files = sorted(CONFIGS.glob("midtrain*.yaml"))
    assert len(files) >= 2
    for path in files:
        MidtrainConfig.from_file(path).validate()


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"think_cost": 0.2, "group_size": 8}))
    cfg = MidtrainConfig.from_file(path).with_overrides({"group-size": "3", "corpus_limit": "null", "resume": "no"})
    assert (cfg.think_cost, cfg.group_size, cfg.corpus_limit, cfg.resume) == (0.2, 3, None, False)
    with pytest.raises(ValueError, match="unknown config field"):
        MidtrainConfig.from_dict({"think_costs": 1.0})
    with pytest.raises(ValueError, match="'group_size': cannot parse 'many'"):
        MidtrainConfig().with_overrides({"group_size": "many"})


@pytest.mark.parametrize("field, value, message", [
    ("think_cost", -0.1, "'think_cost': must be >= 0"),
    ("group_size", 1, "'group_size': must be >= 2"),
    ("alpha", 1.0, "'alpha'"),
    ("kl_form", "approx", "'kl_form'"),
    ("objective", "sft", "'objective'"),
    ("em_iterations", 0, "'em_iterations'"),
    ("discount", 0.0, "'discount'"),
    ("m_lr", 0.0, "'m_lr'"),
    ("e_steps", 1.5, "'e_steps': must be an integer"),
    ("text_column", "", "'text_column'"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        MidtrainConfig(**{field: value}).validate()


def test_cli_rejects_bad_values_before_running(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "r"), "--think-cost", "-1"]) == 2
    assert "think_cost" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "r"), "--group-size", "1"]) == 2
    assert "group_size" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):
        main(["--no-such-flag", "1"])


def test_cli_print_config(capsys):
    assert main(["--print-config", "--think-cost", "0.2", "--corpus-limit", "50"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["think_cost"] == 0.2 and data["corpus_limit"] == 50 and data["model"] == "ra3-tiny"


def test_missing_text_column_fails_at_start(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"code": f"def f{i}():\n    return {i}\n"}) for i in range(5)))
    out = tmp_path / "r"
    assert main(["--out", str(out), "--corpus", str(corpus), "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert "'text_column'" in err and "code" in err
    assert not out.exists()  # a failed start leaves no run directory behind
    # the same corpus with the right column runs
    result = run_midtrain(MidtrainConfig(out=str(tmp_path / "ok"), corpus=str(corpus), text_column="code",
                                         objective="ntp", em_iterations=1, m_steps=1, progress=False))
    assert result["status"] == "completed"


def test_a_corpus_directory_without_python_files_fails_in_one_line(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("no code here\n")
    assert main(["--out", str(tmp_path / "r"), "--corpus", str(tmp_path / "src"), "--progress", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ra3 midtrain: error: config field 'corpus'") and "holds no .py files" in err[-1]
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_tokenizer_without_offsets_fails_naming_what_is_needed(tmp_path, monkeypatch):
    from ra3.models import loading

    real = loading.load_model

    def slow_tokenizer(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        return model, type("SlowTokenizer", (), {"is_fast": False})()

    monkeypatch.setattr("ra3.models.load_model", slow_tokenizer)
    with pytest.raises(ValueError, match="config field 'model'.*fast tokenizer.*offset"):
        run_midtrain(MidtrainConfig(out=str(tmp_path), objective="ntp", progress=False))


def test_unknown_model_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="config field 'model'.*no-such-org/no-such-model"):
        run_midtrain(MidtrainConfig(out=str(tmp_path), model="no-such-org/no-such-model", progress=False))
    assert not (tmp_path / "checkpoints").exists()


def test_cli_default_objective_runs_both_modes_on_the_same_budget(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out", str(out), "--em-iterations", "1", "--corpus-limit", "40", "--max-actions", "8", "--e-steps",
            "1", "--e-docs-per-step", "2", "--group-size", "2", "--max-rationale-tokens", "3", "--annotate-docs",
            "8", "--m-steps", "3", "--m-batch-size", "4", "--progress", "false"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    # one line says where the config went; the config itself is in the file, not on stdout
    assert f"ra3 midtrain: config written to {out / 'config.yaml'}" in printed
    assert "think_cost" not in printed and "think_cost: 0.05" in (out / "config.yaml").read_text()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    its = {r["objective"]: r for r in records if r["kind"] == "iteration"}
    assert set(its) == {"ra3", "ntp"}
    m_steps = {o: sum(1 for r in records if r["kind"] == "step" and r["phase"] == "m_step" and r["objective"] == o)
               for o in its}
    assert m_steps == {"ra3": 3, "ntp": 3}
    assert its["ntp"]["elbo"] is None and its["ntp"]["heldout_ntp_loss"] > 0
    table = (out / "summary.md").read_text()
    assert "| ra3 | 0 |" in table and "| ntp | 0 |" in table and "held-out NTP loss" in table
    assert (out / "ntp" / "final" / "config.json").exists()

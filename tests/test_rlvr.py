"""RLVR: config layering, the fused log-prob path against plain logits, unit-test rewards, a short seeded GRPO
run that raises the mean reward, exact resume from a checkpoint, and `ra3 plot` of the curves."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ra3.eval import Sandbox, SandboxConfig, load_tasks
from ra3.rlvr import RLVRConfig, UnitTestReward, toy_tasks
from ra3.rlvr.cli import build_parser, config_from_args
from ra3.rlvr.cli import main as rlvr_main
from ra3.rlvr.config import TOY_PRESET
from ra3.rlvr.trainer import build_batch, response_logprobs, tasks_for_step, train

LEARN_STEPS = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1M-parameter model: one thread beats two on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rlvr") / "run"
    cfg = RLVRConfig.toy(out=str(out), steps=LEARN_STEPS, save_every=4, seed=0)
    train(cfg, progress=False)
    return out, cfg


# ---- the GRPO run -------------------------------------------------------------------------------------------
def test_grpo_raises_the_mean_reward(learning_run):
    out, cfg = learning_run
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, LEARN_STEPS + 1))
    rewards = [r["reward_mean"] for r in rows]
    start, end = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert end > start + 0.05, f"mean reward did not rise: {rewards}"
    # the shipped base solves some tasks from the start, and solves more after a few steps
    passes = [r["pass_rate"] for r in rows]
    assert 0 < passes[0] and sum(passes[-3:]) / 3 > sum(passes[:3]) / 3 + 0.1, f"pass rate did not rise: {passes}"
    assert rows[-1]["entropy"] < rows[0]["entropy"]  # the policy sharpened on what the tests reward
    for key in ("reward_mean", "pass_rate", "ref_kl", "entropy", "response_length", "clip_fraction", "tokens_per_s",
                "policy_loss", "grad_norm", "ratio_mean", "rollout_s", "reward_s", "time_s"):
        assert all(isinstance(r[key], (float, int)) and math.isfinite(r[key]) for r in rows), key
    # each statistic within what it measures; the toy run scores partial credit and keeps a KL to the start
    assert cfg.partial_credit and cfg.kl_coef > 0 and cfg.max_new_tokens > 1
    for r in rows:
        assert 0 <= r["pass_rate"] <= r["reward_mean"] <= 1, r  # a passed sample scores 1, any other less
        assert 0 <= r["clip_fraction"] <= 1 and r["grad_norm"] >= 0 and r["tokens_per_s"] > 0, r
        assert 0 < r["response_length"] <= cfg.max_new_tokens, r
        assert r["ref_kl"] >= 0, r  # k3 is never negative
    assert rows[0]["ref_kl"] == 0 and rows[-1]["ref_kl"] > 0  # the first step samples the reference policy itself
    assert max(r["response_length"] for r in rows) > 1  # whole-line answers, not one token


def test_checkpoints_are_loadable_models(learning_run):
    out, _ = learning_run
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-12", "step-8"]  # keep_checkpoints=2 of 4, 8, 12
    from ra3.models import load_model

    model, _ = load_model(out / "checkpoints" / "step-12")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_resume_continues_exactly(learning_run, tmp_path):
    _, cfg = learning_run
    out = tmp_path / "resumed"
    first = cfg.replace(out=str(out), steps=4, save_every=2)
    train(first, progress=False)
    train(first.replace(steps=6), resume=True, progress=False)
    rows, reference = _rows(out), _rows(learning_run[0])
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for got, want in zip(rows, reference[:6]):
        assert got["reward_mean"] == want["reward_mean"], (got["step"], got, want)
        assert got["policy_loss"] == pytest.approx(want["policy_loss"], rel=1e-4, abs=1e-6)


def test_plot_renders_several_runs(learning_run, tmp_path):
    pytest.importorskip("matplotlib")
    from ra3.plot import main as plot_main

    out, _ = learning_run
    png = tmp_path / "curves.png"
    assert plot_main([str(out), str(out / "metrics.jsonl"), "--labels", "a,b", "--metrics",
                      "reward_mean,entropy,not_logged", "--smooth", "0.5", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert plot_main([str(tmp_path / "missing"), "--out", str(png)]) == 2
    assert plot_main([str(out), "--labels", "a,b", "--out", str(png)]) == 2


# ---- the pieces ---------------------------------------------------------------------------------------------
def test_fused_response_logprobs_match_plain_logits():
    from ra3.models import load_model

    model, tok = load_model("ra3-tiny")
    prompts = [tok("def f():\n    return ")["input_ids"], tok("x = ")["input_ids"]]
    responses = [tok(" 1\n")["input_ids"], tok("[1, 2]")["input_ids"]]
    batch = build_batch(prompts, responses, tok.pad_token_id, "cpu")
    with torch.no_grad():
        got, entropy = response_logprobs(model, batch, temperature=0.7, backend="torch", with_entropy=True)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logits = model(ids).logits[0].double() / 0.7
        want = torch.log_softmax(logits, -1)[len(p) - 1:len(p) - 1 + len(r)].gather(1, torch.tensor(r)[:, None])[:, 0]
        torch.testing.assert_close(got[b, :len(r)].double(), want, rtol=1e-4, atol=1e-5)
        assert torch.all(got[b, len(r):] == 0)
    assert entropy > 0
    # gradients reach the model through the fused op
    model.zero_grad()
    response_logprobs(model, batch, temperature=1.0).sum().backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_unit_test_rewards_and_dedup():
    task = toy_tasks(4, seed=0)[3]  # every fourth toy task: "Return the integer k"
    assert task.meta["kind"] == "integer"
    k = int(task.reference)
    reward = UnitTestReward(Sandbox(SandboxConfig(timeout=5.0)), partial_credit=True)
    completions = [f" {k}", f" {k}", " 'no'", " nope(", f" {k + 1}"]
    rewards, results = reward([task] * 5, completions)
    assert rewards == pytest.approx([1.0, 1.0, 1 / 3, 0.0, 2 / 3])
    assert results[0] is results[1]  # the duplicate ran once
    binary, _ = UnitTestReward(Sandbox(), partial_credit=False)([task] * 2, [f" {k}", " 'no'"])
    assert binary == [1.0, 0.0]


def test_toy_tasks_have_graded_tests_their_references_pass():
    tasks = toy_tasks(12, seed=3)
    assert [t.meta["kind"] for t in tasks[:4]] == ["argument", "argument", "constant", "integer"]
    assert [t.task_id for t in toy_tasks(12, seed=3)] == [t.task_id for t in tasks]  # deterministic
    reward = UnitTestReward(Sandbox(SandboxConfig(timeout=5.0)), partial_credit=True)
    right, _ = reward(tasks, [t.reference for t in tasks])
    empty, _ = reward(tasks, ["" for _ in tasks])  # a bare `return`: loads, nothing more (unless None is right)
    assert right == [1.0] * len(tasks)
    assert all(e == 1 if t.reference == " None" else 0 < e < 1 for t, e in zip(tasks, empty)), empty
    for t in tasks:
        assert t.prompt.endswith("    return") and t.stop == ("\n",) and f"Return {t.reference.strip()}." in t.prompt
    with pytest.raises(ValueError, match="completions"):
        reward(tasks, ["1"])


def test_tasks_for_step_cycles_through_a_seeded_shuffle():
    cfg = RLVRConfig.toy(num_toy_tasks=8, prompts_per_step=4)
    tasks = toy_tasks(8)
    epoch = [t.task_id for step in (0, 1) for t in tasks_for_step(tasks, cfg, step)]
    assert sorted(epoch) == sorted(t.task_id for t in tasks)  # one epoch covers every task once
    assert [t.task_id for t in tasks_for_step(tasks, cfg, 3)] == [t.task_id for t in tasks_for_step(tasks, cfg, 3)]


def test_rl_task_sources():
    from ra3.rlvr.trainer import load_rl_tasks

    assert [t.task_id for t in load_rl_tasks(RLVRConfig.toy(num_toy_tasks=3))] == ["toy/0", "toy/1", "toy/2"]
    humaneval = load_rl_tasks(RLVRConfig(tasks="humaneval"))  # any ra3.eval benchmark can be the RL task set
    assert [t.task_id for t in humaneval] == [t.task_id for t in load_tasks("humaneval")]


# ---- config and CLI -----------------------------------------------------------------------------------------
def test_config_layers_preset_file_flags(tmp_path):
    parser = build_parser()
    cfg = config_from_args(parser.parse_args([]))
    assert cfg.model == "ra3-tiny" and cfg.lr == TOY_PRESET["lr"]  # bare `ra3 rlvr`: the toy preset
    cfg = config_from_args(parser.parse_args(["--model", "some/model"]))
    assert cfg.lr == RLVRConfig().lr and cfg.max_new_tokens == 512  # a real model: the dataclass defaults
    path = tmp_path / "rlvr.yaml"
    path.write_text("model: my/model\ntasks: mbpp\nlr: 2.0e-6\ngroup_size: 4\n")
    cfg = config_from_args(parser.parse_args(["--config", str(path), "--group-size", "16", "--no-partial-credit"]))
    assert (cfg.model, cfg.tasks, cfg.lr, cfg.group_size, cfg.partial_credit) == ("my/model", "mbpp", 2e-6, 16, False)
    (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        RLVRConfig.from_file(tmp_path / "bad.yaml")


@pytest.mark.parametrize("changes,match", [({"group_size": 1}, "group_size"), ({"lr": 0}, "lr"),
                                           ({"tasks": "apps"}, "tasks"), ({"advantage": "z"}, "advantage"),
                                           ({"clip_low": 1.0}, "clip_low"), ({"steps": 0}, "steps"),
                                           ({"temperature": 0.0}, "temperature")])
def test_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        RLVRConfig(**changes)


def test_cli_reports_bad_config(tmp_path, capsys):
    assert rlvr_main(["--group-size", "1", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "group_size" in capsys.readouterr().err


def test_help_shows_the_defaults_in_use_and_says_what_each_option_does():
    import dataclasses

    parser = build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and not action.help.startswith("("), f"{action.option_strings} has no help text"
    by_dest = {a.dest: a.help for a in parser._actions}
    for field in dataclasses.fields(RLVRConfig):
        if field.name in TOY_PRESET and TOY_PRESET[field.name] != field.default:
            # bare `ra3 rlvr` runs the toy preset: its value is the one shown first
            assert by_dest[field.name].endswith(f"(default: {TOY_PRESET[field.name]!r} with the toy preset, "
                                                f"{field.default!r} otherwise)"), by_dest[field.name]
        else:
            assert by_dest[field.name].endswith(f"(default: {field.default!r})"), by_dest[field.name]
    parser.format_help()  # no stray % in any help text


def test_demo_record_script_writes_json_markdown_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.rlvr_demo import main as demo_main

    assert demo_main(["--set", "steps=2", "--set", "num_toy_tasks=4", "--set", "prompts_per_step=2",
                      "--set", "group_size=2", "--out", str(tmp_path)]) == 0
    (record,) = tmp_path.glob("rlvr_demo-cpu-*.json")
    report = json.loads(record.read_text())
    (run,) = report["runs"]
    assert run["model"] == "ra3-tiny" and [s["step"] for s in run["steps"]] == [1, 2]
    assert run["config"]["kl_coef"] == TOY_PRESET["kl_coef"] and run["config"]["steps"] == 2
    assert report["preset"]["steps"] == 2 and record.with_suffix(".png").stat().st_size > 5000
    assert "| ra3-tiny (`ra3-tiny`) | 2 |" in record.with_suffix(".md").read_text()

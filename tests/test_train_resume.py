"""Both trainers resume by rerunning the same command: run the CLI in a subprocess, kill it (SIGKILL, no chance
to clean up) once its first checkpoint is written, rerun the very same command, and the metrics equal those of
an uninterrupted run. Also: the two commands take the same flags for the same things and write the same kind of
records, and the E-step and GRPO take the same update."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# small runs on the ops' PyTorch backend, a checkpoint after every step
COMMANDS = {
    "midtrain": (["--objective", "ra3", "--em-iterations", "1", "--e-steps", "2", "--e-docs-per-step", "2",
                  "--group-size", "2", "--annotate-docs", "8", "--m-steps", "3", "--m-batch-size", "4",
                  "--checkpoint-every", "1", "--num-samples", "0", "--backend", "torch", "--no-progress"],
                 Path("checkpoints") / "ra3" / "latest.pt"),
    "rlvr": (["--steps", "4", "--save-every", "1", "--prompts-per-step", "2", "--group-size", "4",
              "--num-toy-tasks", "4", "--backend", "torch", "--no-progress"],
             Path("checkpoints") / "step-1"),
}
# wall-clock numbers differ between any two runs; everything else must not
TIMING = ("time", "seconds", "_s", "per_s")


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return env


def _command(name: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "ra3.cli", name, "--out", str(out), *COMMANDS[name][0]]


def _records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if not any(t in k for t in TIMING)} for row in rows]


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


def _kill_after(cmd: list[str], path: Path, cwd: Path, limit: float = 300) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``path`` exists (asserting that it was still running)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + limit
        while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"ended before {path} was written: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", ["midtrain", "rlvr"])
def test_killed_and_rerun_writes_the_metrics_of_an_uninterrupted_run(name, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(_command(name, full), tmp_path)
    _kill_after(_command(name, killed), killed / COMMANDS[name][1], tmp_path)
    cut = _records(killed)
    assert len(cut) < len(_records(full))  # it was stopped part-way
    _run(_command(name, killed), tmp_path)  # the same command again: it resumes
    got, want = _records(killed), _records(full)
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            same = a[key] == b[key] or (isinstance(a[key], float) and isinstance(b[key], float)
                                        and math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-9))
            assert same, (name, a["step"], key, a[key], b[key])
    # and the record shape is the run directory's: every record has its kind, objective and step
    assert all({"kind", "objective", "step"} <= set(r) for r in got)


def test_both_commands_take_the_same_flags_for_the_same_things():
    from ra3.midtrain.cli import _parser as midtrain_parser
    from ra3.rlvr.cli import build_parser as rlvr_parser
    from ra3.train.config import SHARED_FIELDS

    parsers = {"midtrain": midtrain_parser(), "rlvr": rlvr_parser()}
    for field in SHARED_FIELDS:
        flags = {name: {s for a in p._actions if a.dest == field for s in a.option_strings}
                 for name, p in parsers.items()}
        assert flags["midtrain"] == flags["rlvr"] and f"--{field}" in flags["rlvr"], (field, flags)
    for p in parsers.values():
        for argv, want in ((["--resume"], True), (["--resume", "false"], False), (["--no-resume"], False),
                           (["--no-progress"], False), (["--progress", "no"], False)):
            args = p.parse_args(argv)
            assert getattr(args, argv[0].lstrip("-").removeprefix("no-")) is want, argv
        with pytest.raises(SystemExit):
            p.parse_args(["--resume", "maybe"])


def test_the_e_step_and_grpo_take_the_same_update():
    import ra3.midtrain.e_step as e_step
    import ra3.rlvr.trainer as trainer
    from ra3.train import update

    assert e_step.policy_gradient_update is update.policy_gradient_update
    assert trainer.policy_gradient_update is update.policy_gradient_update


@pytest.mark.parametrize("aggregation, minibatch_size", [("token-mean", 0), ("seq-mean-token-mean", 2),
                                                         ("dr-grpo", 3)])
def test_policy_gradient_update_is_ppo_steps_over_minibatches(aggregation, minibatch_size):
    """Against the same steps written out: per minibatch (torch's RNG shuffles the order when there are several),
    ops.policy_loss of the current log-probs, backward, clip, SGD."""
    import torch

    from ra3 import ops
    from ra3.train.update import PolicyTokens, UpdateConfig, policy_gradient_update

    B, T, V = 5, 4, 7
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, V, (B, T), generator=g)
    weights = torch.rand(B, T, generator=g) > 0.3
    advantages = torch.randn(B, generator=g)
    start = torch.randn(B, T, V, generator=g)

    def logprobs(model, index):  # a "policy" whose parameter is its logits
        return torch.log_softmax(model.weight[index], -1).gather(-1, targets[index, :, None])[..., 0]

    def policy():
        model = torch.nn.Module()
        model.weight = torch.nn.Parameter(start.clone())
        return model

    with torch.no_grad():
        old = logprobs(policy(), torch.arange(B)) - 0.05  # sampled by a slightly different policy
        ref = old + 0.1
    cfg = UpdateConfig(epochs=2, minibatch_size=minibatch_size, clip_low=0.1, clip_high=0.1, kl_coef=0.2,
                       aggregation=aggregation, max_completion_length=6, grad_clip=0.5, backend="torch")
    model = policy()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.manual_seed(1)
    stats = policy_gradient_update(model, opt, PolicyTokens(logprobs, old, advantages, weights, ref), cfg)

    want_model = policy()
    want_opt = torch.optim.SGD(want_model.parameters(), lr=0.5)
    torch.manual_seed(1)
    losses = []
    mb = minibatch_size or B
    extra = {"max_completion_length": 6} if aggregation == "dr-grpo" else {}
    for _ in range(2):
        order = torch.randperm(B) if mb < B else torch.arange(B)
        for i in range(0, B, mb):
            idx = order[i:i + mb]
            out = ops.policy_loss(logprobs(want_model, idx), old[idx], advantages[idx], weights[idx], clip_low=0.1,
                                  clip_high=0.1, ref_logprobs=ref[idx], kl_coef=0.2, aggregation=aggregation,
                                  backend="torch", **extra)
            want_opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(want_model.parameters(), 0.5)
            want_opt.step()
            losses.append(float(out.loss.detach()))
    torch.testing.assert_close(model.weight, want_model.weight)
    assert stats["policy_loss"] == pytest.approx(sum(losses) / len(losses))
    assert not torch.equal(model.weight, start) and 0 <= stats["clip_fraction"] <= 1 and stats["ref_kl"] > 0


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_fused_head_update_takes_the_same_steps(backend, aggregation):
    """GRPO's path (PolicyTokens.head: ops.linear_policy_loss on hidden states, gradients formed in the forward
    pass) against the log-prob path (ops.linear_logprobs, then ops.policy_loss) on one linear policy: the same
    parameters after two epochs of minibatches, the same statistics."""
    import torch

    from ra3 import ops
    from conftest import require_backend
    from ra3.train.update import HeadInputs, PolicyTokens, UpdateConfig, policy_gradient_update

    require_backend(backend, "linear_policy_loss")
    B, T, H, V = 6, 5, 8, 11
    g = torch.Generator().manual_seed(2)
    inputs = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) > 0.25
    targets[~weights] = -100  # padding: no token there
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    start_proj = torch.randn(H, H, generator=g, dtype=torch.float64) / 3
    start_head = torch.randn(V, H, generator=g, dtype=torch.float64) / 2

    def policy():
        model = torch.nn.Module()
        model.proj = torch.nn.Parameter(start_proj.clone())
        model.head = torch.nn.Parameter(start_head.clone())
        return model

    def head(model, index):
        return HeadInputs(torch.tanh(inputs[index] @ model.proj), model.head, None, targets[index], 0.7)

    def logprobs(model, index):
        h = head(model, index)
        lp = ops.linear_logprobs(h.hidden.reshape(-1, H), h.weight, h.targets.reshape(-1), temperature=0.7,
                                 backend=backend)
        return lp.view(len(index), T)

    with torch.no_grad():
        old = logprobs(policy(), torch.arange(B)) - 0.05 * weights
        ref = old + 0.1 * weights
    cfg = UpdateConfig(epochs=2, minibatch_size=4, clip_low=0.1, clip_high=0.1, kl_coef=0.2, aggregation=aggregation,
                       grad_clip=1.0, backend=backend)
    runs = []
    for tokens in (PolicyTokens(logprobs, old, advantages, weights, ref),
                   PolicyTokens(None, old, advantages, weights, ref, head=head)):
        model = policy()
        torch.manual_seed(3)
        stats = policy_gradient_update(model, torch.optim.SGD(model.parameters(), lr=0.3), tokens, cfg)
        runs.append((model, stats))
    (unfused, s0), (fused, s1) = runs
    torch.testing.assert_close(fused.proj, unfused.proj)
    torch.testing.assert_close(fused.head, unfused.head)
    assert not torch.equal(fused.head, start_head)
    for key in ("policy_loss", "clip_fraction", "ref_kl", "ratio_mean", "grad_norm"):
        assert s1[key] == pytest.approx(s0[key], rel=1e-9, abs=1e-12), key

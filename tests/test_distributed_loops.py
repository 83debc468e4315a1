"""The training loops under torchrun on CPU: 2 gloo processes run `ra3 midtrain` (RA3 and the NTP baseline) and
`ra3 rlvr` with DDP and FSDP2, through the `ra3` command line.

Checks: the NTP baseline's losses match one process on the same global batches; RA3 and RLVR runs finish, only
rank 0 writes metrics and logs, DDP keeps the ranks' weights identical, FSDP2 computes what DDP computes, and a
run stopped mid-E-step (reference policy and optimizer in flight) resumes from its sharded checkpoint to the
same metrics as an uninterrupted run. A real `torchrun` launch, and the errors for bad settings, too.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ra3 import distributed as ranks

TIMING = ("time_s", "rollout_s", "tokens_per_s", "seconds_generation", "seconds_reward", "seconds_step")
# a 2-round RA3 run of the embedded default, shrunk to seconds: 3 E-steps of 4 documents (2 per rank) and 3
# M-steps of 4 sequences per round; checkpoints every 2 steps
MIDTRAIN = dict(objective="ra3", em_iterations=2, corpus_limit=40, max_actions=8, e_steps=3, e_docs_per_step=4,
                group_size=2, max_rationale_tokens=4, annotate_docs=8, m_steps=3, m_batch_size=4,
                checkpoint_every=2, progress=False, num_samples=1, seed=0)
NTP = dict(objective="ntp", em_iterations=1, m_steps=4)


# ---- launching 2 ranks --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, scenario, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with open(os.path.join(out, f"stdout{rank}.txt"), "w") as log:
        sys.stdout = log  # what each rank prints
        ranks.setup()
        try:
            result = scenario(rank, Path(out))
        finally:
            ranks.teardown()
            sys.stdout = sys.__stdout__
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


def _two_ranks(scenario, out: Path) -> list[dict]:
    """Run ``scenario(rank, out) -> dict`` in 2 gloo processes; returns [rank 0's dict, rank 1's]."""
    for attempt in range(2):
        try:
            torch.multiprocessing.spawn(_worker, args=(scenario, _free_port(), str(out)), nprocs=2, join=True)
            break
        except torch.multiprocessing.ProcessRaisedException as exc:
            # another process on this shared machine can grab the free port between probe and bind: retry once
            if attempt or "address already in use" not in str(exc).lower():
                raise
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _digest(model) -> str:
    """A hash of every weight of this rank's model (DDP: the whole model)."""
    h = hashlib.sha256()
    for p in ranks.unwrap(model).parameters():
        h.update(p.detach().cpu().to_local().numpy().tobytes() if hasattr(p, "to_local")
                 else p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not any(k.endswith(t) for t in TIMING)} for r in rows]


def _flags(values: dict) -> list[str]:
    return [arg for k, v in values.items() for arg in ("--" + k.replace("_", "-"), str(v))]


# ---- ra3 midtrain -------------------------------------------------------------------------------------------
def _midtrain_argv(out: Path, strategy: str, **changes) -> list[str]:
    return ["midtrain", "--out", str(out), "--distributed", strategy, *_flags({**MIDTRAIN, **changes})]


def _midtrain_scenario(strategy: str):
    def scenario(rank: int, out: Path) -> dict:
        import ra3.midtrain.loop as loop
        from ra3.cli import main

        digests: list[str] = []
        for name in ("e_step", "m_step"):  # the weights after every update
            def wrapped(model, *args, _step=getattr(loop, name), **kwargs):
                metrics = _step(model, *args, **kwargs)
                digests.append(_digest(model))
                return metrics
            setattr(loop, name, wrapped)
        codes = {"ntp": main(_midtrain_argv(out / "ntp", strategy, **NTP)),
                 "full": main(_midtrain_argv(out / "full", strategy))}
        steps_full = len(digests)
        # stopped after 3 steps, mid E-step: the last checkpoint (step 2) holds the reference policy and the
        # optimizer of the E-step in flight; then resumed to the end
        codes["stopped"] = main(_midtrain_argv(out / "resumed", strategy, stop_after_steps=3))
        ckpt = out / "resumed" / "checkpoints" / "ra3" / "sharded"
        held = ranks.checkpoint_contents(ckpt)
        at = ranks.read_checkpoint_extras(ckpt)["progress"]
        codes["resumed"] = main(_midtrain_argv(out / "resumed", strategy))
        return {"codes": codes, "digests": digests[:steps_full], "held": held,
                "at": [at["phase"], at["phase_step"], at["step"]]}
    return scenario


def _midtrain_ddp(rank, out):
    return _midtrain_scenario("ddp")(rank, out)


def _midtrain_fsdp(rank, out):
    return _midtrain_scenario("fsdp")(rank, out)


@pytest.fixture(scope="module")
def midtrain_ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("midtrain-ddp")
    return out, _two_ranks(_midtrain_ddp, out)


@pytest.fixture(scope="module")
def midtrain_fsdp(tmp_path_factory):
    out = tmp_path_factory.mktemp("midtrain-fsdp")
    return out, _two_ranks(_midtrain_fsdp, out)


@pytest.fixture
def midtrain_runs(request, strategy):
    """{strategy: (run directory, [rank 0's results, rank 1's])} for the test's ``strategy``."""
    return {strategy: request.getfixturevalue(f"midtrain_{strategy}")}


@pytest.fixture(scope="module")
def ntp_single(tmp_path_factory):
    from ra3.midtrain import MidtrainConfig, run_midtrain

    out = tmp_path_factory.mktemp("ntp-single")
    assert not ranks.get_info().distributed
    return run_midtrain(MidtrainConfig(**{**MIDTRAIN, **NTP, "out": str(out)}))["records"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_midtrain_ntp_matches_one_process_on_the_global_batch(midtrain_runs, ntp_single, strategy):
    out, per_rank = midtrain_runs[strategy]
    assert [r["codes"]["ntp"] for r in per_rank] == [0, 0]
    got, want = _rows(out / "ntp" / "metrics.jsonl"), ntp_single
    assert [(r["kind"], r.get("step")) for r in got] == [(r["kind"], r.get("step")) for r in want]
    steps = [(g, w) for g, w in zip(got, want) if g["kind"] == "step"]
    assert len(steps) == NTP["m_steps"]
    for g, w in steps:  # each rank trained on half of each batch; gradients and loss are the whole batch's
        assert g["tokens"] == w["tokens"]
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4)
    assert steps[-1][1]["loss"] < steps[0][1]["loss"]  # it trains (later steps depend on synced updates)
    assert got[-1]["heldout_ntp_loss"] == pytest.approx(want[-1]["heldout_ntp_loss"], rel=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_midtrain_ra3_finishes_with_one_writer(midtrain_runs, strategy):
    out, per_rank = midtrain_runs[strategy]
    assert [r["codes"]["full"] for r in per_rank] == [0, 0]
    rows = _rows(out / "full" / "metrics.jsonl")
    # written once: 2 rounds x (3 E-steps + 3 M-steps) step records and one record per round
    assert [r["kind"] for r in rows].count("step") == 12 and [r["kind"] for r in rows].count("iteration") == 2
    assert [r["step"] for r in rows if r["kind"] == "step"] == list(range(1, 13))
    for r in rows:
        if r["kind"] == "step":
            assert torch.isfinite(torch.tensor(r["policy_loss" if r["phase"] == "e_step" else "loss"]))
    assert all(r["heldout_ntp_loss"] is not None for r in rows if r["kind"] == "iteration")
    ckpt = out / "full" / "checkpoints" / "ra3"
    assert not (ckpt / "latest.pt").exists()
    files = sorted(p.name for p in (ckpt / "sharded").iterdir())
    assert ".metadata" in files and len([f for f in files if f.endswith(".distcp")]) == 2  # one shard per rank
    assert (out / "full" / "samples" / "ra3-iter1.md").read_text().count("## document") == 1
    from ra3.models import load_model

    model, _ = load_model(out / "full" / "ra3" / "final")  # the gathered, unsharded model
    assert sum(p.numel() for p in model.parameters()) > 0
    logs = [(out / f"stdout{r}.txt").read_text() for r in range(2)]
    assert "ra3 midtrain: config" in logs[0] and "held-out NTP loss" in logs[0]
    assert logs[1] == ""  # rank 1 logs nothing


def test_midtrain_ddp_keeps_the_ranks_weights_identical(midtrain_ddp):
    _, (rank0, rank1) = midtrain_ddp
    assert len(rank0["digests"]) == NTP["m_steps"] + 12
    assert rank0["digests"] == rank1["digests"]  # each rank saw other documents: only synced gradients agree
    # every M-step update changed the weights (an E-step whose rollouts were all alike has nothing to learn)
    n = NTP["m_steps"]
    m_steps = rank0["digests"][:n] + [d for i, d in enumerate(rank0["digests"][n:]) if i % 6 >= 3]
    assert len(set(m_steps)) == len(m_steps)


def test_midtrain_fsdp_computes_what_ddp_computes(midtrain_ddp, midtrain_fsdp):
    ddp = _rows(midtrain_ddp[0] / "full" / "metrics.jsonl")
    fsdp = _rows(midtrain_fsdp[0] / "full" / "metrics.jsonl")
    assert len(ddp) == len(fsdp)
    for a, b in zip(_comparable(ddp), _comparable(fsdp)):
        assert a.keys() == b.keys()
        # the same rollouts (what was sampled, so what each rank trained on) ...
        for k in ("tokens", "thinks_per_100_lines", "rationale_len_mean", "phase", "step"):
            assert b.get(k) == a.get(k), (a["step"], k)
        # ... and the same numbers up to float32 round-off (all-reduce vs reduce-scatter): ~1e-6 after the first
        # update, amplified by the policy gradient's near-cancelling group terms over the steps (the PPO loss
        # itself is such a sum: an absolute tolerance). A rank's gradients left out would be off by far more.
        first_round = a["iteration"] == 0
        for k, v in a.items():
            if isinstance(v, float):
                tol = dict(rel=1e-4, abs=1e-6) if first_round else dict(rel=1e-2, abs=1e-4)
                if k == "policy_loss":
                    tol = dict(abs=1e-4 if first_round else 5e-3)
                assert b[k] == pytest.approx(v, **tol), (a["step"], k)
            else:
                assert b[k] == v, (a["step"], k)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_midtrain_resumes_from_the_sharded_checkpoint(midtrain_runs, strategy):
    out, per_rank = midtrain_runs[strategy]
    assert [(r["codes"]["stopped"], r["codes"]["resumed"]) for r in per_rank] == [(0, 0), (0, 0)]
    held, at = per_rank[0]["held"], per_rank[0]["at"]
    assert at == ["e_step", 2, 2]  # the resumed run restarted at step 2, mid E-step ...
    assert held["optimizer"] and held["modules"] == ["ref"]  # ... with its optimizer and reference policy
    full, resumed = _rows(out / "full" / "metrics.jsonl"), _rows(out / "resumed" / "metrics.jsonl")
    assert _comparable(resumed) == _comparable(full)


# ---- ra3 rlvr -----------------------------------------------------------------------------------------------
RLVR_STEPS = 4


def _rlvr_argv(out: Path, strategy: str, *extra: str) -> list[str]:
    return ["rlvr", "--preset", "toy", "--out", str(out), "--distributed", strategy, "--steps", str(RLVR_STEPS),
            "--save-every", "2", "--no-progress", *extra]


def _helpers(rank: int) -> dict:
    """The loop helpers of ra3.distributed, over 2 ranks."""
    full = list(range(5))
    mine = ranks.shard(full)
    reduced = ranks.reduce_metrics({"loss": [2.0, 5.0][rank], "plain": [1.0, 2.0][rank], "tokens": [3, 4][rank],
                                   "time_s": [0.5, 1.5][rank], "nan_ok": [1.0, float("nan")][rank], "name": "x"},
                                  weights={"loss": [1, 3][rank], "nan_ok": [2, 0][rank]}, sums=("tokens",),
                                  maxes=("time_s",))
    return {"mine": mine, "gathered": ranks.gather_shards(mine),
            "gathered_tensor": ranks.gather_shards(torch.tensor(mine, dtype=torch.float32) * 10).tolist(),
            "reduced": reduced, "scale": float(ranks.scale_for_global_mean(torch.tensor(1.0), [1, 3][rank])),
            "seed": ranks.rank_seed(7), "objects": ranks.gather_objects(f"rank{rank}"),
            "std": ranks.reduce_metrics({"n": 1, "s": -1.0}, stds={"s": [[1.0, 2.0], [4.0]][rank]}, sums=("n",))}


def _rlvr_scenario(rank: int, out: Path) -> dict:
    import ra3.rlvr.trainer as trainer
    from ra3.cli import main

    helpers = _helpers(rank)

    digests: dict[str, list[str]] = {}
    save = trainer.save_step

    def recording(run_out, step, model, *args, **kwargs):
        digests.setdefault(Path(run_out).name, []).append(_digest(model))
        return save(run_out, step, model, *args, **kwargs)

    trainer.save_step = recording
    codes = {"ddp": main(_rlvr_argv(out / "ddp", "ddp")),
             "stopped": main(_rlvr_argv(out / "resumed", "ddp", "--steps", "2")),
             "resumed": main(_rlvr_argv(out / "resumed", "ddp", "--resume")),
             "fsdp": main(_rlvr_argv(out / "fsdp", "fsdp"))}
    return {"codes": codes, "digests": digests["ddp"], "helpers": helpers}


@pytest.fixture(scope="module")
def rlvr_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("rlvr")
    return out, _two_ranks(_rlvr_scenario, out)


def test_loop_helpers_over_two_ranks(rlvr_runs):
    _, per_rank = rlvr_runs
    h0, h1 = (r["helpers"] for r in per_rank)
    assert (h0["mine"], h1["mine"]) == ([0, 2, 4], [1, 3])  # each rank its share ...
    assert h0["gathered"] == h1["gathered"] == [0, 1, 2, 3, 4]  # ... and back in order, everywhere
    assert h0["gathered_tensor"] == h1["gathered_tensor"] == [0.0, 10.0, 20.0, 30.0, 40.0]
    want = {"loss": (2.0 * 1 + 5.0 * 3) / 4, "plain": 1.5, "tokens": 7, "time_s": 1.5, "nan_ok": 1.0, "name": "x"}
    assert h0["reduced"] == h1["reduced"] == want and isinstance(h0["reduced"]["tokens"], int)
    # rank r's mean over its count n_r, rescaled by world * n_r / sum n: DDP's average is the global mean
    assert (h0["scale"], h1["scale"]) == (0.5, 1.5)
    assert h0["seed"] != h1["seed"] and h0["objects"] == h1["objects"] == ["rank0", "rank1"]
    # the sample std of every rank's values together ([1, 2] and [4]), the other keys reduced as they say
    assert h0["std"] == h1["std"] == {"n": 2, "s": pytest.approx(1.5275252316519468)}


def test_rlvr_ddp_finishes_resumes_and_keeps_ranks_identical(rlvr_runs):
    out, (rank0, rank1) = rlvr_runs
    assert rank0["codes"] == rank1["codes"] == {"ddp": 0, "stopped": 0, "resumed": 0, "fsdp": 0}
    rows = _rows(out / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, RLVR_STEPS + 1))  # one writer
    assert all(torch.isfinite(torch.tensor([r["policy_loss"], r["ref_kl"], r["entropy"]])).all() for r in rows)
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in rows)
    # checkpoints: a loadable save_pretrained model and the sharded trainer state
    for step in (2, 4):
        ckpt = out / "ddp" / "checkpoints" / f"step-{step}"
        assert (ckpt / "model.safetensors").exists() and (ckpt / "sharded" / ".metadata").exists()
        assert ranks.read_checkpoint_extras(ckpt / "sharded")["step"] == step
    # DDP: the ranks sampled different prompts, yet hold the same weights at every checkpoint
    assert rank0["digests"] == rank1["digests"] and len(set(rank0["digests"])) == 2
    # stopped at step 2 and resumed from its sharded checkpoint: the same steps as the uninterrupted run
    resumed = _rows(out / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, RLVR_STEPS + 1))
    for got, want in zip(resumed, rows):
        assert got["reward_mean"] == want["reward_mean"], got["step"]
        assert got["policy_loss"] == pytest.approx(want["policy_loss"], rel=1e-4, abs=1e-6)
    logs = [(out / f"stdout{r}.txt").read_text() for r in range(2)]
    assert '"reward_mean"' in logs[0] and logs[1] == ""


def test_rlvr_fsdp_computes_what_ddp_computes(rlvr_runs):
    out, _ = rlvr_runs
    ddp, fsdp = _rows(out / "ddp" / "metrics.jsonl"), _rows(out / "fsdp" / "metrics.jsonl")
    assert [r["step"] for r in fsdp] == list(range(1, RLVR_STEPS + 1))
    for a, b in zip(ddp, fsdp):
        assert b["reward_mean"] == a["reward_mean"] and b["response_length"] == a["response_length"]
        assert b["policy_loss"] == pytest.approx(a["policy_loss"], rel=1e-4, abs=1e-6)
        assert b["entropy"] == pytest.approx(a["entropy"], rel=1e-4)
    from ra3.models import load_model

    model, _ = load_model(out / "fsdp" / "checkpoints" / f"step-{RLVR_STEPS}")  # gathered from the shards
    assert sum(p.numel() for p in model.parameters()) > 0


# ---- a real torchrun launch ---------------------------------------------------------------------------------
def _torchrun(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "ra3.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_torchrun_runs_the_cli_and_refuses_distributed_none(tmp_path):
    proc = _torchrun(*_midtrain_argv(tmp_path / "run", "ddp", **{**NTP, "m_steps": 2}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["kind"] for r in rows] == ["step", "step", "iteration"]
    assert proc.stdout.count("ra3 midtrain: config") == 1  # rank 0 logs, once
    proc = _torchrun(*_midtrain_argv(tmp_path / "none", "none", **{**NTP, "m_steps": 2}))
    assert proc.returncode != 0
    assert "distributed='none' but torchrun started 2 processes" in proc.stderr
    assert not (tmp_path / "none" / "metrics.jsonl").exists()


# ---- one process: the same code, and the errors -------------------------------------------------------------
def test_ddp_in_one_process_is_the_plain_run_with_a_sharded_checkpoint(tmp_path):
    from ra3.midtrain import MidtrainConfig, run_midtrain

    cfg = {**MIDTRAIN, **NTP, "m_steps": 2}
    plain = run_midtrain(MidtrainConfig(**cfg, out=str(tmp_path / "none")))
    single = run_midtrain(MidtrainConfig(**cfg, out=str(tmp_path / "ddp"), distributed="ddp"))
    assert _comparable(single["records"]) == _comparable(plain["records"])
    assert (tmp_path / "ddp" / "checkpoints" / "ntp" / "sharded" / ".metadata").exists()
    assert (tmp_path / "none" / "checkpoints" / "ntp" / "latest.pt").exists()
    again = run_midtrain(MidtrainConfig(**cfg, out=str(tmp_path / "ddp"), distributed="fsdp"))  # finished: kept
    assert _comparable(again["records"]) == _comparable(plain["records"])
    with pytest.raises(ValueError, match="distributed"):  # the other checkpoint format
        run_midtrain(MidtrainConfig(**cfg, out=str(tmp_path / "none"), distributed="ddp"))
    with pytest.raises(ValueError, match="distributed"):
        run_midtrain(MidtrainConfig(**cfg, out=str(tmp_path / "ddp")))


def test_single_process_helpers_leave_things_as_they_are():
    metrics = {"loss": 1.5, "tokens": 3, "name": "x"}
    assert ranks.reduce_metrics(metrics, weights={"loss": 2}, sums=("tokens",)) is metrics
    items = [1, 2, 3]
    assert ranks.shard(items) is items and ranks.gather_shards(items) is items
    loss = torch.tensor(2.0)
    assert ranks.scale_for_global_mean(loss, 7) is loss and ranks.rank_seed(12345) == 12345
    assert ranks.gather_objects({"a": 1}) == [{"a": 1}]
    model = torch.nn.Linear(2, 2)
    assert ranks.forward(model, lambda m: m) is model
    with ranks.full_params(model) as m, ranks.full_params(None) as none:
        assert m is model and none is None and not torch.is_grad_enabled()
    copy_ = ranks.frozen_copy(model)
    assert copy_ is not model and not any(p.requires_grad for p in copy_.parameters())
    assert ranks.wrap_model(model, "ddp") is model


def test_bad_distributed_settings_fail_naming_the_field(tmp_path, monkeypatch, capsys):
    from ra3.cli import main
    from ra3.midtrain import MidtrainConfig
    from ra3.midtrain.loop import _rank_shares
    from ra3.rlvr import RLVRConfig
    from ra3.rlvr.trainer import latest_checkpoint
    from ra3.train.run import read_checkpoint

    with pytest.raises(ValueError, match="'distributed'"):
        MidtrainConfig(distributed="zero3").validate()
    with pytest.raises(ValueError, match="distributed"):
        RLVRConfig(distributed="zero3")
    with pytest.raises(ValueError, match="'engine'"):
        MidtrainConfig(distributed="ddp", engine="vllm").validate()
    assert main(["midtrain", "--distributed", "zero3", "--out", str(tmp_path / "x")]) == 2
    assert "distributed" in capsys.readouterr().err
    # every rank needs a share of each step
    with pytest.raises(ValueError, match="'m_batch_size'"):
        ranks.check_shares(_rank_shares(MidtrainConfig(m_batch_size=2), True, 100, 4), world_size=4)
    with pytest.raises(ValueError, match="'e_docs_per_step'"):
        ranks.check_shares(_rank_shares(MidtrainConfig(e_docs_per_step=3), True, 100, 4), world_size=4)
    ranks.check_shares(_rank_shares(MidtrainConfig(e_docs_per_step=3), True, 100, 3), world_size=3)
    # rlvr splits each step's prompts and minibatches evenly
    with pytest.raises(ValueError, match="'prompts_per_step'"):
        ranks.check_shares({"prompts_per_step": RLVRConfig.toy(prompts_per_step=3).prompts_per_step}, divisible=True,
                           world_size=2)
    with pytest.raises(ValueError, match="'minibatch_size'"):
        ranks.check_shares({"minibatch_size": 3}, divisible=True, world_size=2)
    # 'none' under torchrun would have every process train alone into the same directory
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="distributed='none'"):
        with ranks.session("none"):
            pass
    monkeypatch.delenv("WORLD_SIZE")
    # a checkpoint of the other format is refused, not silently restarted
    ckpt = tmp_path / "rl" / "checkpoints" / "step-2"
    ranks.save_checkpoint(ckpt / "sharded", {"model": torch.nn.Linear(2, 2), "step": 2})  # a ddp / fsdp run's
    assert latest_checkpoint(tmp_path / "rl") == ckpt
    with pytest.raises(ValueError, match="'distributed'.*--distributed ddp or fsdp"):
        read_checkpoint(ckpt)  # in a single process

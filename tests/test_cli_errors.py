"""What a user of the `ra3` command sees when something goes wrong, run as a user runs it (a subprocess): one-line
errors with the exit status 2, nothing left behind by a start that failed, Ctrl-C ending in one line that says
how to resume (exit status 130), no library progress bars, a warning for a corpus that is not Python."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ra3.eval.benchmarks import MBPP_URL


# the runs use the ops' PyTorch backend: these tests are about what the command says, not about the kernels
TORCH_OPS = {"midtrain": ["--backend", "torch"], "rlvr": ["--backend", "torch"]}


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("RANK", None)
    return env


def ra3(*args, cwd, timeout=120, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ra3.cli", *map(str, args)], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ---- one-line errors ----------------------------------------------------------------------------------------
def test_mbpp_without_data_offline_fails_fast_naming_data(tmp_path):
    out = tmp_path / "eval"
    start = time.perf_counter()
    # a hub endpoint that refuses connections and an empty cache: a machine without network
    result = ra3("eval", "--benchmark", "mbpp", "--model", "ra3-tiny", "--out", out, cwd=tmp_path,
                 HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=tmp_path / "hf", HF_DATASETS_CACHE=tmp_path / "hf" / "ds")
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    (line,) = _lines(result.stderr)
    assert line.startswith("ra3 eval: error: mbpp: no --data given, and google-research-datasets/mbpp: the hub is "
                           "not reachable and the local `datasets` cache does not hold it"), line
    assert "pass --data mbpp.jsonl" in line and MBPP_URL in line
    assert seconds < 15, f"took {seconds:.1f} s"  # the hub client's retries took 25 s
    assert not out.exists()


@pytest.mark.parametrize("command", ["midtrain", "rlvr", "eval"])
def test_a_model_path_that_does_not_exist_is_no_such_directory(command, tmp_path):
    out = tmp_path / "run"
    args = {"midtrain": ["--progress", "false"], "rlvr": ["--progress", "false"],
            "eval": ["--benchmark", "humaneval", "--limit", "1", "--no-progress"]}[command]
    result = ra3(command, "--model", "/nonexistent/model", "--out", out, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = _lines(result.stderr)
    assert line.startswith(f"ra3 {command}: error: ") and "'/nonexistent/model': no such directory" in line, line
    assert "Repo id" not in line
    assert not out.exists()  # a failed start leaves no run directory behind


def test_a_failed_start_in_an_existing_directory_leaves_it_as_it_was(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    (out / "config.yaml").write_text("model: earlier\n")
    result = ra3("midtrain", "--model", "./missing-model/", "--out", out, "--progress", "false", cwd=tmp_path)
    assert result.returncode == 2 and "no such directory" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "notes.txt"]  # no metrics.jsonl, tensorboard/
    assert (out / "config.yaml").read_text() == "model: earlier\n"


# ---- Ctrl-C ---------------------------------------------------------------------------------------------------
def _interrupt_after(path: Path, args: list, cwd: Path, limit: float = 120) -> tuple[int, str]:
    """Start `ra3 ARGS`, send SIGINT (Ctrl-C) once ``path`` exists; (exit status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "ra3.cli", *map(str, args)], cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + limit
        while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, f"ended before {path} was written: {proc.stderr.read()}"
        assert path.exists(), f"no {path} after {limit} s"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_ctrl_c_in_midtrain_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    checkpoint = out / "checkpoints" / "ra3" / "latest.pt"
    rc, err = _interrupt_after(checkpoint, ["midtrain", "--out", out, "--checkpoint-every", "1",
                                            "--progress", "false", *TORCH_OPS["midtrain"]], tmp_path)
    assert rc == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert _lines(err)[-1] == f"ra3 midtrain: stopped; rerun the same command to resume from {checkpoint}"
    assert "Loading weights" not in err, err  # transformers' loading bar stays out of a normal run


def test_ctrl_c_in_rlvr_says_how_to_resume_and_no_library_bars_show(tmp_path):
    out = tmp_path / "run"
    rc, err = _interrupt_after(out / "checkpoints" / "step-1", ["rlvr", "--out", out, "--save-every", "1",
                                                                "--no-progress", *TORCH_OPS["rlvr"]], tmp_path)
    assert rc == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = _lines(err)[-1]
    assert last.startswith("ra3 rlvr: stopped; rerun the same command to resume from "
                           f"{out / 'checkpoints'}/step-"), last
    assert Path(last.rsplit(" ", 1)[1]).is_dir()
    # transformers' bars (loading the model, writing each checkpoint) stay out of a normal run
    assert "Loading weights" not in err and "Writing model shards" not in err, err


# ---- a corpus that is not Python ----------------------------------------------------------------------------
def test_a_prose_corpus_is_warned_about_in_one_line(tmp_path):
    corpus = tmp_path / "prose.jsonl"
    corpus.write_text("".join(json.dumps({"content": f"Paragraph {i}. The fox jumps over the dog.\nIt was a "
                                                     f"sunny day, and nobody wrote code.\n"}) + "\n"
                              for i in range(12)))
    result = ra3("midtrain", "--corpus", corpus, "--objective", "ntp", "--em-iterations", "1", "--m-steps", "1",
                 "--stop-after-steps", "1", "--progress", "false", "--out", tmp_path / "run", *TORCH_OPS["midtrain"],
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warned = [line for line in _lines(result.stderr) if "do not parse as Python" in line]
    assert warned == [f"ra3 midtrain: warning: source '{corpus}': 12 of the first 12 documents (column 'content') "
                      f"do not parse as Python; RA3 mid-trains on code: is this the right corpus and text_column?"]


def test_sampled_programs_compiler_warnings_stay_out_of_the_output(tmp_path):
    """The reward compiles every sampled program first (a syntax error needs no process); what the compiler
    warns about a program ("'int' object is not callable") is the program's business, not the run's output."""
    code = ("from ra3.eval.sandbox import Sandbox, TestJob\n"
            "r = Sandbox().run(TestJob('x = 1(2)\\ny = x is 3\\nz = \"\\\\,\"\\n', ('assert True',)))\n"
            "print(r.status)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "failed\n", "")

"""The execution sandbox: correct programs pass, hostile ones fail cleanly within their limits, the host is
untouched. Every hostile program here is bounded even if a protection failed (see each test)."""
from __future__ import annotations

import glob
import os
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ra3.eval import load_tasks
from ra3.eval.sandbox import (IOCase, Sandbox, SandboxConfig, StdioJob, TestJob, outputs_match,
                              processes_of_uid)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs POSIX process groups and rlimits")
_WALL_CLOCK = "wall-clock time limit exceeded"  # the message of a process killed at its timeout


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxConfig(timeout=2.0, max_processes=16))


@pytest.fixture
def watched_dir():
    """A host directory the sandboxed programs can see (0755, outside any private dir) but must not change."""
    root = Path(tempfile.mkdtemp(prefix="ra3-watched-", dir="/tmp"))
    os.chmod(root, 0o755)
    (root / "sub").mkdir()
    os.chmod(root / "sub", 0o755)
    for name, text in (("keep.txt", "precious\n"), ("sub/nested.txt", "also precious\n")):
        (root / name).write_text(text)
        os.chmod(root / name, 0o644)
    yield root
    for path in sorted(root.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    root.rmdir()


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, stat.S_IMODE(p.stat().st_mode),
                                       p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _private_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "ra3-sandbox-*")))


def test_all_humaneval_canonical_solutions_pass(sandbox):
    tasks = load_tasks("humaneval")
    assert len(tasks) == 164
    before = _private_dirs()
    start = time.perf_counter()
    results = Sandbox(SandboxConfig(timeout=10.0)).run_many([t.job(t.reference) for t in tasks], progress=False)
    elapsed = time.perf_counter() - start
    failed = [(t.task_id, r.message) for t, r in zip(tasks, results) if not r.passed]
    assert not failed, failed
    assert elapsed < 60, f"164 canonical solutions took {elapsed:.1f}s"
    assert _private_dirs() == before, "temporary working directories were left behind"


def test_a_wrong_solution_fails_and_partial_credit_counts_tests(sandbox):
    program = "def add(a, b):\n    return a - b\n"
    tests = ("assert add(0, 0) == 0", "assert add(1, 2) == 3", "assert add(2, 0) == 2")
    r = sandbox.run(TestJob(program, tests))
    assert r.status == "failed" and not r.passed and r.tests_passed == 1 and "test 1" in r.message
    r = sandbox.run(TestJob(program, tests, stop_on_failure=False))
    assert (r.tests_passed, r.tests_total) == (2, 3) and r.fraction_passed == pytest.approx(2 / 3)
    assert sandbox.run(TestJob("def add(a, b):\n    return a + b\n", tests)).passed


def test_syntax_errors_fail_without_a_process(sandbox):
    r = sandbox.run(TestJob("def f(:\n", ("assert f()",)))
    assert r.status == "failed" and r.message.startswith("program: SyntaxError") and r.duration_s == 0.0


def test_infinite_loop_times_out(sandbox):
    start = time.perf_counter()
    r = sandbox.run(TestJob("while True:\n    pass\n", ("pass",)))
    # RLIMIT_CPU (ceil(timeout) + 1 s) is above the wall clock, so a one-thread loop meets the wall clock first
    assert r.status == "timeout" and not r.passed and r.message == _WALL_CLOCK
    assert time.perf_counter() - start < sandbox.config.timeout + 3


def test_a_loop_in_a_later_test_keeps_earlier_verdicts(sandbox):
    r = sandbox.run(TestJob("x = 1", ("assert x == 1", "while True: pass"), stop_on_failure=False))
    assert r.status == "timeout" and r.tests_passed == 1 and r.tests_total == 2 and r.message == _WALL_CLOCK


# ---- timeouts: one test per limit, each with a program that only that limit can stop -------------------------
# A sleeping program uses no CPU, so only a wall clock ends it; a busy loop dies at whichever of the wall clock and
# RLIMIT_CPU comes first. Every program here ends by itself after _SELF_END_S seconds and would then pass, so a
# limit that failed turns the verdict into 'passed' (and blows the time bound) at a cost of _SELF_END_S, not a hang.
_SELF_END_S = 20
_SLEEP = f"import time\ntime.sleep({_SELF_END_S})\nprint('woke')\n"
_SPIN = f"import time\nend = time.monotonic() + {_SELF_END_S}\nwhile time.monotonic() < end:\n    pass\nprint('woke')\n"
_WOKE = (IOCase("", "woke"),)  # what either program prints if it is not stopped


def _timed_run(box: Sandbox, job) -> tuple:
    start = time.perf_counter()
    r = box.run(job)
    return r, time.perf_counter() - start


def test_a_sleeping_stdio_case_stops_at_its_own_timeout_not_the_sandbox_default():
    """StdioJob.timeout (the problem's own limit, per case) wins over a long sandbox default. TestJob has no
    per-job timeout: it always runs under the sandbox's."""
    box = Sandbox(SandboxConfig(timeout=30.0))
    r, elapsed = _timed_run(box, StdioJob(_SLEEP, _WOKE, timeout=1.0))
    assert (r.status, r.message, r.tests_passed) == ("timeout", f"case 0: {_WALL_CLOCK}", 0)
    assert 1.0 <= r.duration_s and elapsed < 1.0 + 3


@pytest.mark.parametrize("kind", ["tests", "stdio"])
def test_a_sleeping_program_stops_at_the_sandbox_wall_clock(kind):
    box = Sandbox(SandboxConfig(timeout=1.0))
    job, message = ((TestJob(_SLEEP, ("pass",)), _WALL_CLOCK) if kind == "tests" else
                    (StdioJob(_SLEEP, _WOKE), f"case 0: {_WALL_CLOCK}"))
    r, elapsed = _timed_run(box, job)
    assert (r.status, r.message, r.tests_passed) == ("timeout", message, 0)
    assert 1.0 <= r.duration_s and elapsed < 1.0 + 3


@pytest.mark.parametrize("kind", ["tests", "stdio"])
def test_a_busy_loop_stops_at_the_cpu_time_limit(kind, monkeypatch):
    """RLIMIT_CPU is ceil(timeout) + 1 s of the process's own timeout (the per-case one for stdio): 2 s here. It
    sits above the wall clock, so to test it alone every wall clock the sandbox sets is stretched 100x: within the
    bound only RLIMIT_CPU can stop the loop."""
    box = Sandbox(SandboxConfig(timeout=1.0 if kind == "tests" else 30.0))
    box.capabilities  # probed before the patch, with the real wall clock
    communicate = subprocess.Popen.communicate

    def late_wall_clock(self, input=None, timeout=None):
        return communicate(self, input, None if timeout is None else timeout * 100)

    monkeypatch.setattr(subprocess.Popen, "communicate", late_wall_clock)
    job, message = ((TestJob(_SPIN, ("pass",)), "CPU time limit exceeded") if kind == "tests" else
                    (StdioJob(_SPIN, _WOKE, timeout=1.0), "case 0: CPU time limit exceeded"))
    r, elapsed = _timed_run(box, job)
    assert (r.status, r.message, r.tests_passed) == ("timeout", message, 0)
    # at least the 2 CPU seconds (less a clock tick); at most those on a busy shared machine, far below _SELF_END_S
    assert 1.9 <= r.duration_s and elapsed < 10


@pytest.mark.parametrize("program", [
    "import os\nos.system('echo pwned > /tmp/ra3-pwned')",
    "import subprocess\nsubprocess.run(['sh', '-c', 'echo pwned > /tmp/ra3-pwned'])",
    "import os\nos.popen('echo pwned > /tmp/ra3-pwned')",
    "import os\nos.execv('/bin/sh', ['sh', '-c', 'echo pwned > /tmp/ra3-pwned'])",
], ids=["os.system", "subprocess", "os.popen", "os.execv"])
def test_shell_commands_are_disabled(sandbox, program):
    r = sandbox.run(TestJob(program, ("pass",)))
    assert r.status == "failed" and "disabled in the ra3 sandbox" in r.message
    assert not os.path.exists("/tmp/ra3-pwned")


def test_a_10gb_allocation_fails_at_the_memory_limit(sandbox):
    start = time.perf_counter()
    r = sandbox.run(TestJob("blob = bytearray(10 * 1024 ** 3)\n", ("pass",)))
    assert r.status == "failed" and "MemoryError" in r.message
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    os.fork()\n",
    "import posix\nwhile True:\n    posix.fork()\n",
    "import multiprocessing as mp\nwhile True:\n    mp.Process(target=print).start()\n",
    "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'pass'])\n",
], ids=["os.fork", "posix.fork", "multiprocessing", "subprocess"])
def test_fork_bombs_are_stopped_by_the_guard(sandbox, program):
    r = sandbox.run(TestJob(program, ("pass",)))
    assert r.status == "failed" and "disabled in the ra3 sandbox" in r.message


def test_a_fork_bomb_past_the_guard_is_bounded_and_killed():
    """libc's fork() through ctypes bypasses the Python-level guard. What bounds it: RLIMIT_NPROC for the
    throw-away uid (root) or the host user, or, for root that could not switch uid, ctypes being blocked;
    RLIMIT_CPU on every child; the process-group kill and, with a uid, the kill of every process of that uid."""
    box = Sandbox(SandboxConfig(timeout=2.0, max_processes=16))
    program = "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n"
    start = time.perf_counter()
    r = box.run(TestJob(program, ("pass",)))
    assert not r.passed and r.status in ("timeout", "failed")
    assert time.perf_counter() - start < box.config.timeout + 5
    if box.uses_sandbox_uid:
        assert processes_of_uid(box.capabilities.sandbox_uid_base) == []
    else:
        assert r.status == "failed" and "ctypes" in r.message or os.geteuid() != 0


def test_a_crash_of_the_interpreter_fails(sandbox):
    r = sandbox.run(TestJob("import os\nos.abort()\n", ("pass",)))
    assert r.status == "crashed" and "SIGABRT" in r.message


def test_exiting_early_does_not_pass(sandbox):
    r = sandbox.run(TestJob("import sys\nsys.exit(0)\n", ("pass",)))
    assert (r.status, r.message, r.tests_passed) == ("failed", "program: SystemExit: 0", 0)
    r = sandbox.run(TestJob("import os\nos._exit(0)\n", ("pass",)))
    assert (r.status, r.tests_passed) == ("failed", 0)
    assert r.message == "the program ended its process (exit status 0) before the tests finished"


def test_file_deletion_leaves_the_watched_host_directory_untouched(sandbox, watched_dir):
    before = _snapshot(watched_dir)
    target = str(watched_dir)
    # the directory is reachable: a program can read it
    readable = TestJob(f"text = open({target + '/keep.txt'!r}).read()", ("assert text == 'precious\\n'",))
    assert sandbox.run(readable).passed
    attacks = [
        f"import shutil\nshutil.rmtree({target!r})",
        f"import os\nos.remove({target + '/keep.txt'!r})",
        f"import os\nos.unlink({target + '/sub/nested.txt'!r})",
        f"import os\nos.rename({target + '/keep.txt'!r}, {target + '/moved.txt'!r})",
        f"import pathlib\npathlib.Path({target + '/keep.txt'!r}).unlink()",
        f"import os\nos.system('rm -rf {target}')",
        f"import os\nos.chmod({target!r}, 0o777)",
    ]
    if sandbox.uses_sandbox_uid:  # the uid owns nothing on the host, so even writes fail
        attacks.append(f"open({target + '/keep.txt'!r}, 'w').write('gone')")
        attacks.append(f"open({target + '/new.txt'!r}, 'w').write('new')")
    results = sandbox.run_many([TestJob(a, ("pass",)) for a in attacks], workers=2, progress=False)
    assert all(not r.passed for r in results), [(a, r) for a, r in zip(attacks, results) if r.passed]
    assert _snapshot(watched_dir) == before


def test_sockets_are_blocked(sandbox):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        for program in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
                        f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
                        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1', timeout=1)"):
            r = sandbox.run(TestJob(program, ("pass",)))
            # the guard's refusal, not merely a failed connection (which the network namespace alone would give)
            assert r.status == "failed" and "network access is disabled in the ra3 sandbox" in r.message, (program, r)
        with pytest.raises(socket.timeout):
            server.accept()  # nobody connected
    finally:
        server.close()


def test_private_working_directory_is_writable_and_removed(sandbox):
    before = _private_dirs()
    program = "import os\nopen('scratch.txt', 'w').write('ok')\nos.mkdir('d')\n"
    assert sandbox.run(TestJob(program, ("assert open('scratch.txt').read() == 'ok'",))).passed
    assert _private_dirs() == before


def test_numpy_programs_run(sandbox):
    pytest.importorskip("numpy")
    job = TestJob("import numpy as np\ndef f(n):\n    return int(np.arange(n).sum())\n", ("assert f(5) == 10",))
    assert Sandbox(SandboxConfig(timeout=10.0)).run(job).passed


def test_stdio_jobs(sandbox):
    add = "a, b = map(int, input().split())\nprint(a + b)\n"
    cases = (IOCase("1 2\n", "3\n"), IOCase("10 -4", "6"))
    r = sandbox.run(StdioJob(add, cases))
    assert r.passed and r.tests_passed == 2
    r = sandbox.run(StdioJob("print(3)\n", cases, stop_on_failure=False))
    assert r.status == "failed" and r.tests_passed == 1 and "wrong answer" in r.message
    r = sandbox.run(StdioJob("raise ValueError('boom')\n", cases))
    assert r.status == "failed" and "boom" in r.message
    r = sandbox.run(StdioJob("import sys\nprint(sum(map(int, sys.stdin.read().split())))\nsys.exit(0)\n", cases))
    assert r.passed  # reading fd 0 directly and exiting with 0 are fine for stdio programs
    r = sandbox.run(StdioJob("while True:\n    pass\n", cases, timeout=1.0))
    assert r.status == "timeout" and r.message == f"case 0: {_WALL_CLOCK}" and r.duration_s < 3


def test_stdio_output_is_capped():
    box = Sandbox(SandboxConfig(timeout=5.0, max_output_mb=1))
    r = box.run(StdioJob("while True:\n    print('x' * 1000)\n", (IOCase("", "x"),)))
    # Python ignores SIGXFSZ, so the write past RLIMIT_FSIZE raises "File too large" inside the program
    assert r.status == "failed" and ("File too large" in r.message or "output file size" in r.message)


def test_outputs_match():
    assert outputs_match("3\n", "3")
    assert outputs_match("1 2  3\n\n4\n", "1 2 3\n4")
    assert outputs_match("0.3333333\n", "0.33333333")
    assert not outputs_match("0.34\n", "0.33")
    assert not outputs_match("3\n", "4")
    assert not outputs_match("1 2\n", "1\n2")
    assert not outputs_match("10\n", "10.0000001", float_tolerance=0) and outputs_match("10\n", "10.0000001")


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout"):
        SandboxConfig(timeout=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxConfig(memory_mb=-1)
    with pytest.raises(TypeError, match="job"):
        Sandbox().run("print(1)")
    with pytest.raises(TypeError, match="tests"):
        Sandbox().run(TestJob("x = 1", "assert x"))
    with pytest.raises(ValueError, match="workers"):
        Sandbox().run_many([TestJob("x = 1", ("pass",))], workers=0)

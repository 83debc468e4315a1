"""The `ra3` command: one subcommand per job, each handled by the module that owns it; and what the training
subcommands share: quiet library output, one-line warnings, a failed start that leaves nothing behind, and
Ctrl-C that ends in one line saying how to resume."""
from __future__ import annotations

import importlib
import os
import shutil
import sys
import warnings
from pathlib import Path

# subcommand -> (module with a `main(argv) -> int`, one-line help)
COMMANDS = {
    "midtrain": ("ra3.midtrain.cli", "RA3 mid-training (EM over rationales) or the NTP baseline"),
    "eval": ("ra3.eval.cli", "sandboxed pass@k on HumanEval / MBPP / plus variants / stdin-stdout problems"),
    "rlvr": ("ra3.rlvr.cli", "GRPO post-training with unit-test rewards"),
    "plot": ("ra3.plot", "render metrics.jsonl curves of one or more runs to PNG"),
    "bench": ("benchmarks.ops", "time and measure memory of every op backend against torch eager / compile"),
}


def _usage() -> str:
    lines = ["usage: ra3 <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`ra3 <command> --help` shows a command's options."]
    return "\n".join(lines)


def _add_checkout_to_path() -> None:
    """`benchmarks/` ships with the checkout, not the wheel: find it beside an editable install."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "ops.py").exists():
        raise SystemExit("ra3 bench needs the ra3 source checkout (benchmarks/ is not installed); "
                         "run it from an editable install (`pip install -e .`) or as `python -m benchmarks.ops`")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def quiet_libraries(command: str) -> None:
    """For a CLI run: no transformers / hub progress bars (loading and shard-writing), and warnings raised from
    ra3's own code printed as one line ``ra3 COMMAND: warning: ...`` instead of a file:line report."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if getattr(warnings.showwarning, "ra3_command", None) == command:
        return
    package = str(Path(__file__).resolve().parent)
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(package):
            print(f"{command}: warning: {message}", file=sys.stderr if file is None else file, flush=True)
        else:
            default(message, category, filename, lineno, file, line)

    show.ra3_command = command
    warnings.showwarning = show


class RunDirGuard:
    """Undo what a run that failed at start left in its output directory.

    Created before the run; ``failed()`` after a start error puts back the config file that was there, and when
    the run wrote no record removes the directory if the run created it, else the entries it added.
    """

    def __init__(self, out, config_name: str):
        self.out = Path(out)
        self.existed = self.out.is_dir()
        self.before = {p.name for p in self.out.iterdir()} if self.existed else set()
        self.config = self.out / config_name
        self.config_text = self.config.read_bytes() if self.config.is_file() else None

    def _wrote_records(self) -> bool:
        metrics = self.out / "metrics.jsonl"
        return metrics.is_file() and bool(metrics.read_text(encoding="utf-8").strip())

    def failed(self) -> None:
        if not self.out.is_dir() or os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 owns the directory
            return
        if self.config_text is not None:
            self.config.write_bytes(self.config_text)
        if self._wrote_records():
            return
        if not self.existed:
            shutil.rmtree(self.out, ignore_errors=True)
            return
        for path in self.out.iterdir():
            if path.name in self.before:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def stopped(command: str, checkpoint, rerun: str = "rerun the same command") -> int:
    """Ctrl-C: one line saying where the run can resume from; the exit status of SIGINT (130)."""
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank is stopped; rank 0 says so
        where = f"to resume from {checkpoint}" if checkpoint else "(no checkpoint was written yet: it starts over)"
        print(f"\n{command}: stopped; {rerun} {where}", file=sys.stderr, flush=True)
    return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from ra3 import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ra3: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name == "bench":
        _add_checkout_to_path()
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:  # a command without its own handler (the training commands say how to resume)
        print(f"\nra3 {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

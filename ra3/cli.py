"""The `ra3` command: one subcommand per job, each handled by the module that owns it."""
from __future__ import annotations

import importlib
import sys

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
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

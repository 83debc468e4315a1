"""What the training commands (``ra3 midtrain``, ``ra3 rlvr``) share on the command line: one flag per config
field, spelled alike (``--out``, ``--resume [false]``, ``--no-progress``, ``--distributed``, ``--backend``,
``--seed``, ...), the config file under them, and one way to run: one-line errors, a failed start that leaves
nothing behind, Ctrl-C that ends in one line saying how to resume."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable

from ra3.train.config import field_types, parse_bool


class _Switch(argparse.Action):
    """``--flag`` (true), ``--flag VALUE`` (true / false / yes / no / 1 / 0) and ``--no-flag`` (false)."""

    def __init__(self, option_strings, dest, **kwargs):
        name = option_strings[0][2:]
        super().__init__([*option_strings, f"--no-{name}"], dest, nargs="?", metavar="BOOL", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
            return
        try:
            setattr(namespace, self.dest, True if values is None else parse_bool(values))
        except ValueError:
            parser.error(f"{option_string}: expected true or false, got {values!r}")


class _Formatter(argparse.HelpFormatter):
    def _format_action_invocation(self, action):
        if isinstance(action, _Switch):  # "--flag [BOOL], --no-flag", not a [BOOL] after both
            return f"{action.option_strings[0]} [BOOL], {action.option_strings[1]}"
        return super()._format_action_invocation(action)


def config_parser(cls, *, prog: str, description: str, default_text: Callable[[str, object], str] | None = None,
                  epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser with ``--config FILE``, ``--print-config`` and one flag per field of the config dataclass
    ``cls`` (``--field-name``; booleans also ``--no-field-name``), each defaulting to None (= not given) and
    helped by the field's comment and ``default_text(name, default)`` (default: ``(default: VALUE)``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=_Formatter)
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON config file (fields not in it keep defaults)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    helps, types = cls.field_help(), field_types(cls)
    for f in fields(cls):
        shown = default_text(f.name, f.default) if default_text else f"(default: {f.default!r})"
        help_ = f"{helps.get(f.name) or f.name.replace('_', ' ')} {shown}".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        names = [flag, "-o"] if f.name == "out" else [flag]
        if types[f.name][0] is bool:
            parser.add_argument(flag, dest=f.name, action=_Switch, default=None, help=help_)
        else:
            parser.add_argument(*names, dest=f.name, metavar=f.name.upper(), default=None, help=help_)
    return parser


def given(args: argparse.Namespace, cls) -> dict:
    """The config fields given on the command line: field -> value (strings, or bools for switches)."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name) is not None}


def run_command(command: str, parser: argparse.ArgumentParser, argv: list[str] | None,
                make_config: Callable[[argparse.Namespace], object], run: Callable[[object], object],
                checkpoint: Callable[[object], Path | None]) -> tuple[int, object]:
    """A training command from its arguments to its end: parse ``argv``, ``make_config(args)`` (a ValueError is
    one line and exit status 2), ``--print-config``, then ``run(cfg)`` under ``run_training``. Returns (exit
    status, ``run``'s result or None)."""
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = make_config(args)
    except ValueError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2, None
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0, None
    return run_training(command, cfg, lambda: run(cfg), lambda: checkpoint(cfg))


def run_training(command: str, cfg, run: Callable[[], object],
                 checkpoint: Callable[[], Path | None]) -> tuple[int, object]:
    """``run()`` as the command ``command`` runs it: library output quiet, a ValueError (bad data, model, a
    checkpoint that does not match) printed as one line with exit status 2 and the run directory put back as it
    was, Ctrl-C as one line naming ``checkpoint()`` to resume from (exit status 130). Returns (0, ``run()``'s
    result), or (exit status, None) when it did not finish."""
    from ra3.cli import RunDirGuard, quiet_libraries, stopped

    quiet_libraries(command)
    guard = RunDirGuard(cfg.out, "config.yaml")
    try:
        return 0, run()
    except ValueError as exc:
        guard.failed()
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        try:
            found = checkpoint()
        except ValueError:
            found = None
        rerun = "rerun the same command" if cfg.resume else "rerun the same command without --resume false"
        return stopped(command, found, rerun), None


__all__ = ["config_parser", "given", "run_command", "run_training"]

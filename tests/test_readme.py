"""The README's code runs as written: every ```python block (at small sizes), and every `ra3 ...` command line of
the ```bash blocks parses with that command's own parser and config checks."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# full-size lines of the README's python blocks -> the same at sizes a CPU test runs in a second
SMALL = {"N, H, V, S = 4096, 2048, 32000, 16": "N, H, V, S = 64, 32, 300, 16"}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)


def _python_blocks() -> list[str]:
    return _blocks("python")


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_python_block_runs(index):
    code = _python_blocks()[index]
    for full, small in SMALL.items():
        code = code.replace(full, small)
    if "trl" in code:
        pytest.importorskip("trl")
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": f"readme_block_{index}"})


def test_small_sizes_still_match_the_readme():
    text = "\n".join(_python_blocks())
    missing = [full for full in SMALL if full not in text]
    assert not missing, f"README no longer has {missing}: update SMALL in this test to its new size lines"


def _commands() -> list[list[str]]:
    """Every `ra3 COMMAND ...` (also `python -m ra3.cli` / `-m ra3.cli` under torchrun) of the bash blocks, as
    [COMMAND, args...]; `[--flag]` (an optional flag) is taken as given."""
    found = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = [w.strip("[]") for w in shlex.split(part, comments=True)]
                if words[:1] == ["ra3"]:
                    found.append(words[1:])
                elif "ra3.cli" in words:
                    found.append(words[words.index("ra3.cli") + 1:])
    return found


def test_readme_commands_parse():
    from ra3.eval.cli import build_parser as eval_parser
    from ra3.midtrain.cli import _parser as midtrain_parser
    from ra3.midtrain.config import MidtrainConfig
    from ra3.plot import build_parser as plot_parser
    from ra3.plot import parse_panel
    from ra3.rlvr.cli import build_parser as rlvr_parser
    from ra3.rlvr.cli import config_from_args

    commands = _commands()
    assert {c[0] for c in commands} >= {"midtrain", "eval", "rlvr", "plot"}, commands
    root = README.parent
    for command in commands:
        name, argv = command[0], command[1:]
        if name == "midtrain":
            args = midtrain_parser().parse_args(argv)
            cfg = MidtrainConfig.from_file(root / args.config) if args.config else MidtrainConfig()
            cfg.with_overrides({k: v for k, v in vars(args).items()
                                if k not in ("config", "print_config") and v is not None}).validate()
        elif name == "eval":
            eval_parser().parse_args(argv)
        elif name == "rlvr":
            config_from_args(rlvr_parser().parse_args(argv))
        elif name == "plot":
            args = plot_parser().parse_args(argv)
            for spec in (args.metrics or "").split(","):
                if spec:
                    parse_panel(spec)
        else:
            assert name == "bench", f"README runs `ra3 {name}`, which is not a command"

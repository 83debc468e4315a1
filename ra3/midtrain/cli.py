"""`ra3 midtrain [--config FILE] [--out DIR] [--FIELD VALUE ...]`: run RA3 mid-training (or the NTP baseline).

With no arguments it runs the embedded default (ra3-tiny on the embedded corpus, RA3 then the NTP baseline)
to completion on a CPU in a few minutes. Every config field is a flag (``--think-cost 0.2``); a field given
on the command line wins over the config file, which wins over the defaults.

Data-parallel over several processes: ``torchrun --nproc_per_node=2 -m ra3.cli midtrain --distributed ddp``
(or ``fsdp``); every rank trains on its share of each step, rank 0 writes the run directory.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path


def _parser():
    from ra3.midtrain.config import MidtrainConfig, field_help

    parser = argparse.ArgumentParser(prog="ra3 midtrain", description=__doc__.splitlines()[0].split(": ", 1)[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON config file (fields not in it keep defaults)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    helps = field_help()
    defaults = MidtrainConfig()
    for f in fields(MidtrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [flag] if f.name != "out" else [flag, "-o"]
        parser.add_argument(*names, dest=f.name, metavar=f.name.upper(), default=None,
                            help=f"{helps.get(f.name, '')} (default: {getattr(defaults, f.name)!r})")
    parser.set_defaults(**{f.name: None for f in fields(MidtrainConfig)})
    parser.formatter_class = argparse.HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    from ra3.midtrain.config import MidtrainConfig

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = MidtrainConfig.from_file(args.config) if args.config else MidtrainConfig()
        overrides = {f.name: getattr(args, f.name) for f in fields(MidtrainConfig) if getattr(args, f.name) is not None}
        cfg = cfg.with_overrides(overrides).validate()
    except ValueError as exc:
        print(f"ra3 midtrain: error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from ra3.cli import RunDirGuard, quiet_libraries, stopped
    from ra3.midtrain.loop import run_midtrain

    quiet_libraries("ra3 midtrain")
    guard = RunDirGuard(cfg.out, "config.yaml")
    try:
        result = run_midtrain(cfg)
    except ValueError as exc:  # bad data / model / resume mismatch: a clear message, not a traceback
        guard.failed()
        print(f"ra3 midtrain: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        rerun = "rerun the same command" if cfg.resume else "rerun the same command without --resume false"
        return stopped("ra3 midtrain", latest_checkpoint(cfg.out), rerun)
    return 0 if result["status"] in ("completed", "stopped") else 1


def latest_checkpoint(out) -> Path | None:
    """The newest checkpoint of any objective under ``out/checkpoints`` (a latest.pt file or a sharded
    directory), or None."""
    from ra3.midtrain.records import CHECKPOINT_FILE, sharded_checkpoint

    found = [p for d in sorted(Path(out, "checkpoints").glob("*")) if d.is_dir()
             for p in (d / CHECKPOINT_FILE, sharded_checkpoint(d)) if p is not None and p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


if __name__ == "__main__":
    sys.exit(main())

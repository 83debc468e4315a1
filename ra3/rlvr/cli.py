"""`ra3 rlvr`: GRPO post-training with unit-test rewards.

    ra3 rlvr                                          # = --preset toy: ra3-tiny on the toy tasks, CPU, ~2 min
    ra3 rlvr --config rlvr.yaml --out runs/rlvr-ra3   # any causal LM and task set; flags override the file
    ra3 rlvr --model runs/midtrain/final --tasks mbpp --data mbpp.jsonl --split train --steps 200 \\
             --max-new-tokens 384 --lr 1e-6 --out runs/rlvr-ra3
    ra3 rlvr --out runs/rlvr-ra3 --resume             # continue from the latest checkpoint
    torchrun --nproc_per_node=2 -m ra3.cli rlvr --distributed ddp   # data-parallel (or fsdp) over 2 processes
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

from ra3.rlvr.config import TOY_PRESET, RLVRConfig, read_config_file


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    from ra3.cli import dataclass_help

    p = argparse.ArgumentParser(prog="ra3 rlvr", description="GRPO post-training with unit-test rewards",
                                epilog="Every option defaults to the config file's value, else to the preset's: "
                                       "'toy' without --config and --model, else RLVRConfig's ('default').")
    p.add_argument("--preset", choices=("toy", "default"),
                   help="starting values: 'toy' (ra3-tiny on the built-in toy tasks; the default when neither "
                        "--config nor --model is given) or 'default' (RLVRConfig's, for real models)")
    p.add_argument("--config", help="YAML or JSON file with RLVRConfig fields (on top of the preset)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    hints = typing.get_type_hints(RLVRConfig)
    helps = dataclass_help(RLVRConfig)
    for field in dataclasses.fields(RLVRConfig):
        hint = hints[field.name]
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        default = field.default
        if field.name in TOY_PRESET and TOY_PRESET[field.name] != default:
            shown = f"default: {TOY_PRESET[field.name]!r} with the toy preset, {default!r} otherwise"
        else:
            shown = f"default: {default!r}"
        help_ = f"{helps[field.name]} ({shown})".replace("%", "%%")
        if base is bool:
            p.add_argument(_flag(field.name), dest=field.name, default=None,
                           action=argparse.BooleanOptionalAction, help=help_)
        else:
            p.add_argument(_flag(field.name), dest=field.name, type=base, default=None, help=help_)
    return p


def config_from_args(args: argparse.Namespace) -> RLVRConfig:
    """Preset, then the config file, then flags; each layer overrides the one before.

    ``--resume`` without ``--config`` starts from the run's own OUT/config.json, so it continues the same run.
    """
    preset = args.preset or ("toy" if not args.config and args.model is None else "default")
    values = dict(TOY_PRESET) if preset == "toy" else {}
    if args.resume and not args.config:
        saved = Path(args.out or values.get("out") or RLVRConfig.out) / "config.json"
        if saved.is_file():
            values = read_config_file(saved)
    if args.config:
        values.update(read_config_file(args.config))
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(RLVRConfig)
                   if getattr(args, f.name) is not None})
    return RLVRConfig.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"ra3 rlvr: error: {exc}", file=sys.stderr)
        return 2
    from ra3.cli import RunDirGuard, quiet_libraries, stopped
    from ra3.rlvr.trainer import latest_checkpoint, train

    quiet_libraries("ra3 rlvr")
    guard = RunDirGuard(cfg.out, "config.json")
    try:
        metrics = train(cfg, resume=args.resume, progress=not args.no_progress)
    except ValueError as exc:
        guard.failed()
        print(f"ra3 rlvr: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        try:
            checkpoint = latest_checkpoint(Path(cfg.out), cfg.distributed)
        except ValueError:
            checkpoint = None
        return stopped("ra3 rlvr", checkpoint, "rerun the same command" if args.resume else
                       "rerun the same command with --resume")
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 reports (every rank has the same metrics)
        return 0
    if metrics:
        keys = ("step", "reward_mean", "pass_rate", "kl", "entropy")
        print(json.dumps({k: metrics[k] for k in keys}))
    print(f"metrics: {cfg.out}/metrics.jsonl, checkpoints: {cfg.out}/checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())

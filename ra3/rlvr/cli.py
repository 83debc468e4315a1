"""`ra3 rlvr`: GRPO post-training with unit-test rewards.

    ra3 rlvr                                          # = --preset toy: ra3-tiny on the toy tasks, CPU, ~2 min
    ra3 rlvr --config rlvr.yaml --out runs/rlvr-ra3   # any causal LM and task set; flags override the file
    ra3 rlvr --model runs/midtrain/final --tasks mbpp --data mbpp.jsonl --split train --steps 200 \\
             --max-new-tokens 384 --lr 1e-6 --out runs/rlvr-ra3
    ra3 rlvr --out runs/rlvr-ra3                      # rerun: continues from the latest checkpoint
    ra3 rlvr --out runs/rlvr-ra3 --resume false       # starts over
    torchrun --nproc_per_node=2 -m ra3.cli rlvr --distributed ddp   # data-parallel (or fsdp) over 2 processes
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ra3.rlvr.config import TOY_PRESET, RLVRConfig


def build_parser() -> argparse.ArgumentParser:
    from ra3.train.cli import config_parser

    def shown(name, default):
        if name in TOY_PRESET and TOY_PRESET[name] != default:
            return f"(default: {TOY_PRESET[name]!r} with the toy preset, {default!r} otherwise)"
        return f"(default: {default!r})"

    parser = config_parser(RLVRConfig, prog="ra3 rlvr", description="GRPO post-training with unit-test rewards",
                           default_text=shown,
                           epilog="Every option defaults to the config file's value, else to the preset's: 'toy' "
                                  "without --config and --model, else RLVRConfig's ('default'). Rerunning the same "
                                  "command resumes from OUT's latest checkpoint (--resume false starts over).")
    parser.add_argument("--preset", choices=("toy", "default"),
                        help="starting values: 'toy' (ra3-tiny on the built-in toy tasks; the default when neither "
                             "--config nor --model is given) or 'default' (RLVRConfig's, for real models)")
    return parser


def config_from_args(args: argparse.Namespace) -> RLVRConfig:
    """Preset, then the config file, then flags; each layer overrides the one before."""
    from ra3.train.cli import given
    from ra3.train.config import read_config_file

    preset = args.preset or ("toy" if not args.config and args.model is None else "default")
    values = dict(TOY_PRESET) if preset == "toy" else {}
    if args.config:
        values.update(read_config_file(args.config))
    return RLVRConfig.from_dict(values, source=args.config or "config").with_overrides(given(args, RLVRConfig))


def main(argv: list[str] | None = None) -> int:
    from ra3.train.cli import run_command

    def run(cfg):
        from ra3.rlvr.trainer import train

        metrics = train(cfg)
        if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 reports (every rank has the same metrics)
            if metrics:
                print(json.dumps({k: metrics[k] for k in ("step", "reward_mean", "pass_rate", "ref_kl", "entropy")}))
            print(f"metrics: {cfg.out}/metrics.jsonl, checkpoints: {cfg.out}/checkpoints")
        return metrics

    def checkpoint(cfg):
        from ra3.rlvr.trainer import latest_checkpoint

        return latest_checkpoint(cfg.out)

    return run_command("ra3 rlvr", build_parser(), argv, config_from_args, run, checkpoint)[0]


if __name__ == "__main__":
    sys.exit(main())

"""`ra3 midtrain [--config FILE] [--out DIR] [--FIELD VALUE ...]`: run RA3 mid-training (or the NTP baseline).

With no arguments it runs the embedded default (ra3-tiny on the embedded corpus, RA3 then the NTP baseline)
to completion on a CPU in a few minutes. Every config field is a flag (``--think-cost 0.2``); a field given
on the command line wins over the config file, which wins over the defaults. Rerunning the same command
resumes from the run directory's checkpoint (``--resume false`` starts over).

Data-parallel over several processes: ``torchrun --nproc_per_node=2 -m ra3.cli midtrain --distributed ddp``
(or ``fsdp``); every rank trains on its share of each step, rank 0 writes the run directory.
"""
from __future__ import annotations

import sys
from pathlib import Path


def _parser():
    from ra3.midtrain.config import MidtrainConfig
    from ra3.train.cli import config_parser

    return config_parser(MidtrainConfig, prog="ra3 midtrain", description=__doc__.splitlines()[0].split(": ", 1)[1])


def config_from_args(args):
    """The config file (or the defaults), then the flags given."""
    from ra3.midtrain.config import MidtrainConfig
    from ra3.train.cli import given

    cfg = MidtrainConfig.from_file(args.config) if args.config else MidtrainConfig()
    return cfg.with_overrides(given(args, MidtrainConfig)).validate()


def main(argv: list[str] | None = None) -> int:
    from ra3.train.cli import run_command

    def run(cfg):
        from ra3.midtrain.loop import run_midtrain

        return run_midtrain(cfg)

    code, result = run_command("ra3 midtrain", _parser(), argv, config_from_args, run,
                               lambda cfg: latest_checkpoint(cfg.out))
    if result is None:
        return code
    return 0 if result["status"] in ("completed", "stopped") else 1


def latest_checkpoint(out) -> Path | None:
    """The newest checkpoint of any objective under ``out/checkpoints`` (a latest.pt file or a sharded
    directory), or None."""
    from ra3.train.run import checkpoint_path

    found = [p for d in sorted(Path(out, "checkpoints").glob("*")) if d.is_dir()
             for p in [checkpoint_path(d)] if p is not None]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


if __name__ == "__main__":
    sys.exit(main())

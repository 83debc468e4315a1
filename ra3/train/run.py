"""The run directory every trainer writes, and how a run resumes from it.

    OUT/config.yaml        the resolved config (what the run computes from)
    OUT/metrics.jsonl      one JSON record a line: {"kind": "step" | "iteration", "objective", "step", ...}
    OUT/tensorboard/       the same scalars, when tensorboard is installed
    OUT/samples/           what the model wrote, to read
    OUT/checkpoints/...    ``save_checkpoint(directory, state)``: ``latest.pt`` in a single process, a sharded
                           ``sharded/`` directory (``ra3.distributed``) under ddp / fsdp

Resuming is rerunning the same command: the checkpoint holds the config it was written with, the position in the
loop and how many metrics lines had been written; lines written after it are dropped, so a resumed run's
metrics.jsonl equals an uninterrupted one's. Under ddp / fsdp rank 0 writes the files; every rank its shards.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from ra3 import distributed as ranks

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "latest.pt"  # a single process's checkpoint
SHARDED_DIR = "sharded"  # a ddp / fsdp run's checkpoint: a torch.distributed.checkpoint directory
_LIVE = ("model", "ref", "optimizer")  # state entries that are objects with a state_dict, loaded in place


class MetricsWriter:
    """Appends one JSON record per line to ``out/metrics.jsonl``; mirrors the numbers to TensorBoard if installed.

    ``keep_lines``: the lines the checkpoint being resumed had written; later ones are dropped. Under ddp / fsdp
    only rank 0 writes (every rank passes the same records; the others only count lines).
    """

    def __init__(self, out, *, keep_lines: int = 0):
        self.path = Path(out) / METRICS_FILE
        self.enabled = ranks.is_main()
        self._tb = None
        if not self.enabled:
            self.lines = keep_lines
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True) if self.path.exists() else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(lines[:keep_lines]), encoding="utf-8")
        self.lines = min(keep_lines, len(lines))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(out) / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def write(self, record: dict) -> None:
        """``record``: {"kind": "step" | "iteration", "objective": str, "step" | "iteration": int, numbers...}."""
        self.lines += 1
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            tag = f"{record.get('objective', 'run')}/{record.get('kind', 'step')}"
            x = record.get("step" if record.get("kind", "step") == "step" else "iteration", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "iteration"):
                    self._tb.add_scalar(f"{tag}/{k}", v, x)
            self._tb.flush()

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def write_config(out, cfg) -> Path:
    """``out/config.yaml`` (rank 0), the config the run computes from."""
    path = Path(out) / CONFIG_FILE
    if ranks.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(cfg.to_yaml(), encoding="utf-8")
    return path


def check_resumable(cfg, saved_config: dict) -> None:
    """Resuming continues the same computation: a ValueError naming the config fields that differ from the
    checkpoint's (those that may differ, as ``out`` or ``progress``, aside)."""
    diff = cfg.resume_diff(saved_config)
    if diff:
        raise ValueError(f"config field(s) {diff} differ from the checkpoint in {cfg.out!r}; resume with the same "
                         f"config, or pass --resume false (starts over) or a new --out")


# ---- checkpoints --------------------------------------------------------------------------------------------
def save_checkpoint(directory, state: dict) -> Path:
    """Save ``state`` in ``directory``: {'model': module, 'ref': module | None, 'optimizer': optimizer | None,
    picklable entries...}; a missing or None entry is not saved.

    A single process writes ``directory/latest.pt`` (state dicts); a ddp / fsdp run (every rank calls it)
    ``directory/sharded`` (``ra3.distributed.save_checkpoint``). Either is replaced only once the new one is
    complete, so a kill leaves the previous one. Returns the file or directory written."""
    directory = Path(directory)
    state = {k: v for k, v in state.items() if not (k in _LIVE and v is None)}
    if not ranks.sharded():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (CHECKPOINT_FILE + ".tmp")
        torch.save({k: v.state_dict() if k in _LIVE else v for k, v in state.items()}, tmp)
        os.replace(tmp, directory / CHECKPOINT_FILE)
        return directory / CHECKPOINT_FILE
    final, tmp, old = (directory / name for name in (SHARDED_DIR, SHARDED_DIR + ".tmp", SHARDED_DIR + ".old"))
    if ranks.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    ranks.save_checkpoint(tmp, state)
    if ranks.is_main():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    ranks.barrier()
    return final


def checkpoint_path(directory) -> Path | None:
    """The checkpoint in ``directory`` (``latest.pt``, or a complete sharded directory, or the one before it
    when a save was cut short), or None."""
    directory = Path(directory)
    if (directory / CHECKPOINT_FILE).is_file():
        return directory / CHECKPOINT_FILE
    for name in (SHARDED_DIR, SHARDED_DIR + ".old"):
        if (directory / name / ".metadata").is_file():
            return directory / name
    return None


def read_checkpoint(directory) -> dict | None:
    """What resuming needs before any model exists: the picklable entries of the checkpoint in ``directory``,
    plus 'holds' (which of 'ref' and 'optimizer' it has) and 'path'. None when there is none; a ValueError
    naming ``distributed`` when the one there has the other format (sharded vs single-process)."""
    path = checkpoint_path(directory)
    if path is None:
        return None
    sharded = path.name != CHECKPOINT_FILE
    if sharded != ranks.sharded():
        written = "a ddp / fsdp run (sharded)" if sharded else "a distributed='none' run"
        hint = "--distributed ddp or fsdp" if sharded else "--distributed none"
        raise ValueError(f"config field 'distributed': {directory} holds the checkpoint of {written}; resume it with "
                         f"{hint} (or pass --resume false, or a new --out)")
    if not sharded:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        holds = {k: saved.get(k) is not None for k in ("ref", "optimizer")}
        return {**{k: v for k, v in saved.items() if k not in _LIVE}, "holds": holds, "path": path}
    held = ranks.checkpoint_contents(path)
    return {**ranks.read_checkpoint_extras(path), "holds": {"ref": "ref" in held["modules"],
                                                            "optimizer": held["optimizer"]}, "path": path}


def load_checkpoint(directory, state: dict) -> dict:
    """Load the checkpoint in ``directory`` into the objects of ``state`` ({'model', 'ref'?, 'optimizer'?}; build
    'ref' and 'optimizer' when ``read_checkpoint`` says it holds them) in place; returns its picklable entries."""
    path = checkpoint_path(directory)
    if path is None:
        raise FileNotFoundError(f"{directory} holds no checkpoint")
    state = {k: v for k, v in state.items() if v is not None}
    if path.name != CHECKPOINT_FILE:
        return ranks.load_checkpoint(path, state)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    for key, target in state.items():
        target.load_state_dict(saved[key])
    return {k: v for k, v in saved.items() if k not in _LIVE}


__all__ = ["MetricsWriter", "write_config", "check_resumable", "save_checkpoint", "read_checkpoint", "load_checkpoint",
           "checkpoint_path", "CONFIG_FILE", "METRICS_FILE", "CHECKPOINT_FILE", "SHARDED_DIR"]

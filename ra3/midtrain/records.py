"""What a run writes: metrics.jsonl (+ TensorBoard when installed), checkpoints, samples, the summary table."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from ra3 import distributed as dist

CHECKPOINT_FILE = "latest.pt"
SHARDED_DIR = "sharded"  # distributed runs: a torch.distributed.checkpoint directory


class MetricsWriter:
    """Appends one JSON record per line to ``out/metrics.jsonl``; mirrors scalars to TensorBoard if available.

    Under ddp / fsdp only rank 0 writes (every rank passes the same records; the others only count lines).
    """

    def __init__(self, out: Path, *, keep_lines: int = 0):
        self.path = Path(out) / "metrics.jsonl"
        self.enabled = dist.is_main()
        self._tb = None
        if not self.enabled:
            self.lines = keep_lines
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True) if self.path.exists() else []
        # resuming: drop what was written after the checkpoint we resume from, so records are not duplicated
        self.path.write_text("".join(lines[:keep_lines]), encoding="utf-8")
        self.lines = min(keep_lines, len(lines))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(out) / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def write(self, record: dict) -> None:
        if not self.enabled:
            self.lines += 1
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        self.lines += 1
        if self._tb is not None:
            tag = f"{record.get('objective', 'run')}/{record.get('kind', 'step')}"
            x = record.get("step" if record.get("kind") == "step" else "iteration", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "iteration"):
                    self._tb.add_scalar(f"{tag}/{k}", v, x)
            self._tb.flush()

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


def save_checkpoint(directory: Path, state: dict) -> None:
    """Atomically write ``state`` (tensors and plain data) to ``directory/latest.pt``."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, directory / CHECKPOINT_FILE)


def load_checkpoint(directory: Path) -> dict | None:
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def save_sharded_checkpoint(directory: Path, state: dict) -> None:
    """``state`` ({'model', 'optimizer', 'ref', picklable entries}; see ``ra3.distributed.save_checkpoint``) as
    ``directory/sharded``, every rank writing its shards; the previous one is replaced only once it is complete."""
    final, tmp, old = (directory / name for name in (SHARDED_DIR, SHARDED_DIR + ".tmp", SHARDED_DIR + ".old"))
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    dist.save_checkpoint(state, tmp)
    if dist.is_main():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def sharded_checkpoint(directory: Path) -> Path | None:
    """The sharded checkpoint directory in ``directory`` (or the one before it, when a save was cut short)."""
    for name in (SHARDED_DIR, SHARDED_DIR + ".old"):
        if (directory / name / ".metadata").is_file():
            return directory / name
    return None


def load_run_state(directory: Path, *, sharded: bool) -> dict | None:
    """What resuming needs before the model exists: the checkpoint's config, progress, annotations and
    metrics_lines (sharded: plus 'sharded', its directory; the weights load later); the whole ``latest.pt``
    otherwise. None when there is no checkpoint; a ValueError naming ``distributed`` when the checkpoint
    there has the other format."""
    path = sharded_checkpoint(directory)
    if not sharded:
        if path is not None and not (directory / CHECKPOINT_FILE).exists():
            raise ValueError(f"config field 'distributed': {directory} holds a sharded checkpoint of a ddp / fsdp "
                             f"run; resume it with --distributed ddp or fsdp (or pass --resume false)")
        return load_checkpoint(directory)
    if path is None:
        if (directory / CHECKPOINT_FILE).exists():
            raise ValueError(f"config field 'distributed': {directory} holds the checkpoint of a "
                             f"distributed='none' run; resume it with --distributed none (or pass --resume false)")
        return None
    return {**dist.read_checkpoint_extras(path), "sharded": path}


def summary_table(records: list[dict]) -> str:
    """Markdown table of the iteration records (ELBO per iteration for RA3; the held-out code-only loss that RA3
    and NTP are compared on, for both), then what the two objectives were matched on and RA3's extra compute."""
    cols = [("objective", "objective", "{}"), ("iteration", "iter", "{}"), ("elbo", "ELBO (nats/doc)", "{:.2f}"),
            ("expert_loglik", "expert loglik", "{:.2f}"), ("thinks_per_100_lines", "thinks/100 lines", "{:.1f}"),
            ("think_q_mean", "E-step q(think)", "{:.3f}"), ("rationale_len_mean", "rationale len", "{:.1f}"),
            ("estep_return_mean", "E-step return", "{:.2f}"), ("mstep_loss", "M-step loss", "{:.4f}"),
            ("heldout_code_loss", "held-out code loss", "{:.4f}"), ("heldout_ntp_loss", "held-out NTP loss", "{:.4f}")]
    rows = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        if r.get("kind") != "iteration":
            continue
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("-" if v is None else fmt.format(v))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + _matched(records)


def _matched(records: list[dict]) -> str:
    """What RA3 and NTP had in common (M-step optimizer steps, expert-code tokens, documents and their order) and
    what RA3 spent on top (E-step and annotation tokens forwarded and seconds)."""
    its = [r for r in records if r.get("kind") == "iteration"]
    by = {o: [r for r in its if r.get("objective") == o] for o in ("ra3", "ntp")}
    if not by["ra3"] or not by["ntp"]:
        return ""

    def total(o, key):
        return sum(r.get(key) or 0 for r in by[o])

    lines = ["", "", "Matched: the same documents in the same order for both objectives; M-step optimizer steps "
             f"ra3 {total('ra3', 'mstep_steps')} / ntp {total('ntp', 'mstep_steps')}; expert-code tokens trained on "
             f"ra3 {total('ra3', 'mstep_code_tokens')} / ntp {total('ntp', 'mstep_code_tokens')}.",
             f"RA3's extra compute: E-step {total('ra3', 'estep_tokens'):.0f} tokens forwarded in "
             f"{total('ra3', 'estep_time_s'):.1f} s, annotation {total('ra3', 'annotate_tokens'):.0f} tokens in "
             f"{total('ra3', 'annotate_time_s'):.1f} s."]
    return "\n".join(lines)

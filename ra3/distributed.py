"""Multi-process training under ``torchrun``: process group, DDP / FSDP2 wrapping, rank-0 output, sharded checkpoints.

    from ra3 import distributed as dist
    info = dist.setup()                                   # reads torchrun's env; single process without it
    model = dist.wrap_model(model, "fsdp")                # or "ddp" | "none"; patch (apply_ra3) before this
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    start = dist.load_checkpoint({"model": model, "optimizer": optimizer}, ckpt_dir).get("step", 0)  # if it exists
    for step in dist.progress(range(start, steps), desc="train"):   # a tqdm bar on rank 0 only
        loss = model(**batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
        dist.log(f"step {step} loss {dist.mean_over_ranks(loss):.4f}")   # printed by rank 0 only
        dist.save_checkpoint({"model": model, "optimizer": optimizer, "step": step + 1}, ckpt_dir)
    dist.teardown()

Backend: NCCL when CUDA is available, else gloo (CPU). Each rank feeds its own slice of the data (e.g.
``batch[info.rank::info.world_size]``); DDP averages gradients over ranks, FSDP2 (``fully_shard``) shards
parameters, gradients and optimizer state over ranks and averages gradients the same way. Checkpoints are
``torch.distributed.checkpoint`` directories (one file per rank plus metadata); they load under any world size
or strategy, single process included.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

STRATEGIES = ("none", "ddp", "fsdp")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank in [0, world_size), its device, and the process-group backend."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]  # 'nccl' | 'gloo', or None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_info() -> DistInfo:
    """The DistInfo of this process (rank 0 of 1 on the default device when no process group is up)."""
    cuda = torch.cuda.is_available()
    if not _initialized():
        return DistInfo(0, 1, 0, torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
                        None)
    backend = torch.distributed.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", torch.distributed.get_rank()))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device, backend)


def setup(backend: Optional[str] = None, *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    backend: 'nccl' | 'gloo' | None (NCCL with CUDA, else gloo). Without torchrun's variables (or with
    WORLD_SIZE=1) no group is created and a single-process DistInfo is returned, so the same script runs
    both ways. Idempotent. With NCCL, sets this process's CUDA device to LOCAL_RANK.
    """
    if backend is not None and backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
    if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if _initialized():
        return get_info()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return get_info()
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} but {', '.join(missing)} are not set: launch with torchrun")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    from datetime import timedelta

    torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return get_info()


def teardown() -> None:
    """Leave the process group (no-op when none)."""
    if _initialized():
        torch.distributed.destroy_process_group()


def is_main() -> bool:
    """True on rank 0, and in a single process."""
    return not _initialized() or torch.distributed.get_rank() == 0


def barrier() -> None:
    if _initialized():
        torch.distributed.barrier()


def log(*args, **kwargs) -> None:
    """print() on rank 0 only (flushed, so torchrun's interleaved output stays readable)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def progress(iterable: Iterable, **tqdm_kwargs):
    """A tqdm progress bar over ``iterable`` on rank 0; the bare iterable elsewhere."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not is_main(), **tqdm_kwargs)


def mean_over_ranks(value) -> float:
    """The mean of a scalar (float or 0-d tensor) over all ranks, as a Python float; for logging."""
    t = torch.as_tensor(value.detach() if torch.is_tensor(value) else value, dtype=torch.float64)
    if t.numel() != 1:
        raise ValueError(f"value must be a scalar, got shape {tuple(t.shape)}")
    if _initialized():
        t = t.to(get_info().device)
        torch.distributed.all_reduce(t)
        t = t / torch.distributed.get_world_size()
    return float(t)


def _layer_classes(model: torch.nn.Module, layer_classes) -> tuple[type, ...]:
    if layer_classes is not None:
        classes = tuple(layer_classes)
        if not classes or not all(isinstance(c, type) for c in classes):
            raise TypeError("layer_classes must be a non-empty sequence of nn.Module classes")
        return classes
    names = set(getattr(model, "_no_split_modules", None) or ())  # Hugging Face: the decoder block classes
    classes = tuple({type(m) for m in model.modules() if type(m).__name__ in names})
    if not classes:
        raise ValueError(f"cannot tell the transformer blocks of {type(model).__name__} (no _no_split_modules): "
                         f"pass layer_classes=(YourBlock,)")
    return classes


def wrap_model(model: torch.nn.Module, strategy: str = "ddp", *, layer_classes=None,
               mixed_precision: Optional[torch.dtype] = None):
    """Move ``model`` to this rank's device and wrap it for data-parallel training.

    strategy: 'none' (single process, or replicas with no gradient sync), 'ddp' (DistributedDataParallel;
    returns the wrapper, the model is ``.module``), 'fsdp' (FSDP2: ``fully_shard`` on every block of
    ``layer_classes``, default the Hugging Face ``_no_split_modules`` classes, then on the root; returns the
    same model object, its parameters now DTensor shards). Embeddings and lm_head stay with the root, so a
    tied lm_head and ra3's fused head (``apply_ra3``) see the whole weight during the forward.
    mixed_precision: FSDP2 parameter dtype for compute (e.g. torch.bfloat16; gradients reduced in float32).
    In a single process every strategy returns the model on its device, unwrapped.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    info = get_info()
    model = model.to(info.device)
    if not info.distributed or strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kwargs = {"mesh": mesh}
    if mixed_precision is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    classes = _layer_classes(model, layer_classes)
    for module in list(model.modules()):
        if module is not model and isinstance(module, classes):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (FSDP2 models are not wrapped)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


class _TrainState:
    """A torch.distributed.checkpoint Stateful over {'model', 'optimizer', extra entries}."""

    def __init__(self, state: dict):
        if not isinstance(state, dict) or not isinstance(state.get("model"), torch.nn.Module):
            raise ValueError("state must be a dict with 'model': nn.Module, optionally 'optimizer': Optimizer "
                             "and extra picklable entries (e.g. 'step')")
        optimizer = state.get("optimizer")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"state['optimizer'] must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.optimizer = unwrap(state["model"]), optimizer
        self.extra = {k: v for k, v in state.items() if k not in ("model", "optimizer")}

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, [self.optimizer] if self.optimizer else [])
        out = {"model": model_sd, "extra": dict(self.extra)}
        if self.optimizer is not None:
            out["optimizer"] = optim_sd
        return out

    def load_state_dict(self, sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, [self.optimizer] if self.optimizer else [], model_state_dict=sd["model"],
                       optim_state_dict=sd.get("optimizer", {}))
        self.extra = dict(sd["extra"])


def save_checkpoint(state: dict, directory) -> Path:
    """Save {'model', 'optimizer'?, extra picklable entries} as a sharded checkpoint in ``directory``.

    Every rank must call it (each writes its shards; rank 0 also the metadata). Models wrapped by DDP or
    FSDP2, or plain ones, all save the same fully-qualified parameter names, so any of them can load it.
    Returns the directory.
    """
    import torch.distributed.checkpoint as dcp

    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    directory = Path(directory)
    if is_main():
        directory.mkdir(parents=True, exist_ok=True)
    barrier()
    dcp.save({"train": _TrainState(state)}, checkpoint_id=str(directory), no_dist=not _initialized())
    barrier()
    return directory


def load_checkpoint(state: dict, directory) -> dict:
    """Load a ``save_checkpoint`` directory into state['model'] (and state['optimizer']) in place.

    Every rank must call it, after ``wrap_model`` and after creating the optimizer. Returns the extra entries
    that were saved (e.g. {'step': 100}). Raises FileNotFoundError when ``directory`` holds no checkpoint.
    """
    import torch.distributed.checkpoint as dcp

    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    if not (Path(directory) / ".metadata").is_file():
        raise FileNotFoundError(f"{directory} holds no checkpoint (no .metadata); save one with save_checkpoint")
    train = _TrainState(state)
    # The saved extra keys are unknown before loading: read them from the checkpoint's metadata.
    meta = dcp.FileSystemReader(str(directory)).read_metadata()
    train.extra = {k.split(".", 2)[2]: None for k in meta.state_dict_metadata if k.startswith("train.extra.")}
    dcp.load({"train": train}, checkpoint_id=str(directory), no_dist=not _initialized())
    return train.extra


__all__ = ["DistInfo", "setup", "teardown", "get_info", "is_main", "barrier", "log", "progress", "mean_over_ranks",
           "wrap_model", "unwrap", "save_checkpoint", "load_checkpoint", "STRATEGIES"]

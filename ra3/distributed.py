"""Multi-process training under ``torchrun``: process group, DDP / FSDP2 wrapping, rank-0 output, sharded checkpoints.

    from ra3 import distributed as ranks                  # (not `dist`: that reads as torch.distributed)
    info = ranks.setup()                                  # reads torchrun's env; single process without it
    model = ranks.wrap_model(model, "fsdp")               # or "ddp" | "none"; patch (apply_ra3) before this
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    start = ranks.load_checkpoint(ckpt_dir, {"model": model, "optimizer": optimizer}).get("step", 0)  # if it exists
    for step in ranks.progress(range(start, steps), desc="train"):  # a tqdm bar on rank 0 only
        loss = model(**batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
        ranks.log(f"step {step} loss {ranks.mean_over_ranks(loss):.4f}")  # printed by rank 0 only
        ranks.save_checkpoint(ckpt_dir, {"model": model, "optimizer": optimizer, "step": step + 1})
    ranks.teardown()

Training code that computes a loss outside ``model.forward`` (from the final hidden states and the lm_head weight,
as ra3's loops do) runs it through ``forward(model, fn)``, so DDP synchronises and FSDP2 gathers for it;
no-grad work that needs every weight at once (sampling, scoring) runs inside ``with full_params(model) as m``.
``session``, ``shard`` / ``gather_shards``, ``gather_objects``, ``rank_seed``, ``scale_for_global_mean``,
``reduce_metrics``, ``clip_grad_norm_``, ``frozen_copy`` and ``save_pretrained`` are the rest of what a loop
needs.

Backend: NCCL when CUDA is available, else gloo (CPU). Each rank feeds its own slice of the data (e.g.
``batch[info.rank::info.world_size]``); DDP averages gradients over ranks, FSDP2 (``fully_shard``) shards
parameters, gradients and optimizer state over ranks and averages gradients the same way. Checkpoints are
``torch.distributed.checkpoint`` directories (one file per rank plus metadata); they load under any world size
or strategy, single process included.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import weakref
import zlib
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


_session_strategies: list[str] = []  # the strategies of the sessions this process is in, innermost last


def sharded() -> bool:
    """Whether this run is data-parallel: inside ``session('ddp' | 'fsdp')`` (even of one process) or a process
    group. Its checkpoints are then sharded directories, which load under any strategy and world size."""
    return _initialized() or bool(_session_strategies and _session_strategies[-1] != "none")


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


def teardown(*, sync: bool = True) -> None:
    """Leave the process group (no-op when none).

    sync: wait at a barrier first, so no rank destroys the group while a peer still talks to it (gloo then
    aborts the peer with "terminate called without an active exception"). Pass False when leaving on an error,
    where a peer may never reach the barrier.
    """
    if not _initialized():
        return
    if sync:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # DDP / FSDP wrappers left in reference cycles still hold the group: free them now, not at interpreter exit.
    gc.collect()


@contextlib.contextmanager
def session(strategy: str, backend: Optional[str] = None):
    """The process group of one run with ``strategy``: ``setup()`` on entry, ``teardown()`` on exit when this call
    created the group (a caller that set one up keeps it). Yields the DistInfo.

    Refuses strategy 'none' under a multi-process launch (each process would train alone and write the same
    run directory): a ValueError that names ``distributed``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed must be one of {STRATEGIES}, got {strategy!r}")
    world_size = torch.distributed.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "none" and world_size > 1:
        # (the helpers below shard data whenever a group is up: 'none' there would train unsynchronised replicas)
        raise ValueError(f"distributed='none' but torchrun started {world_size} processes (WORLD_SIZE={world_size}): "
                         f"pass --distributed ddp or fsdp, or run without torchrun")
    created = strategy != "none" and not _initialized()
    info = setup(backend) if strategy != "none" else get_info()
    _session_strategies.append(strategy)
    ok = False
    try:
        yield info
        ok = True
    finally:
        _session_strategies.pop()
        if created:
            teardown(sync=ok)


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


def shard(items: list) -> list:
    """This rank's share of ``items``: every world_size-th one from its rank (all of them in a single process)."""
    if not _initialized():
        return items
    return items[torch.distributed.get_rank()::torch.distributed.get_world_size()]


def gather_shards(local):
    """Undo ``shard``: every rank's share (a list, or a tensor split along dim 0) back in the original order, on
    every rank. The inverse of ``shard(full)`` for any length; ``local`` itself in a single process."""
    if not _initialized():
        return local
    world = torch.distributed.get_world_size()
    parts = [None] * world
    torch.distributed.all_gather_object(parts, local.cpu() if torch.is_tensor(local) else list(local))
    n = sum(len(part) for part in parts)
    if torch.is_tensor(local):
        out = local.new_empty((n, *local.shape[1:]))
        for r, part in enumerate(parts):
            out[r::world] = part.to(out.device)
        return out
    out = [None] * n
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def gather_objects(obj) -> list:
    """[every rank's ``obj``] (picklable), indexed by rank, on every rank; ``[obj]`` in a single process."""
    if not _initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def rank_seed(seed: int) -> int:
    """``seed`` in a single process; a distinct, reproducible 31-bit seed per rank otherwise, so ranks sampling
    with the same seed draw different streams."""
    if not _initialized():
        return seed
    return zlib.crc32(f"{int(seed)}/rank{torch.distributed.get_rank()}".encode()) & 0x7FFFFFFF


def _all_reduce(values: list[float], op=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=get_info().device)
    torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t.tolist()


def scale_for_global_mean(loss: torch.Tensor, count) -> torch.Tensor:
    """``loss``, a mean over this rank's ``count`` items (tokens, sequences), rescaled by
    world_size * count / (all ranks' count) so that the gradients DDP / FSDP2 average over ranks are the
    gradients of the mean over every rank's items, as one process on the whole batch would compute them.
    Unchanged in a single process."""
    if not _initialized():
        return loss
    total = _all_reduce([float(count)])[0]
    return loss * (torch.distributed.get_world_size() * float(count) / max(total, 1.0))


def reduce_metrics(metrics: dict, *, weights: Optional[dict] = None, sums=(), maxes=(),
                   stds: Optional[dict] = None) -> dict:
    """This rank's metrics of a step -> the metrics of the whole global batch, the same on every rank.

    Per numeric key: in ``sums``, summed over ranks (counts); in ``maxes``, the largest (wall-clock seconds:
    the slowest rank); in ``weights`` (key -> this rank's weight, e.g. its token count for a per-token mean),
    the mean weighted by it (a rank of weight 0 adds nothing, even a NaN); in ``stds`` (key -> this rank's
    values, a list of floats or a 1-D tensor), the sample standard deviation of every rank's values together;
    otherwise the plain mean over ranks. Other values (None, strings, bools) are this rank's. Every rank must
    call it with the same keys, in the same order (two all_reduces in all). In a single process ``metrics`` is
    returned as it is.
    """
    if not _initialized():
        return metrics
    stds = dict(stds or {})
    if stds:  # pooled std from each rank's count, sum and sum of squares (float64), summed over ranks
        moments = {}
        for k, values in stds.items():
            v = torch.as_tensor(values, dtype=torch.float64).flatten()
            moments.update({f"{k}.n": len(v), f"{k}.s": float(v.sum()), f"{k}.ss": float((v * v).sum())})
        pooled = reduce_metrics({**{k: v for k, v in metrics.items() if k not in stds}, **moments},
                                weights=weights, sums=(*sums, *moments), maxes=maxes)
        out = {}
        for k, v in metrics.items():
            if k not in stds:
                out[k] = pooled[k]
                continue
            n, s, ss = pooled[f"{k}.n"], pooled[f"{k}.s"], pooled[f"{k}.ss"]
            out[k] = math.sqrt(max((ss - s * s / n) / (n - 1), 0.0)) if n > 1 else 0.0
        return out
    weights = dict(weights or {})
    numeric = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    unknown = sorted((set(weights) | set(sums) | set(maxes)) - set(numeric))
    if unknown:
        raise KeyError(f"reduce_metrics: {unknown} are not numeric entries of metrics")
    summed = [k for k in numeric if k not in maxes]
    vec = []
    for k in summed:
        v = float(metrics[k])
        if k in weights:
            w = float(weights[k])
            vec += [v * w if w else 0.0, w]
        else:
            vec.append(v)
    world = torch.distributed.get_world_size()
    totals = iter(_all_reduce(vec) if vec else [])
    maxed = [k for k in numeric if k in maxes]
    biggest = dict(zip(maxed, _all_reduce([float(metrics[k]) for k in maxed], torch.distributed.ReduceOp.MAX)
                       if maxed else []))
    reduced = {}
    for k in summed:
        if k in weights:
            num, den = next(totals), next(totals)
            reduced[k] = num / den if den else 0.0
        elif k in sums:
            reduced[k] = next(totals)
        else:
            reduced[k] = next(totals) / world
    reduced.update(biggest)
    out = {}
    for k, v in metrics.items():
        if k not in reduced:
            out[k] = v
        elif isinstance(v, int) and (k in sums or k in maxes):
            out[k] = int(round(reduced[k]))  # counts stay integers
        else:
            out[k] = reduced[k]
    return out


def check_shares(counts: dict, *, divisible: bool = False, world_size: Optional[int] = None) -> None:
    """Under ddp / fsdp every rank needs its share of each step: raise ValueError naming the config field of
    ``counts`` (field -> how many items a step shares out) that gives some rank none (or, with ``divisible``,
    that the ranks cannot split evenly). ``world_size``: the number of ranks (default: this run's); nothing to
    check with one."""
    world = get_info().world_size if world_size is None else world_size
    if world == 1:
        return
    for name, n in counts.items():
        if divisible and n % world:
            raise ValueError(f"config field {name!r}: {n} must be a multiple of the number of ranks ({world})")
        if n < world:
            raise ValueError(f"config field {name!r}: {n} cannot be shared by {world} ranks (each needs at "
                             f"least one); use at least {world}")


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


# FSDP2 models cannot be deep-copied: wrap_model keeps what frozen_copy needs to build a copy sharded the same way
# (the module structure with parameters on the meta device, and the sharding arguments), keyed by the model.
_FSDP_SPECS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose parameters are empty meta tensors (no memory); buffers are copied."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _fully_shard(model: torch.nn.Module, classes: tuple, mixed_precision: Optional[torch.dtype]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    info = get_info()
    kwargs = {"mesh": init_device_mesh(info.device.type, (info.world_size,))}
    if mixed_precision is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    for module in list(model.modules()):
        if module is not model and isinstance(module, classes):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)


def wrap_model(model: torch.nn.Module, strategy: str = "ddp", *, layer_classes=None,
               mixed_precision: Optional[torch.dtype] = None):
    """Move ``model`` to this rank's device and wrap it for data-parallel training.

    strategy: 'none' (single process, or replicas with no gradient sync), 'ddp' (DistributedDataParallel;
    returns the wrapper, the model is ``.module``), 'fsdp' (FSDP2: ``fully_shard`` on every block of
    ``layer_classes``, default the Hugging Face ``_no_split_modules`` classes, then on the root; returns the
    same model object, its parameters now DTensor shards). Embeddings and lm_head stay with the root, so a
    tied lm_head and ra3's fused head (``apply_ra3``) see the whole weight during the forward.
    mixed_precision: FSDP2 parameter dtype for compute (e.g. torch.bfloat16; gradients reduced in float32).
    A model without trainable parameters (a frozen reference) has no gradients to synchronise: 'ddp' returns
    it unwrapped on the rank's device ('fsdp' still shards it, to save memory).
    In a single process every strategy returns the model unwrapped and where it is (the caller chose its device).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    info = get_info()
    if not info.distributed:
        return model
    model = model.to(info.device)
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if not any(p.requires_grad for p in model.parameters()):
            return model
        return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    classes = _layer_classes(model, layer_classes)
    _FSDP_SPECS[model] = (_meta_skeleton(model), classes, mixed_precision)
    _fully_shard(model, classes, mixed_precision)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (FSDP2 models are not wrapped)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def forward(model: torch.nn.Module, fn):
    """``fn(module)`` run as ``model``'s forward pass; returns what ``fn`` returns.

    For a loss computed outside ``model.forward`` (say from ``model.get_decoder()`` hidden states and the
    lm_head weight): under DDP only a forward through the wrapper makes the backward average gradients over
    ranks, and under FSDP2 only the root's forward gathers the root's parameters (embeddings, norm, lm_head).
    ``fn`` receives the unwrapped model; a plain model just gets ``fn(model)``. Every rank must call it the
    same number of times, each followed by a backward of (a function of) the result.
    """
    inner = unwrap(model)
    if inner is model and not _is_fsdp(model):
        return fn(model)

    def run():
        out = fn(inner)
        if not _is_fsdp(inner):
            return out
        # FSDP2 hooks the backward on the output tensors; an output that is a view (a stat sliced from a
        # bigger tensor) would lose that hook to a later in-place op, so hand back copies of views
        from torch.utils._pytree import tree_map

        return tree_map(lambda t: t.clone() if torch.is_tensor(t) and t._base is not None else t, out)

    slot = inner.__dict__.get("forward")
    if not isinstance(slot, _ForwardSlot):
        slot = inner.forward = _ForwardSlot(inner)  # installed once per model, not patched per call
    slot.fn = run
    try:
        return model()
    finally:
        slot.fn = None


class _ForwardSlot:
    """A wrapped model's ``forward`` while ``forward(model, fn)`` is in use: runs the function ``forward()`` hands
    it for the current call, else the model's own forward (so every other use of the model is unchanged). A deep
    copy (``frozen_copy``) gets a slot of its own that points at the copy."""

    def __init__(self, owner: torch.nn.Module):
        self.owner, self.fn = owner, None

    def __call__(self, *args, **kwargs):
        if self.fn is not None:
            return self.fn()
        return type(self.owner).forward(self.owner, *args, **kwargs)


@contextlib.contextmanager
def full_params(model: Optional[torch.nn.Module]):
    """``with full_params(model) as m``: the unwrapped model with every parameter whole, under ``torch.no_grad()``,
    for work that calls its parts directly or a data-dependent number of times (sampling, scoring).

    Under FSDP2 every rank must enter together: all parameters are all-gathered once and kept gathered (no
    per-layer collectives inside, so ranks may run different numbers of forwards), and sharded again on exit.
    Under DDP it is the ``.module``; a plain model is itself; ``None`` gives ``None``. Gradients taken inside
    would not be synchronised, hence no_grad.
    """
    if model is None:
        yield None
        return
    inner = unwrap(model)
    with torch.no_grad():
        if not _is_fsdp(inner) or not _initialized():
            yield inner
            return
        forward(inner, lambda m: None)  # FSDP2 finds its root in the root's first forward; make sure it has
        modules = _fsdp_modules(inner)
        inner.set_reshard_after_forward(False)
        for m in modules:
            m.unshard()
        try:
            yield inner
        finally:
            inner.set_reshard_after_forward(True)
            inner.set_reshard_after_forward(False, recurse=False)  # the root's default
            for m in modules:
                m.reshard()


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy (eval mode, no gradients) of ``model``'s current weights, e.g. a reference policy: a deep
    copy of the plain (DDP: unwrapped) model; under FSDP2 (a model from ``wrap_model``) a copy sharded the same
    way, so it costs 1/world_size of the memory (read it inside ``full_params``)."""
    inner = unwrap(model)
    if not (_is_fsdp(inner) and _initialized()):
        out = copy.deepcopy(inner).eval()
        for p in out.parameters():
            p.requires_grad_(False)
        return out
    if inner not in _FSDP_SPECS:
        raise ValueError("frozen_copy of an FSDP2 model needs one sharded by ra3.distributed.wrap_model")
    skeleton, classes, mixed_precision = _FSDP_SPECS[inner]
    out = copy.deepcopy(skeleton)
    for p in out.parameters():
        p.requires_grad_(False)
    _fully_shard(out, classes, mixed_precision)
    out.to_empty(device=get_info().device)
    for m in _fsdp_modules(inner):
        m.reshard()
    out.load_state_dict(inner.state_dict())  # sharded DTensors into the same sharding: local copies
    sources = dict(inner.named_buffers())
    with torch.no_grad():
        for name, buf in out.named_buffers():
            buf.copy_(sources[name])  # persistent or not (rotary tables are not in the state dict)
    return out.eval()


def clip_grad_norm_(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over ``model``'s parameters; returns the total norm as a plain tensor
    (FSDP2: over all shards)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def save_pretrained(model: torch.nn.Module, directory, *others) -> None:
    """Hugging Face ``save_pretrained(directory)`` of the whole model (gathered under FSDP2) and of ``others``
    (e.g. the tokenizer), written by rank 0. Every rank must call it."""
    inner = unwrap(model)
    if not _initialized():
        inner.save_pretrained(directory)
        for o in others:
            o.save_pretrained(directory)
        return
    state = None
    if _is_fsdp(inner):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        for m in _fsdp_modules(inner):
            m.reshard()
        state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main():
        if state is None:
            inner.save_pretrained(directory)
        else:
            inner.save_pretrained(directory, state_dict=state)
        for o in others:
            o.save_pretrained(directory)
    barrier()


class _Opaque:
    """One picklable checkpoint entry kept whole: torch.distributed.checkpoint would flatten a nested dict into
    per-leaf keys (and drop empty ones), which a later load could not name in advance."""

    def __init__(self, value=None):
        self.value = value


class _TrainState:
    """A torch.distributed.checkpoint Stateful over {'model', 'optimizer', other modules, extra entries}."""

    def __init__(self, state: dict):
        if not isinstance(state, dict) or not isinstance(state.get("model"), torch.nn.Module):
            raise ValueError("state must be a dict with 'model': nn.Module, optionally 'optimizer': Optimizer, "
                             "other nn.Module entries and extra picklable entries (e.g. 'step')")
        optimizer = state.get("optimizer")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"state['optimizer'] must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.optimizer = unwrap(state["model"]), optimizer
        rest = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
        self.modules = {k: unwrap(v) for k, v in rest.items() if isinstance(v, torch.nn.Module)}
        self.extra = {k: v for k, v in rest.items() if k not in self.modules}

    def _reshard(self) -> None:
        # an FSDP2 root keeps its parameters gathered after a forward; its state dict must be the shards
        for model in (self.model, *self.modules.values()):
            for m in _fsdp_modules(model):
                m.reshard()

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        self._reshard()
        model_sd, optim_sd = get_state_dict(self.model, [self.optimizer] if self.optimizer else [])
        out = {"model": model_sd, "extra": {k: _Opaque(v) for k, v in self.extra.items()}}
        if self.optimizer is not None:
            out["optimizer"] = optim_sd
        if self.modules:
            out["modules"] = {k: get_model_state_dict(m) for k, m in self.modules.items()}
        return out

    def load_state_dict(self, sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        set_state_dict(self.model, [self.optimizer] if self.optimizer else [], model_state_dict=sd["model"],
                       optim_state_dict=sd.get("optimizer", {}))
        for k, m in self.modules.items():
            set_model_state_dict(m, sd["modules"][k])
        self.extra = {k: v.value if isinstance(v, _Opaque) else v for k, v in sd["extra"].items()}


def checkpoint_contents(directory) -> dict:
    """What a ``save_checkpoint`` directory holds, from its metadata alone (no process group, no model needed):
    {'optimizer': bool, 'modules': [names of the other nn.Module entries], 'extra': [names of the extra
    entries]}. Raises FileNotFoundError when ``directory`` holds no checkpoint."""
    import torch.distributed.checkpoint as dcp

    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    if not (Path(directory) / ".metadata").is_file():
        raise FileNotFoundError(f"{directory} holds no checkpoint (no .metadata); save one with save_checkpoint")
    keys = list(dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata)

    def names(prefix: str) -> list[str]:
        return sorted({k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)})

    return {"optimizer": any(k.startswith("train.optimizer.") for k in keys), "modules": names("train.modules."),
            "extra": names("train.extra.")}


def read_checkpoint_extras(directory) -> dict:
    """The extra entries of a ``save_checkpoint`` directory (e.g. {'step': 100}) without loading any model: for
    deciding what to build before ``load_checkpoint``. Reads files only, so any rank may call it alone."""
    import torch.distributed.checkpoint as dcp

    names = checkpoint_contents(directory)["extra"]
    state = {"train": {"extra": {k: _Opaque() for k in names}}}
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    return {k: v.value if isinstance(v, _Opaque) else v for k, v in state["train"]["extra"].items()}


def save_checkpoint(directory, state: dict) -> Path:
    """Save {'model', 'optimizer'?, other nn.Module entries?, extra picklable entries} as a sharded checkpoint in
    ``directory``.

    Every rank must call it (each writes its shards; rank 0 also the metadata and the extra entries, each
    pickled whole). Other modules (e.g. a frozen reference policy, plain or sharded) are saved like 'model'.
    Models wrapped by DDP or FSDP2, or plain ones, all save the same fully-qualified parameter names, so any
    of them can load it. Returns the directory.
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


def load_checkpoint(directory, state: dict) -> dict:
    """Load a ``save_checkpoint`` directory into state['model'] (and state['optimizer'], and the other nn.Module
    entries of ``state``) in place.

    Every rank must call it, after ``wrap_model`` and after creating the optimizer. Returns the extra entries
    that were saved (e.g. {'step': 100}); ``checkpoint_contents`` tells beforehand which optimizer and modules
    it holds. Raises FileNotFoundError when ``directory`` holds no checkpoint, ValueError when ``state`` asks
    for a module it does not hold.
    """
    import torch.distributed.checkpoint as dcp

    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    if not (Path(directory) / ".metadata").is_file():
        raise FileNotFoundError(f"{directory} holds no checkpoint (no .metadata); save one with save_checkpoint")
    train = _TrainState(state)
    # The saved extra keys are unknown before loading: read them from the checkpoint's metadata.
    contents = checkpoint_contents(directory)
    missing = sorted(set(train.modules) - set(contents["modules"]))
    if missing:
        raise ValueError(f"{directory} holds no {missing} to load (it has modules {contents['modules']})")
    train.extra = {k: _Opaque() for k in contents["extra"]}
    dcp.load({"train": train}, checkpoint_id=str(directory), no_dist=not _initialized())
    return train.extra


__all__ = ["DistInfo", "setup", "teardown", "session", "get_info", "is_main", "barrier", "log", "progress",
           "mean_over_ranks", "shard", "gather_shards", "gather_objects", "rank_seed", "scale_for_global_mean",
           "reduce_metrics", "check_shares", "wrap_model", "unwrap", "forward", "full_params", "frozen_copy", "clip_grad_norm_",
           "save_pretrained", "save_checkpoint", "load_checkpoint", "checkpoint_contents", "read_checkpoint_extras",
           "sharded", "STRATEGIES"]

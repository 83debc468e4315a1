"""Group-relative advantages for GRPO-family trainers: each reward against the other samples of its prompt."""
from __future__ import annotations

import torch
from torch import Tensor

from ra3.ops import _validate as check
from ra3.ops import kernel_abi as abi
from ra3.ops import registry, reference

_NORMALIZE_CODE = {"none": abi.NORM_NONE, "mean": abi.NORM_MEAN, "std": abi.NORM_STD, "rloo": abi.NORM_RLOO,
                   "batch-std": abi.NORM_BATCH_STD}


# ``backend`` is the resolved native backend ('cpu', 'cuda' or 'triton') whose kernels the op body calls.
@torch.library.custom_op("ra3::group_advantages", mutates_args=())
def _group_adv_op(backend: str, rewards: Tensor, group_ids: Tensor, num_groups: int, normalize: int,
                  eps: float) -> tuple[Tensor, Tensor, Tensor]:
    out = torch.empty_like(rewards)
    mean = torch.empty(num_groups, dtype=rewards.dtype, device=rewards.device)
    std = torch.empty_like(mean)
    abi.call(backend, rewards.device, abi.GroupAdvFwdArgs(
        dtype=abi.dtype_code(rewards.dtype), rewards=rewards, gids=group_ids, n=rewards.numel(), num_groups=num_groups,
        normalize=normalize, eps=eps, out=out, mean=mean, std_dev=std))
    return out, mean, std


@_group_adv_op.register_fake
def _(backend, rewards, group_ids, num_groups, normalize, eps):
    return torch.empty_like(rewards), rewards.new_empty(num_groups), rewards.new_empty(num_groups)


@torch.library.custom_op("ra3::group_advantages_backward", mutates_args=())
def _group_adv_backward_op(backend: str, rewards: Tensor, group_ids: Tensor, num_groups: int, normalize: int,
                           eps: float, mean: Tensor, std: Tensor, grad_out: Tensor) -> Tensor:
    grad = torch.empty_like(rewards)
    abi.call(backend, rewards.device, abi.GroupAdvBwdArgs(
        dtype=abi.dtype_code(rewards.dtype), rewards=rewards, gids=group_ids, n=rewards.numel(), num_groups=num_groups,
        normalize=normalize, eps=eps, mean=mean, std_dev=std, g=grad_out, grad_r=grad))
    return grad


@_group_adv_backward_op.register_fake
def _(backend, rewards, group_ids, num_groups, normalize, eps, mean, std, grad_out):
    return torch.empty_like(rewards)


def _setup(ctx, inputs, output):
    backend, rewards, group_ids, num_groups, normalize, eps = inputs
    ctx.args = (backend, num_groups, normalize, eps)
    ctx.save_for_backward(rewards, group_ids, output[1], output[2])


def _backward(ctx, grad_out, _grad_mean, _grad_std):
    rewards, group_ids, mean, std = ctx.saved_tensors
    backend, num_groups, normalize, eps = ctx.args
    grad = _group_adv_backward_op(backend, rewards, group_ids, num_groups, normalize, eps, mean, std,
                                  grad_out.contiguous())
    return None, grad, None, None, None, None


_group_adv_op.register_autograd(_backward, setup_context=_setup)


def _group_ids(rewards: Tensor, group_size, group_ids) -> tuple[Tensor, int]:
    n = rewards.shape[0]
    if group_size is not None and group_ids is not None:
        raise ValueError("pass group_size or group_ids, not both")
    if group_ids is not None:
        check.tensor("group_ids", group_ids, ndim=1, floating=False)
        check.shape("group_ids", group_ids, (n,), "one group id per reward")
        check.same_device(rewards=rewards, group_ids=group_ids)
        if n == 0:
            return group_ids.long().contiguous(), 0
        if int(group_ids.min()) < 0:
            raise ValueError(f"group_ids must be >= 0, got {int(group_ids.min())}")
        ids = group_ids.long()
        if int(ids.max()) >= n:
            # Sparse ids (any id >= 0 is allowed, e.g. [0, 0, 2**40, 2**40]): renumber the groups 0..K-1 in id order
            # so that per-group buffers hold K <= B entries, not max id + 1. The advantages are the same: nothing
            # returned is indexed by group. Ids below B are kept as given (no sort in the usual, dense case).
            ids = torch.unique(ids, return_inverse=True)[1]
        return ids.contiguous(), int(ids.max()) + 1
    if group_size is None:
        group_size = max(n, 1)  # one group: the whole batch
    group_size = check.integer("group_size", group_size, minimum=1)
    if n % group_size:
        raise ValueError(f"group_size={group_size} does not divide the number of rewards {n}")
    ids = torch.arange(n, device=rewards.device) // group_size
    return ids, n // group_size


def group_advantages(rewards, group_size=None, group_ids=None, normalize: str = "std", eps: float = 1e-6, *,
                     backend: str = "auto") -> torch.Tensor:
    """Advantages of each sample relative to its group (the G samples drawn for one prompt).

    rewards: [B] fp32|bf16|fp16, finite. Groups: ``group_size`` G (consecutive blocks of G, B % G == 0), or
    ``group_ids`` [B] int >= 0 (any order, unequal sizes, gaps and ids of any size allowed), or neither (one group).
    normalize ("mean" is the group's mean, "std" an unbiased std, eps > 0 for both std modes):
      'std'        (r - mean) / (std + eps): GRPO (Shao et al. 2024, DeepSeekMath); TRL's scale_rewards="group".
      'batch-std'  (r - mean) / (std of all B rewards + eps): centred per group, scaled by the whole batch's std,
                   as TRL's scale_rewards="batch" (from "Tricks or Traps?", Liu et al. 2025, arXiv 2508.08221). TRL
                   adds eps=1e-4.
      'mean'       r - mean: Dr. GRPO (Liu et al. 2025, arXiv 2503.20783); TRL's scale_rewards="none".
      'rloo'       r - mean of the other samples of the group (RLOO, Ahmadian et al. 2024).
      'none'       r.
    Returns [B] float32 (float64 for float64), differentiable.
    Edges: NaN or inf rewards raise ValueError (checked); a group of one sample, or a constant group, gets 0 (r
    itself for 'none'; for 'batch-std' only a constant batch or a batch of one has std 0); B = 0 gives [0].
    """
    check.tensor("rewards", rewards, ndim=1, floating=True)
    check.finite("rewards", rewards)
    normalize = check.choice("normalize", normalize, reference.NORMALIZE_MODES)
    dt = check.compute_dtype(rewards)
    eps = check.nonnegative_float("eps", eps, dt)
    if normalize in ("std", "batch-std") and eps < torch.finfo(dt).tiny:
        # A constant group (or a group of one) has std 0: its advantages would be 0 / eps, NaN for eps = 0.
        raise ValueError(f"eps must be at least {torch.finfo(dt).tiny:.3g} (> 0 in {dt}) with "
                         f"normalize={normalize!r}, got {eps:g}: a constant group would divide 0 by 0")
    ids, num_groups = _group_ids(rewards, group_size, group_ids)
    name = registry.resolve("group_advantages", backend, rewards.device)
    if name == "torch":
        return reference.group_advantages(rewards, ids, num_groups, normalize, eps)
    out, _mean, _std = _group_adv_op(name, rewards.to(dt).contiguous(), ids, num_groups,
                                    _NORMALIZE_CODE[normalize], eps)
    return out

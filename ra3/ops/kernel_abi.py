"""The kernels' C ABI on the Python side: one NamedTuple per kernel's arguments, the codes, and ``call``.

Each ``<Name>Args`` mirrors the struct of that name in csrc/ra3_native.h field for field (``ra3._C.abi()`` lists
them; tests/test_kernel_contracts.py holds the two sides together), with a tensor (or None) wherever the struct
holds a pointer. The kernel is the struct's name without "Args", in snake case: ``SegmentSumFwdArgs`` runs
``segment_sum_fwd``. Every backend takes the same tuple: ``call('cpu' | 'cuda', device, args)`` hands it to
``ra3._C``'s ``cpu_<kernel>`` / ``cuda_<kernel>`` (the latter on ``device``'s current stream), which reads a tensor's
address through its ``data_ptr()`` (0 for None), and ``call('triton', device, args)`` hands the tuple to the Triton launcher ``ra3.kernels.launcher(kernel)``,
imported only then (``import ra3.ops`` never imports triton). The Triton-only fused kernels have tuples here too.

Build arguments by keyword: a field's position is not part of the contract.
"""
from __future__ import annotations

import functools
import re
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ra3 import _native

# Dtype codes (DType): the compute dtype (`dtype`: FLOAT32 or FLOAT64) and GEMM operand dtypes (`in_dtype`).
FLOAT32, FLOAT64, BFLOAT16, FLOAT16 = 0, 1, 2, 3
DTYPE_CODE = {torch.float32: FLOAT32, torch.float64: FLOAT64, torch.bfloat16: BFLOAT16, torch.float16: FLOAT16}
# Softmax-over-vocabulary modes (SoftmaxMode) of the vocab_softmax kernels.
LOGPROB, ENTROPY, EXACT_KL = 0, 1, 2
# group_adv_* normalisations (GroupNormalize); policy_loss_fwd's aggregations (Aggregation), importance-ratio levels
# (RatioLevel) and surrogates (Surrogate).
NORM_NONE, NORM_MEAN, NORM_STD, NORM_RLOO, NORM_BATCH_STD = 0, 1, 2, 3, 4
TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM, SEQ_MEAN_TOKEN_MEAN, TOKEN_SUM_NORM = 0, 1, 2, 3
RATIO_TOKEN, RATIO_SEQUENCE = 0, 1
SURROGATE_PPO, SURROGATE_CISPO = 0, 1


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODE[dtype]


class VocabSoftmaxFwdArgs(NamedTuple):
    """Folds the [n, vc] logits chunk z (x = z * inv_temp), at vocabulary column v_offset, into the per-row state
    (m, s, a[, mr, sr]) [n]; mode LOGPROB picks the target's x into tgt. r is the reference chunk (EXACT_KL)."""
    mode: int
    dtype: int
    z: Tensor
    ldz: int
    r: Optional[Tensor]
    ldr: int
    n: int
    vc: int
    v_offset: int
    inv_temp: float
    targets: Optional[Tensor]
    m: Tensor
    s: Tensor
    a: Optional[Tensor]
    mr: Optional[Tensor]
    sr: Optional[Tensor]
    tgt: Optional[Tensor]


class VocabSoftmaxGradArgs(NamedTuple):
    """g[i] * d(value_i)/dz of one [n, vc] chunk into out (may be z), from the finished state m, logs = log s and
    q = a / s (ENTROPY, EXACT_KL)."""
    mode: int
    dtype: int
    z: Tensor
    ldz: int
    r: Optional[Tensor]
    ldr: int
    out: Tensor
    ldo: int
    n: int
    vc: int
    v_offset: int
    inv_temp: float
    targets: Optional[Tensor]
    m: Tensor
    logs: Tensor
    q: Optional[Tensor]
    g: Tensor


class SegmentSumFwdArgs(NamedTuple):
    """out [num_segments] = sums of values [n] by ids [n] (int64; negative: no segment)."""
    dtype: int
    values: Tensor
    ids: Tensor
    n: int
    num_segments: int
    out: Tensor


class SegmentSumBwdArgs(NamedTuple):
    """grad_values [n] = grad_out[ids] (0 where ids < 0)."""
    dtype: int
    grad_out: Tensor
    ids: Tensor
    n: int
    grad_values: Tensor


class KlEstimatorFwdArgs(NamedTuple):
    """out [n] = the k1/k2/k3 (estimator 1-3) estimate of d = lp - ref."""
    dtype: int
    estimator: int
    lp: Tensor
    ref: Tensor
    n: int
    out: Tensor


class KlEstimatorBwdArgs(NamedTuple):
    """grad_lp [n] = g * d(estimate)/d(lp)."""
    dtype: int
    estimator: int
    lp: Tensor
    ref: Tensor
    g: Tensor
    n: int
    grad_lp: Tensor


class GroupAdvFwdArgs(NamedTuple):
    """out [n] = group-normalised rewards [n] (gids int64 in [0, num_groups)); mean, std_dev [num_groups]."""
    dtype: int
    rewards: Tensor
    gids: Tensor
    n: int
    num_groups: int
    normalize: int
    eps: float
    out: Tensor
    mean: Tensor
    std_dev: Tensor


class GroupAdvBwdArgs(NamedTuple):
    """grad_r [n] = the exact gradient of group_adv_fwd's out for upstream g [n], from its mean and std_dev."""
    dtype: int
    rewards: Tensor
    gids: Tensor
    n: int
    num_groups: int
    normalize: int
    eps: float
    mean: Tensor
    std_dev: Tensor
    g: Tensor
    grad_r: Tensor


class PolicyLossFwdArgs(NamedTuple):
    """The clipped policy loss of lp [B, T] into loss_out [1], grad_lp [B, T] and stats_out [4] (clip fraction,
    kl mean, ratio mean, mask sum)."""
    dtype: int
    B: int
    T: int
    lp: Tensor
    old: Tensor
    adv: Tensor
    adv_per_token: int
    mask: Tensor
    ref: Optional[Tensor]
    kl_coef: float
    kl_estimator: int
    clip_low: float
    clip_high: float
    ratio_level: int
    surrogate: int
    aggregation: int
    agg_norm: float
    loss_out: Tensor
    grad_lp: Tensor
    stats_out: Tensor


class LinearSourceArgs(NamedTuple):
    """One model's side of the extension loop's GEMMs: hidden [n, h] and weight [vocab, h] of GEMM dtype code
    in_dtype, contiguous, and bias [vocab] (compute dtype) or None. The absent reference is ``NO_SOURCE``."""
    in_dtype: int
    hidden: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    h: int


NO_SOURCE = LinearSourceArgs(in_dtype=FLOAT32, hidden=None, weight=None, bias=None, h=0)


class VocabSoftmaxLoopFwdArgs(NamedTuple):
    """vocab_softmax_fwd over the whole vocabulary in chunks of ``chunk`` columns, each logits tile formed by
    cuBLAS into tile (and ref_tile) scratch of n * chunk elements (CUDA only)."""
    mode: int
    dtype: int
    n: int
    vocab: int
    chunk: int
    source: LinearSourceArgs
    ref_source: LinearSourceArgs
    inv_temp: float
    targets: Optional[Tensor]
    ones: Optional[Tensor]
    tile: Tensor
    ref_tile: Optional[Tensor]
    m: Tensor
    s: Tensor
    a: Optional[Tensor]
    mr: Optional[Tensor]
    sr: Optional[Tensor]
    tgt: Optional[Tensor]


class VocabSoftmaxLoopGradArgs(NamedTuple):
    """vocab_softmax_grad over the whole vocabulary with the GEMMs into grad_hidden [n, h] (overwritten),
    grad_weight [vocab, h] and grad_bias [vocab] (None: not wanted); bf16_terms 1 or 2 bfloat16 gradient tiles in
    tile16 (CUDA only)."""
    mode: int
    dtype: int
    n: int
    vocab: int
    chunk: int
    source: LinearSourceArgs
    ref_source: LinearSourceArgs
    inv_temp: float
    targets: Optional[Tensor]
    m: Tensor
    logs: Tensor
    q: Optional[Tensor]
    g: Tensor
    ones: Optional[Tensor]
    tile: Tensor
    ref_tile: Optional[Tensor]
    tile16: Optional[Tensor]
    bf16_terms: int
    grad_hidden: Tensor
    grad_weight: Optional[Tensor]
    grad_bias: Optional[Tensor]


class VocabSoftmaxLoopCrossEntropyArgs(NamedTuple):
    """Cross-entropy in token chunks of ``rows`` whole vocabulary rows: (m, s, tgt, logs) [n] and, for upstream
    g [n], the gradients while each tile is in memory (CUDA only)."""
    dtype: int
    n: int
    vocab: int
    rows: int
    source: LinearSourceArgs
    inv_temp: float
    targets: Tensor
    g: Optional[Tensor]
    ones: Optional[Tensor]
    tile: Tensor
    tile16: Optional[Tensor]
    bf16_terms: int
    m: Tensor
    s: Tensor
    tgt: Tensor
    logs: Tensor
    grad_hidden: Optional[Tensor]
    grad_weight: Optional[Tensor]
    grad_bias: Optional[Tensor]


class VocabSoftmaxFusedFwdArgs(NamedTuple):
    """The softmax state of logits = hidden @ weight.T (+ bias) over the whole vocabulary, GEMMs inside the Triton
    kernel (Triton only; operands of any float dtype, ref_* for EXACT_KL)."""
    mode: int
    dtype: int
    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    ref_hidden: Optional[Tensor]
    ref_weight: Optional[Tensor]
    ref_bias: Optional[Tensor]
    targets: Optional[Tensor]
    inv_temp: float
    m: Tensor
    s: Tensor
    a: Optional[Tensor]
    mr: Optional[Tensor]
    sr: Optional[Tensor]
    tgt: Optional[Tensor]


class VocabSoftmaxFusedGradArgs(NamedTuple):
    """Gradients of sum_i g[i] * value_i w.r.t. hidden, weight and bias from the forward's m, logs, q (Triton
    only)."""
    mode: int
    dtype: int
    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    ref_hidden: Optional[Tensor]
    ref_weight: Optional[Tensor]
    ref_bias: Optional[Tensor]
    targets: Optional[Tensor]
    inv_temp: float
    m: Tensor
    logs: Tensor
    q: Optional[Tensor]
    g: Tensor
    grad_hidden: Tensor
    grad_weight: Optional[Tensor]
    grad_bias: Optional[Tensor]


# Launchers of Triton alone (the GEMM inside the kernel): tuples with no C struct to mirror.
TRITON_ONLY = (VocabSoftmaxFusedFwdArgs, VocabSoftmaxFusedGradArgs)


@functools.cache
def kernel_name(args_type: type) -> str:
    """The kernel an argument tuple type runs: its name without "Args", in snake case."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", args_type.__name__.removesuffix("Args")).lower()


def call(backend: str, device: torch.device, args: NamedTuple):
    """Runs the kernel of ``args`` on ``backend`` ('cpu', 'cuda' or 'triton')."""
    name = kernel_name(type(args))
    if backend == "triton":
        from ra3 import kernels  # noqa: PLC0415  (lazy: triton loads on the first Triton kernel only)

        launch = kernels.launcher(name)
        if device.type == "cuda":
            with torch.cuda.device(device):  # Triton launches on the current device (and its current stream)
                return launch(args)
        return launch(args)
    mod = _native.load()
    if mod is None:
        raise RuntimeError(f"ra3._C is not available; {_native.REBUILD_HINT}")
    # ra3._C reads each pointer field's address from the tensor itself (data_ptr()).
    if backend == "cuda":
        return getattr(mod, "cuda_" + name)(args, torch.cuda.current_stream(device).cuda_stream)
    if backend == "cpu":
        return getattr(mod, "cpu_" + name)(args)
    raise ValueError(f"no kernels for backend {backend!r}")

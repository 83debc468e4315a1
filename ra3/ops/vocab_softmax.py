"""The vocabulary-softmax ops: log-probs of given targets, entropy, exact KL and next-token cross-entropy, from
logits or fused with the lm_head GEMM (the [N, V] logits are never materialised).

Each public function validates its arguments, asks ``registry.resolve`` for a backend, and runs the reference
(backend 'torch') or one of two custom ops whose native work is the design ``vocab_softmax_walk.DESIGNS`` holds
for that backend:
  ``ra3::vocab_softmax`` (+ ``ra3::vocab_softmax_backward``): per-row log-prob, entropy or KL; the backward pass
      recomputes the logits tiles (4 GEMMs per step for a linear op: its per-row upstream gradient is known only
      then);
  ``ra3::vocab_softmax_cross_entropy``: a sum or mean NLL, whose upstream gradient is one scalar, so the gradient
      is formed while each tile is in memory (3 GEMMs: logits, grad_hidden, grad_weight).
Both are ``torch.library`` custom ops, opaque nodes to ``torch.compile``.

The linear forms take the head's logit transform as arguments: the softmax is over
``softcap(scale * (hidden @ weight.T + bias)) / temperature``, ``softcap(x) = cap * tanh(x / cap)`` (Gemma 2/3;
identity for None). ``precision='high'`` makes the cuda backend's bf16 backward GEMMs take the gradient tile as
hi + lo bf16 terms (float32-class gradients at twice those GEMMs' work); the default rounds it once, as torch
eager in bf16, Liger-Kernel and Cut Cross-Entropy do. Every other design computes its GEMMs in float32 already.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ra3.ops import _validate as check
from ra3.ops import registry, reference
from ra3.ops.segment_sum import segment_sum
from ra3.ops.kernel_abi import ENTROPY, EXACT_KL, LOGPROB
from ra3.ops.vocab_softmax_walk import DESIGNS, Head, Logits

PRECISIONS = ("default", "high")
REDUCTIONS = ("mean", "sum")


class SegmentLogProbs(NamedTuple):
    token_logprobs: torch.Tensor  # [N] float32 (float64 for float64 input), 0 where ignored
    segment_logprobs: torch.Tensor  # [num_segments], the sums of token_logprobs per segment id


# --- argument checks ----------------------------------------------------------------------------------------------

def check_linear_inputs(prefix: str, hidden, weight, bias) -> tuple[int, int]:
    """Checks hidden [N, H], weight [V, H], bias [V] | None; returns (N, V)."""
    check.tensor(f"{prefix}hidden", hidden, ndim=2, floating=True)
    check.tensor(f"{prefix}weight", weight, ndim=2, floating=True)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{prefix}weight must be [V, H] with H = {prefix}hidden.shape[1] = {hidden.shape[1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{prefix}weight must have at least one vocabulary row")
    if bias is not None:
        check.tensor(f"{prefix}bias", bias, ndim=1, floating=True)
        check.shape(f"{prefix}bias", bias, (weight.shape[0],), "one entry per vocabulary row of weight")
    check.same_device(**{f"{prefix}hidden": hidden, f"{prefix}weight": weight, f"{prefix}bias": bias})
    return hidden.shape[0], weight.shape[0]


def _logits_input(name: str, logits) -> tuple[int, int]:
    check.tensor(name, logits, ndim=2, floating=True)
    if logits.shape[1] == 0:
        raise ValueError(f"{name} must have at least one vocabulary column")
    return logits.shape


def check_targets(targets, n: int, vocab: int, ignore_index, device) -> torch.Tensor:
    """Checks targets [N] and returns them as contiguous int64 with ignored positions set to -1 (so the reference
    is called with these and ``ignore_index=-1``: compared in int64, never in a narrow dtype that wraps -100)."""
    ignore_index = check.integer("ignore_index", ignore_index)
    check.tensor("targets", targets, ndim=1, floating=False)
    check.shape("targets", targets, (n,), "one target per row")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but the inputs are on {device}")
    check.targets_in_range("targets", targets, vocab, ignore_index)
    targets = targets.long()
    return torch.where(targets == ignore_index, torch.full_like(targets, -1), targets).contiguous()


def logit_transform(temperature, scale, softcap, precision, dtype) -> tuple[float, float, Optional[float], Logits]:
    """Checked (temperature, scale, softcap, Logits) of a linear op."""
    temperature = check.temperature(temperature, dtype)
    scale = check.positive_float("scale", scale, dtype)
    if softcap is not None:
        softcap = check.positive_float("softcap", softcap, dtype)
    precision = check.choice("precision", precision, PRECISIONS)
    return temperature, scale, softcap, Logits(1.0 / temperature, scale, softcap or 0.0, precision == "high")


def needed_features(softcap) -> tuple[str, ...]:
    return ("softcap",) if softcap else ()


def _segment_args(segment_ids, num_segments, n: int, device) -> int | None:
    """Checks the optional segment arguments before any work is done; returns num_segments as an int (or None)."""
    if segment_ids is None:
        if num_segments is not None:
            raise ValueError("num_segments is given but segment_ids is None; pass both or neither")
        return None
    if num_segments is None:
        raise ValueError("segment_ids is given but num_segments is None; pass the number of segments")
    num_segments = check.integer("num_segments", num_segments, minimum=0, maximum=check.MAX_OUTPUT_ELEMENTS)
    check.segment_ids("segment_ids", segment_ids, n, num_segments)
    if segment_ids.device != device:
        raise ValueError(f"segment_ids is on {segment_ids.device} but the inputs are on {device}")
    return num_segments


def _with_segments(token_lp, segment_ids, num_segments, backend):
    if segment_ids is None:
        return token_lp
    return SegmentLogProbs(token_lp, segment_sum(token_lp, segment_ids, num_segments, backend=backend))


# --- per-row ops: the custom op and its autograd --------------------------------------------------------------------

@torch.library.custom_op("ra3::vocab_softmax", mutates_args=())
def vocab_softmax_op(backend: str, mode: int, hidden: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
                     targets: Optional[Tensor], inv_temp: float, scale: float, softcap: float,
                     high_precision: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, m, logs, q) [N] in the compute dtype (q [0] for log-probs): out is the log-prob, entropy or KL (mode);
    the rest is the softmax state the backward takes (vocab_softmax_walk._finish)."""
    ref = Head(ref_hidden, ref_weight, ref_bias) if mode == EXACT_KL else None
    return DESIGNS[backend].forward(mode, Head(hidden, weight, bias), ref, targets,
                                    Logits(inv_temp, scale, softcap, high_precision))


@vocab_softmax_op.register_fake
def _(backend, mode, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, inv_temp, scale, softcap,
      high_precision):
    dt = check.compute_dtype(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=dt),
            hidden.new_empty(0 if mode == LOGPROB else n, dtype=dt))


@torch.library.custom_op("ra3::vocab_softmax_backward", mutates_args=())
def vocab_softmax_backward_op(backend: str, mode: int, grad_out: Tensor, m: Tensor, logs: Tensor, q: Tensor,
                              hidden: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                              ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
                              targets: Optional[Tensor], inv_temp: float, scale: float, softcap: float,
                              high_precision: bool, need_weight_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (w.r.t. hidden or logits, weight, bias) of sum(grad_out * out); absent ones are empty tensors."""
    ref = Head(ref_hidden, ref_weight, ref_bias) if mode == EXACT_KL else None
    return DESIGNS[backend].backward(mode, grad_out, m, logs, q, Head(hidden, weight, bias), ref, targets,
                                     Logits(inv_temp, scale, softcap, high_precision), need_weight_grad)


@vocab_softmax_backward_op.register_fake
def _(backend, mode, grad_out, m, logs, q, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets,
      inv_temp, scale, softcap, high_precision, need_weight_grad):
    dt = logs.dtype
    if weight is None:
        return hidden.new_empty(hidden.shape, dtype=dt), logs.new_empty(0), logs.new_empty(0)
    gw = weight.new_empty(weight.shape, dtype=dt) if need_weight_grad else logs.new_empty(0)
    gb = bias.new_empty(bias.shape, dtype=dt) if (bias is not None and need_weight_grad) else logs.new_empty(0)
    return hidden.new_empty(hidden.shape, dtype=dt), gw, gb


def _setup_context(ctx, inputs, output):
    backend, mode, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, *params = inputs
    ctx.backend, ctx.mode, ctx.params = backend, mode, params
    ctx.need_weight_grad = weight is not None and (weight.requires_grad or (bias is not None and bias.requires_grad))
    ctx.save_for_backward(*output[1:], hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets)


def _backward(ctx, grad_out, *_grad_state):
    m, logs, q, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets = ctx.saved_tensors
    gh, gw, gb = vocab_softmax_backward_op(ctx.backend, ctx.mode, grad_out, m, logs, q, hidden, weight, bias,
                                           ref_hidden, ref_weight, ref_bias, targets, *ctx.params,
                                           ctx.need_weight_grad)
    gh = gh.to(hidden.dtype)
    gw = gw.to(weight.dtype) if weight is not None and gw.numel() else None
    gb = gb.to(bias.dtype) if bias is not None and gb.numel() else None
    return None, None, gh, gw, gb, None, None, None, None, None, None, None, None


vocab_softmax_op.register_autograd(_backward, setup_context=_setup_context)


def _run(op: str, mode: int, backend: str, head: Head, ref: Optional[Head], targets, logits: Logits, needs,
         reference_fn):
    """The reference (backend 'torch') or the custom op on the resolved backend; returns [N] in the compute dtype."""
    name = registry.resolve(op, backend, head.hidden.device, needs=needs)
    if name == "torch":
        return reference_fn()
    if head.weight is None:  # logits-input kernels read rows through a stride but need unit stride along V
        head = Head(head.hidden if head.hidden.stride(1) == 1 else head.hidden.contiguous(), None, None)
        if ref is not None and ref.hidden.stride(1) != 1:
            ref = Head(ref.hidden.contiguous(), None, None)
    ref = ref or Head(None, None, None)
    return vocab_softmax_op(name, mode, *head, *ref, targets, *logits)[0]


# --- next-token cross-entropy: gradients in the forward pass ----------------------------------------------------------

@torch.library.custom_op("ra3::vocab_softmax_cross_entropy", mutates_args=())
def cross_entropy_op(backend: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                     inv_temp: float, scale: float, softcap: float, high_precision: bool, mean: bool,
                     need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias) of the summed or mean NLL; gradients empty if not need_grad."""
    count = int((targets >= 0).sum())
    factor = 1.0 / max(count, 1) if mean else 1.0
    return DESIGNS[backend].cross_entropy(Head(hidden, weight, bias), targets,
                                          Logits(inv_temp, scale, softcap, high_precision), factor, need_grad)


@cross_entropy_op.register_fake
def _(backend, hidden, weight, bias, targets, inv_temp, scale, softcap, high_precision, mean, need_grad):
    dt = check.compute_dtype(hidden, weight, bias)
    if not need_grad:
        return (hidden.new_empty((), dtype=dt), hidden.new_empty(0, dtype=dt), hidden.new_empty(0, dtype=dt),
                hidden.new_empty(0, dtype=dt))
    gb = bias.new_empty(bias.shape, dtype=dt) if bias is not None else hidden.new_empty(0, dtype=dt)
    return (hidden.new_empty((), dtype=dt), hidden.new_empty(hidden.shape, dtype=dt),
            weight.new_empty(weight.shape, dtype=dt), gb)


def register_loss_autograd(op, name: str, n_inputs: int, *, weight_grad_flag: bool) -> None:
    """The autograd of a fused loss op whose gradients are formed in its forward pass: inputs (backend, hidden,
    weight, bias, ..., need_grad[, need_weight_grad]) with ``n_inputs`` in all (the last flag only with
    ``weight_grad_flag``); outputs (loss, grad_hidden, grad_weight, grad_bias, ...). The backward scales the saved
    gradients by the upstream one; at the usual upstream 1 it hands the buffers on as they are (a scaled copy of
    grad_weight would be one more [V, H]; under tracing, torch.compile, the upstream is symbolic and never read)."""

    def setup(ctx, inputs, output):
        hidden, weight, bias = inputs[1:4]
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        # not read off the saved sizes: with H = 0 real gradients are empty too
        ctx.need_grad, ctx.need_weight_grad = (inputs[-2], inputs[-1]) if weight_grad_flag else (inputs[-1], True)
        ctx.save_for_backward(*output[1:4])
        # Only the loss is differentiable: autograd would otherwise hand the backward a zero tensor for each other
        # output, a [V, H] one for grad_weight (~120 MiB of peak memory at V = 32000, H = 512 in float32).
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, *_unused):
        gh, gw, gb = ctx.saved_tensors
        if not ctx.need_grad:
            raise RuntimeError(f"{name} was run without gradients (need_grad=False) but is being differentiated; "
                               "call it with inputs that require grad")
        h_dt, w_dt, b_dt = ctx.dtypes
        if type(grad_loss) is torch.Tensor and bool(grad_loss == 1):
            def scaled(t, dt):
                return t.to(dt)
        else:
            def scaled(t, dt):
                return (grad_loss.to(t.dtype) * t).to(dt)
        weight_grad = ctx.need_weight_grad
        return (None, scaled(gh, h_dt), scaled(gw, w_dt) if weight_grad else None,
                scaled(gb, b_dt) if weight_grad and b_dt is not None else None) + (None,) * (n_inputs - 4)

    op.register_autograd(backward, setup_context=setup)


register_loss_autograd(cross_entropy_op, "linear_cross_entropy", 11, weight_grad_flag=False)


# --- public functions -------------------------------------------------------------------------------------------

def linear_logprobs(hidden, weight, targets, *, bias=None, temperature: float = 1.0, ignore_index: int = -100,
                    segment_ids=None, num_segments=None, scale: float = 1.0, softcap: float | None = None,
                    precision: str = "default", backend: str = "auto"):
    """log softmax(softcap(scale * (hidden @ weight.T + bias)) / temperature)[i, targets[i]], logits never
    materialised.

    hidden: [N, H] fp32|bf16|fp16; weight: [V, H]; bias: [V] | None; targets: [N] int, ignore_index -> 0.
    scale > 0, softcap > 0 or None (see the module docstring), precision 'default' | 'high'.
    segment_ids: [N] int (negative = no segment) with num_segments: also return per-segment sums.
    Returns [N] float32 (float64 for float64 input), or SegmentLogProbs(token_logprobs, segment_logprobs).
    Gradients flow to hidden, weight and bias.
    Edges: inputs are not scanned for NaN (a pass over the data): NaN or inf in hidden, weight or bias gives NaN
    (or -inf) in the rows it reaches, without an error; ignored rows are 0 whatever they hold; N = 0 gives [0].
    """
    n, vocab = check_linear_inputs("", hidden, weight, bias)
    temperature, scale, softcap, logits = logit_transform(temperature, scale, softcap, precision,
                                                     check.compute_dtype(hidden, weight, bias))
    tgt = check_targets(targets, n, vocab, ignore_index, hidden.device)
    num_segments = _segment_args(segment_ids, num_segments, n, hidden.device)
    out = _run("logprobs", LOGPROB, backend, Head(hidden, weight, bias), None, tgt, logits, needed_features(softcap),
               lambda: reference.linear_logprobs(hidden, weight, tgt, bias=bias, temperature=temperature,
                                                 ignore_index=-1, scale=scale, softcap=softcap))
    return _with_segments(out, segment_ids, num_segments, backend)


def logprobs(logits, targets, *, temperature: float = 1.0, ignore_index: int = -100, segment_ids=None,
             num_segments=None, backend: str = "auto"):
    """log softmax(logits / temperature)[i, targets[i]] per row, for trainers that already hold logits.

    logits: [N, V] fp32|bf16|fp16; targets: [N] int. Returns as ``linear_logprobs``; gradients flow to logits.
    Edges: a -inf logit is a token of probability 0 (a -inf target gives -inf); NaN or +inf logits, or a row all
    -inf, give NaN in that row, without an error (not scanned for); ignored rows are 0 whatever they hold; N = 0
    gives [0].
    """
    n, vocab = _logits_input("logits", logits)
    temperature = check.temperature(temperature, check.compute_dtype(logits))
    tgt = check_targets(targets, n, vocab, ignore_index, logits.device)
    num_segments = _segment_args(segment_ids, num_segments, n, logits.device)
    out = _run("logprobs", LOGPROB, backend, Head(logits, None, None), None, tgt, Logits(1.0 / temperature), (),
               lambda: reference.logprobs(logits, tgt, temperature=temperature, ignore_index=-1))
    return _with_segments(out, segment_ids, num_segments, backend)


def linear_entropy(hidden, weight, *, bias=None, temperature: float = 1.0, scale: float = 1.0,
                   softcap: float | None = None, precision: str = "default", backend: str = "auto"):
    """Entropy (nats) of softmax(softcap(scale * (hidden @ weight.T + bias)) / temperature) per row, logits never
    materialised.

    hidden: [N, H] fp32|bf16|fp16; weight: [V, H]; bias: [V] | None. Returns [N] float32 (float64 for float64).
    Edges: inputs are not scanned for NaN: NaN or inf in hidden, weight or bias gives NaN in the rows it reaches,
    without an error; N = 0 gives [0].
    """
    check_linear_inputs("", hidden, weight, bias)
    temperature, scale, softcap, logits = logit_transform(temperature, scale, softcap, precision,
                                                     check.compute_dtype(hidden, weight, bias))
    return _run("entropy", ENTROPY, backend, Head(hidden, weight, bias), None, None, logits, needed_features(softcap),
                lambda: reference.linear_entropy(hidden, weight, bias=bias, temperature=temperature, scale=scale,
                                                 softcap=softcap))


def entropy(logits, *, temperature: float = 1.0, backend: str = "auto"):
    """Entropy (nats) of softmax(logits / temperature) per row. logits: [N, V]. Returns [N] float32.

    Edges: -inf logits are entries of probability 0 and add 0; NaN or +inf logits, or a row all -inf, give NaN in
    that row, without an error (not scanned for); N = 0 gives [0].
    """
    _logits_input("logits", logits)
    temperature = check.temperature(temperature, check.compute_dtype(logits))
    return _run("entropy", ENTROPY, backend, Head(logits, None, None), None, None, Logits(1.0 / temperature), (),
                lambda: reference.entropy(logits, temperature=temperature))


def linear_exact_kl(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None, temperature: float = 1.0,
                    scale: float = 1.0, softcap: float | None = None, precision: str = "default",
                    backend: str = "auto"):
    """KL(pi || pi_ref) per row over the whole vocabulary, each side's softmax over
    softcap(scale * (hidden @ weight.T + bias)) / temperature (one transform for both).

    hidden: [N, H]; weight: [V, H]; ref_hidden: [N, H_ref]; ref_weight: [V, H_ref]; biases [V] | None.
    Returns [N] float32 (float64 for float64). Gradients flow to the policy side only; the reference is a constant.
    Edges: inputs are not scanned for NaN: NaN or inf on either side gives NaN (or inf) in the rows it reaches,
    without an error; N = 0 gives [0].
    """
    n, vocab = check_linear_inputs("", hidden, weight, bias)
    n_ref, vocab_ref = check_linear_inputs("ref_", ref_hidden, ref_weight, ref_bias)
    if (n_ref, vocab_ref) != (n, vocab):
        raise ValueError(f"ref_hidden/ref_weight describe {n_ref} rows x {vocab_ref} vocabulary entries but "
                         f"hidden/weight describe {n} x {vocab}; they must match")
    check.same_device(hidden=hidden, ref_hidden=ref_hidden)
    dt = check.compute_dtype(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    temperature, scale, softcap, logits = logit_transform(temperature, scale, softcap, precision, dt)
    ref = Head(ref_hidden.detach(), ref_weight.detach(), None if ref_bias is None else ref_bias.detach())
    return _run("exact_kl", EXACT_KL, backend, Head(hidden, weight, bias), ref, None, logits, needed_features(softcap),
                lambda: reference.linear_exact_kl(hidden, weight, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias,
                                                  temperature=temperature, scale=scale, softcap=softcap))


def exact_kl(logits, ref_logits, *, temperature: float = 1.0, backend: str = "auto"):
    """KL(softmax(logits / T) || softmax(ref_logits / T)) per row. logits, ref_logits: [N, V]. Returns [N].

    Edges: an entry whose logit is -inf adds 0, whatever ref_logits holds there; a -inf ref_logit under a finite
    logit gives +inf; NaN or +inf on either side, or a row all -inf, gives NaN in that row, without an error (not
    scanned for); N = 0 gives [0].
    """
    shape = _logits_input("logits", logits)
    ref_shape = _logits_input("ref_logits", ref_logits)
    if tuple(ref_shape) != tuple(shape):
        raise ValueError(f"ref_logits must have the shape of logits {tuple(shape)}, got {tuple(ref_shape)}")
    check.same_device(logits=logits, ref_logits=ref_logits)
    temperature = check.temperature(temperature, check.compute_dtype(logits, ref_logits))
    return _run("exact_kl", EXACT_KL, backend, Head(logits, None, None), Head(ref_logits.detach(), None, None),
                None, Logits(1.0 / temperature), (),
                lambda: reference.exact_kl(logits, ref_logits, temperature=temperature))


def linear_cross_entropy(hidden, weight, targets, *, bias=None, temperature: float = 1.0, ignore_index: int = -100,
                         reduction: str = "mean", scale: float = 1.0, softcap: float | None = None,
                         precision: str = "default", backend: str = "auto") -> torch.Tensor:
    """-sum or -mean over non-ignored tokens of ``linear_logprobs`` (same arguments), as NTP / SFT / the RA3 M-step
    use it: the gradients are formed in the forward pass while each tile is in memory (3 GEMMs, not 4).

    hidden: [N, H] fp32|bf16|fp16; weight: [V, H]; bias: [V] | None; targets: [N] int (ignore_index skipped).
    reduction: 'mean' (over non-ignored tokens; 0 if there are none) or 'sum'. Returns a float32 scalar
    (float64 for float64 input).
    Edges: inputs are not scanned for NaN: NaN or inf reaching a non-ignored row gives a NaN (or inf) loss without
    an error; ignored rows never reach the loss; with no non-ignored token (N = 0 included) the loss is 0.
    """
    n, vocab = check_linear_inputs("", hidden, weight, bias)
    temperature, scale, softcap, logits = logit_transform(temperature, scale, softcap, precision,
                                                     check.compute_dtype(hidden, weight, bias))
    reduction = check.choice("reduction", reduction, REDUCTIONS)
    tgt = check_targets(targets, n, vocab, ignore_index, hidden.device)
    name = registry.resolve("cross_entropy", backend, hidden.device, needs=needed_features(softcap))
    if name == "torch":
        return reference.linear_cross_entropy(hidden, weight, tgt, bias=bias, temperature=temperature,
                                              ignore_index=-1, reduction=reduction, scale=scale, softcap=softcap)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, *_ = cross_entropy_op(name, hidden, weight, bias, tgt, *logits, reduction == "mean", need_grad)
    return loss

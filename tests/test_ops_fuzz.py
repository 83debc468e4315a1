"""Property fuzz over the argument space of every public op in ``ra3.ops``.

Each case starts from a valid call (odd shapes: 0, 1, primes; every input dtype) and applies up to three
mutations: malformed arguments (huge, NaN or bool scalars, NumPy scalars, strings, meta tensors, wrong dtypes,
ranks and lengths, bad backend names) or legal edges (non-contiguous views, NaN / inf inputs, empty shapes).
The property, per call and backend:
  * a call with a malformed argument raises ValueError or TypeError whose message names an argument of the op
    (one of the malformed ones); any other exception, or a return, fails;
  * a legal call returns the documented type, shape and dtype, finite wherever its inputs are finite;
  * the torch backend (the reference) and the cpu backend raise alike or return alike, values and gradients
    allclose with NaN where both are NaN (the triton backend, in its slow interpreter, on a few cases).
Odd shapes also run in a child process, so a crash in the C++ kernels fails one test instead of killing pytest.
Cases come from a seeded ``random.Random``; each op has at most CASES_PER_OP cases and a share of BUDGET_S.
"""
from __future__ import annotations

import faulthandler
import fractions
import inspect
import numbers
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from ra3 import ops
from ra3.ops import registry

SEED = 20260417
CASES_PER_OP = 500
BUDGET_S = 15.0  # the main-process fuzz of all ops together, wall clock (the child and triton add ~5 s)
MIN_CASES = 100  # per op, whatever the clock says (a loaded machine runs fewer cases, never vacuously few)
HANG_S = 120  # a single op's fuzz running this long is a hang: faulthandler ends the run with a traceback
INF, NAN = float("inf"), float("nan")

# Edge cases where the reference once disagreed with the C++ backend (fixed in ra3/ops/reference.py); the tags
# still label the cases they generate, and KNOWN (the differences excused from the agreement check) is empty.
NEG_INF_LOGITS = "-inf logits: the reference's NaN for 0 * -inf in entropy / exact KL and their gradients"
MASKED_NAN = "NaN or inf at mask-0 tokens of policy_loss (padding): the reference let them reach the loss"
EMPTY_SEQ_MEAN = "B = 0 with a sequence-mean aggregation of policy_loss: the reference divided by B = 0"
EMPTY_BACKPROP = "N = 0 backward: the reference's empty result had no grad_fn"
KNOWN: tuple[str, ...] = ()

OPS = ("linear_logprobs", "logprobs", "linear_cross_entropy", "linear_entropy", "entropy", "linear_exact_kl",
       "exact_kl", "kl", "segment_sum", "group_advantages", "policy_loss")
FLOATS = (torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
VOCAB_OPS = OPS[:7]
# Relative tolerance of torch vs another backend by the dtype compared (gradients come back in the input dtype,
# where one rounding step apart is 2^-8 for bfloat16); the absolute one is rtol x (1 + the largest |value|).
RTOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass
class Case:
    op: str
    args: dict
    bad: set = field(default_factory=set)  # malformed: the call must raise, naming one of these
    loose: set = field(default_factory=set)  # legal or not by dtype: a raise must name one of these
    finite: bool = True  # every float input finite and moderate: float outputs must be finite
    tags: set = field(default_factory=set)  # KNOWN differences this case may meet
    notes: list = field(default_factory=list)  # the mutations applied, for the failure message
    shaped: bool = False  # a rank or length mutation ran: finish() judges the final shapes
    nan_inputs: bool = False  # NaN or +inf in an input: gradients are not compared (their NaN pattern is not specified)
    orig: dict = field(default_factory=dict)  # the valid call's arguments


# --- building valid calls ------------------------------------------------------------------------------------

SIZES = (0, 1, 1, 2, 3, 5, 8, 17, 33)
VOCABS = (1, 2, 3, 7, 16, 31, 64, 129)
HIDDEN = (0, 1, 2, 7, 16)


def _floats(g, shape, dtype, scale=2.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _targets(g, rng, n, vocab, ignore_index=-100):
    t = torch.randint(0, vocab, (n,), generator=g)
    if n and rng.random() < 0.5:
        t[torch.rand(n, generator=g) < 0.3] = ignore_index
    return t


def _segments(g, rng, n):
    num = rng.choice((0, 1, 2, 5, 9))
    if num == 0:
        return torch.full((n,), -1, dtype=torch.long), 0
    return torch.randint(-2, num, (n,), generator=g), num + rng.choice((0, 0, 2))


def build(op, rng, g):
    n, vocab, h = rng.choice(SIZES), rng.choice(VOCABS), rng.choice(HIDDEN)
    dt = rng.choice(FLOATS)
    a = {}
    if op in ("linear_logprobs", "linear_cross_entropy", "linear_entropy", "linear_exact_kl"):
        a["hidden"], a["weight"] = _floats(g, (n, h), dt), _floats(g, (vocab, h), rng.choice(FLOATS), 0.5)
        if rng.random() < 0.4:
            a["bias"] = _floats(g, (vocab,), rng.choice(FLOATS))
        if op == "linear_exact_kl":
            hr = rng.choice(HIDDEN)
            a["ref_hidden"], a["ref_weight"] = _floats(g, (n, hr), dt), _floats(g, (vocab, hr), dt, 0.5)
            if rng.random() < 0.4:
                a["ref_bias"] = _floats(g, (vocab,), dt)
    if op in ("logprobs", "entropy", "exact_kl"):
        a["logits"] = _floats(g, (n, vocab), dt, 3.0)
        if op == "exact_kl":
            a["ref_logits"] = _floats(g, (n, vocab), rng.choice(FLOATS), 3.0)
    if op in ("linear_logprobs", "logprobs", "linear_cross_entropy"):
        a["targets"] = _targets(g, rng, n, vocab)
        if op != "linear_cross_entropy" and rng.random() < 0.3:
            a["segment_ids"], a["num_segments"] = _segments(g, rng, n)
        if op == "linear_cross_entropy":
            a["reduction"] = rng.choice(("mean", "sum"))
    if op in VOCAB_OPS and rng.random() < 0.5:
        a["temperature"] = rng.choice((0.5, 1.0, 1.7, 3))
    if op == "kl":
        shape = rng.choice(((n,), (n, vocab), (), (2, n, 3)))
        a["logprobs"] = -_floats(g, shape, dt).abs()
        a["ref_logprobs"] = -_floats(g, shape, rng.choice(FLOATS)).abs()
        a["estimator"] = rng.choice(("k1", "k2", "k3"))
    if op == "segment_sum":
        a["values"] = _floats(g, (n,), dt)
        a["segment_ids"], a["num_segments"] = _segments(g, rng, n)
    if op == "group_advantages":
        # Continuous rewards, or 0/1 ones (exact group means): no nearly-constant group to amplify rounding.
        a["rewards"] = _floats(g, (n,), dt) if rng.random() < 0.6 else torch.randint(0, 2, (n,), generator=g).to(dt)
        a["normalize"] = rng.choice(("std", "mean", "rloo", "none"))
        how = rng.choice(("size", "ids", "none"))
        if how == "size" and n:
            a["group_size"] = rng.choice([d for d in range(1, n + 1) if n % d == 0])
        elif how == "ids":
            a["group_ids"] = torch.randint(0, max(1, n // 2), (n,), generator=g) * rng.choice((1, 3))
        if rng.random() < 0.3:
            a["eps"] = rng.choice((1e-6, 1e-3, 0.5))
    if op == "policy_loss":
        b, t = n, rng.choice((0, 1, 3, 6, 11))
        a["logprobs"] = -_floats(g, (b, t), dt, 1.0).abs()
        a["old_logprobs"] = a["logprobs"].detach() + _floats(g, (b, t), dt, 0.3)
        a["advantages"] = _floats(g, (b,) if rng.random() < 0.5 else (b, t), dt, 1.0)
        a["mask"] = rng.choice((lambda: torch.rand(b, t, generator=g) < 0.7,
                                lambda: torch.rand(b, t, generator=g).round(),
                                lambda: torch.rand(b, t, generator=g).to(dt),
                                lambda: torch.randint(0, 2, (b, t), generator=g)))()
        if rng.random() < 0.5:
            a["ref_logprobs"] = -_floats(g, (b, t), dt, 1.0).abs()
            a["kl_coef"] = rng.choice((0.0, 0.05, 1.0))
            a["kl_estimator"] = rng.choice(("k1", "k2", "k3"))
        a["aggregation"] = rng.choice(("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"))
        if rng.random() < 0.3:
            a["clip_low"], a["clip_high"] = rng.choice(((0.2, 0.2), (0.0, 0.0), (0.1, 0.28)))
    return Case(op, a, orig=dict(a))


# --- mutations ---------------------------------------------------------------------------------------------

def _num_bad():
    return [NAN, INF, -INF, 10 ** 400, -10 ** 400, 10 ** 5000, True, False, "1.0", [1.0], complex(1, 0),
            np.bool_(True), np.float64(NAN), torch.tensor(1.0), None]


SCALARS = {  # name: (malformed values, legal values, values legal for float64 inputs only)
    "temperature": (_num_bad() + [0.0, 0, -1.0, np.float32(0)],
                    [1, 0.25, 4.0, np.float32(0.7), np.float64(1.5), np.int64(2), fractions.Fraction(3, 4)],
                    # Not 1e-39 or 1e-300: the gradients scale as 1 / T and rightly overflow a float32 bias.
                    [1e300]),
    "eps": (_num_bad() + [-1e-6], [1e-8, 1e30, np.float32(1e-5), fractions.Fraction(1, 1000), 0, 0.0], [1e300]),
    "clip_low": (_num_bad() + [1.0, 1.5, -0.1], [0, 0.0, 0.99, np.float32(0.1), fractions.Fraction(1, 5)], []),
    "clip_high": (_num_bad() + [-0.1], [0, 5, 1e30, np.float64(0.3)], [1e300]),
    "kl_coef": (_num_bad() + [-1.0], [0, 0.05, 100.0, np.float32(0.1)], [1e300]),
    "ignore_index": ([2 ** 70, -2 ** 64 - 5, 2 ** 63, 10 ** 5000, 1.5, -100.0, True, "-100", None,
                      torch.tensor(1.5), torch.tensor([1, 2]), torch.tensor(-100, device="meta"), np.float64(-100)],
                     [-1, -100, np.int64(-100), np.int32(-7), torch.tensor(-100), 2 ** 62, -2 ** 63], []),
    "num_segments": ([-1, 2 ** 70, 2 ** 62, 10 ** 5000, 3.0, True, "3", torch.tensor(2.0), np.float32(3)],
                     [], []),  # legal ones: the valid call's, as NumPy, tensor or larger (_mut_scalar)
    "group_size": ([0, -2, 2 ** 70, 10 ** 5000, 2.0, True, "2", torch.tensor([1, 2])], [], []),  # legal: 1
}
CHOICE_BAD = ["", "K3", "sum ", None, 3, b"k3", torch.tensor(1), np.array(["k3"]), ["k1"]]
BACKEND_BAD = ["jax", "", None, 1, "Torch", "cuda", b"cpu", np.array(["cpu"])]


def _forget(case, *names):
    """The arguments get fresh values: what earlier mutations said about them no longer holds."""
    for name in names:
        case.bad.discard(name)
        case.loose.discard(name)


def _mut_scalar(case, rng, name):
    bad, good, f64_only = SCALARS[name]
    _forget(case, name)
    pick = rng.random()
    if name == "num_segments" and "num_segments" in case.orig and pick >= 0.5:
        num = case.orig["num_segments"]
        value = rng.choice([np.int64(num), torch.tensor(num), num + 3, np.uint8(num) if num <= 255 else num])
        case.args[name] = value
        return f"{name}={_short(value)}"
    if name == "group_size" and pick >= 0.5:
        case.args[name] = rng.choice([np.int64(1), torch.tensor(1), 1])
        case.args.pop("group_ids", None)
        _forget(case, "group_ids")
        return f"{name}=1"
    if pick < 0.5 or not (good or f64_only):
        value = rng.choice(bad)
        case.bad.add(name)
    elif f64_only and pick > 0.85:
        value = rng.choice(f64_only)
        case.loose.add(name)
    else:
        value = rng.choice(good)
        if name == "eps" and value == 0:
            case.loose.add(name)  # finish() decides: 0 is malformed with normalize='std' only
    case.args[name] = value
    return f"{name}={_short(value)}"


def _short(value):
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<int of {value.bit_length()} bits>"  # 10**5000 has no str() in Python >= 3.11
    return f"{value!r:.60}"


def _noncontiguous(t):
    if t.dim() == 0 or t.numel() == 0:
        return t
    if t.dim() == 1:
        out = torch.empty(t.shape[0] * 2, dtype=t.dtype)[::2]
        return out.copy_(t)
    return t.T.contiguous().T if t.dim() == 2 else t.transpose(0, -1).contiguous().transpose(0, -1)


def _wrong_dtype(rng, t):
    if t.is_floating_point():
        return t.to(rng.choice((torch.int64, torch.complex64, torch.bool)))
    return t.to(rng.choice((torch.float32, torch.complex64, torch.bool)))


def _legal_dtype(rng, t, role):
    if role == "float":
        return t.to(rng.choice((torch.float32, torch.bfloat16, torch.float16, torch.float64)))
    if role == "mask":
        return t.to(rng.choice((torch.bool, torch.float32, torch.int64, torch.bfloat16, torch.uint8)))
    lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
    fits = [d for d in INDEX if torch.iinfo(d).min <= lo and hi <= torch.iinfo(d).max]
    return t.to(rng.choice(fits))


def _poison(rng, t, value):
    """t with `value` at a few random places, as a new (contiguous) tensor."""
    t = t.contiguous().clone()
    if t.numel() == 0:
        return t
    flat = t.view(-1)
    idx = rng.sample(range(flat.numel()), k=min(flat.numel(), rng.choice((1, 2, 5))))
    flat[idx] = value
    return t


ROLES = {
    "hidden": "float", "weight": "float", "bias": "float", "ref_hidden": "float", "ref_weight": "float",
    "ref_bias": "float", "logits": "float", "ref_logits": "float", "logprobs": "float", "ref_logprobs": "float",
    "old_logprobs": "float", "advantages": "float", "values": "float", "rewards": "float",
    "targets": "index", "segment_ids": "index", "group_ids": "index", "mask": "mask",
}


def _mut_tensor(case, rng, name):
    t = case.args[name]
    role = ROLES[name]
    if name in case.bad or t.device.type == "meta":
        return None  # malformed already: mutate something else
    kind = rng.choice(("meta", "type", "dtype", "rank", "length", "legal_dtype", "noncontig", "noncontig",
                       "nonfinite", "nonfinite", "legal_dtype") + (("wrapped",) * 2 if name == "targets" else ()))
    if kind == "meta":
        case.args[name] = t.to("meta")
        case.bad.add(name)
    elif kind == "type":
        case.args[name] = rng.choice((t.tolist(), t.numpy() if t.dtype != torch.bfloat16 else t.tolist(), 3.0))
        case.bad.add(name)
    elif kind == "dtype" and role != "mask":
        case.args[name] = _wrong_dtype(rng, t)
        case.bad.add(name)
    elif kind == "dtype":
        case.args[name] = t.to(torch.complex64)
        case.bad.add(name)
    elif kind == "rank":  # finish() decides from the final shapes whether the call is still legal
        scalar = t.reshape(-1)[:1].reshape(()) if t.numel() else t.sum()
        case.args[name] = rng.choice((t.unsqueeze(0), t.unsqueeze(-1), t.reshape(-1), scalar))
        case.shaped = True
    elif kind == "length":
        if t.dim() == 0:
            return None
        dim = rng.randrange(t.dim())
        if t.shape[dim] == 0 or rng.random() < 0.5:
            pad = list(t.shape)
            pad[dim] = 1
            case.args[name] = torch.cat([t, torch.zeros(pad, dtype=t.dtype)], dim)
        else:
            case.args[name] = t.narrow(dim, 1, t.shape[dim] - 1)
        case.shaped = True
    elif kind == "wrapped":  # uint8 targets holding ignore_index mod 256: torch's uint8 == -100 matches 156
        ig = _int_like(case.args.get("ignore_index", -100))
        if ig is None or not -2 ** 63 <= ig < 2 ** 63 or t.numel() == 0:
            return None
        case.args[name] = torch.where(t.long() == ig, ig % 256, t.long()).to(torch.uint8)  # finish() judges it
    elif kind == "legal_dtype":
        case.args[name] = _legal_dtype(rng, t, role)
    elif kind == "noncontig":
        case.args[name] = _noncontiguous(t)
    elif kind == "nonfinite" and role == "float":
        value = rng.choice((NAN, INF, -INF))
        if t.numel() == 0:
            return None
        case.args[name] = _poison(rng, t, value)
        if name in ("rewards", "advantages"):
            case.bad.add(name)  # checked: finite rewards / advantages are documented
        else:
            case.finite = False
            poisoned = case.args[name]
            # A -inf logit (or bias entry) is a masked vocabulary entry of probability 0: values and gradients are
            # specified. Anything else non-finite gives NaN / inf whose gradients are not: they are not compared.
            if value == -INF and name in ("logits", "ref_logits", "bias", "ref_bias"):
                case.tags.add(NEG_INF_LOGITS)
                rows = poisoned.reshape(-1, poisoned.shape[-1]) if poisoned.dim() else poisoned.reshape(1, 1)
                if name.startswith("ref_") or bool((rows == -INF).all(-1).any()):
                    case.nan_inputs = True  # q = 0 under p > 0 (KL +inf), or a row with no finite logit
            else:
                case.nan_inputs = True
    elif kind == "nonfinite" and role == "mask":
        if t.numel() == 0:
            return None
        case.args[name] = _poison(rng, t.to(torch.float32), rng.choice((NAN, INF, -INF)))
        case.bad.add(name)  # checked: mask weights must be finite
    else:
        return None
    return f"{name}:{kind}"


def _mut_masked_padding(case, rng):
    """NaN / inf in logprobs-like inputs exactly where the mask is 0: documented not to count."""
    m = case.args.get("mask")
    if not _usable(m) or m.numel() == 0 or m.is_complex() or "mask" in case.bad:
        return None
    pad = m == 0
    if not pad.any():
        return None
    for name in ("logprobs", "old_logprobs", "ref_logprobs"):
        t = case.args.get(name)
        if _usable(t) and t.is_floating_point() and t.shape == m.shape and name not in case.bad:
            case.args[name] = torch.where(pad, torch.full_like(t, rng.choice((NAN, INF, -INF))), t)
    case.tags.add(MASKED_NAN)
    return "masked NaN padding"


def _mut_sparse_groups(case, rng):
    r = case.args["rewards"]
    n = r.shape[0] if isinstance(r, torch.Tensor) and r.dim() == 1 else 0
    ids = torch.tensor([rng.choice((0, 7, 2 ** 40, 2 ** 62)) for _ in range(n)], dtype=torch.long)
    case.args["group_ids"] = ids
    case.args.pop("group_size", None)
    _forget(case, "group_ids", "group_size")
    return "sparse group_ids"


def _mut_choice(case, rng, name):
    case.args[name] = rng.choice(CHOICE_BAD)
    case.bad.add(name)
    return f"{name}=bad"


def _mut_drop(case, rng, name):
    """Leaves out one of two arguments that go together (segment_ids and num_segments)."""
    case.args.pop(name, None)
    _forget(case, name)
    return f"drop {name}"


# Per op, the mutations drawn from (uniformly): an argument's name (a scalar or tensor mutation of it), a pair
# ("choice" | "drop", name), or "padding" / "sparse" (policy_loss / group_advantages edges); "backend" for all.
MUTATIONS = {
    "linear_logprobs": ["hidden", "weight", "bias", "targets", "segment_ids", "temperature", "ignore_index",
                        "num_segments", ("drop", "num_segments"), ("drop", "segment_ids")],
    "logprobs": ["logits", "targets", "segment_ids", "temperature", "ignore_index", "num_segments",
                 ("drop", "num_segments")],
    "linear_cross_entropy": ["hidden", "weight", "bias", "targets", "temperature", "ignore_index",
                             ("choice", "reduction")],
    "linear_entropy": ["hidden", "weight", "bias", "temperature"],
    "entropy": ["logits", "temperature"],
    "linear_exact_kl": ["hidden", "weight", "ref_hidden", "ref_weight", "bias", "ref_bias", "temperature"],
    "exact_kl": ["logits", "ref_logits", "temperature"],
    "kl": ["logprobs", "ref_logprobs", ("choice", "estimator")],
    "segment_sum": ["values", "segment_ids", "num_segments"],
    "group_advantages": ["rewards", "group_ids", "group_size", "eps", ("choice", "normalize"), "sparse"],
    "policy_loss": ["logprobs", "old_logprobs", "advantages", "mask", "ref_logprobs", "clip_low", "clip_high",
                    "kl_coef", ("choice", "kl_estimator"), ("choice", "aggregation"), "padding", "padding"],
}


def mutate(case, rng):
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        m = "backend" if rng.random() < 0.06 else rng.choice(MUTATIONS[case.op])
        if m == "backend":
            case.args["backend"] = rng.choice(BACKEND_BAD)
            case.bad.add("backend")
            note = "backend=bad"
        elif m == "padding":
            note = _mut_masked_padding(case, rng)
        elif m == "sparse":
            note = _mut_sparse_groups(case, rng)
        elif isinstance(m, tuple) and m[0] == "choice":
            note = _mut_choice(case, rng, m[1])
        elif isinstance(m, tuple) and m[0] == "drop":
            note = _mut_drop(case, rng, m[1])
        elif m in SCALARS:
            note = _mut_scalar(case, rng, m)
        elif isinstance(case.args.get(m), torch.Tensor):
            note = _mut_tensor(case, rng, m)
        else:
            note = None
        if note:
            case.notes.append(note)


def _int_like(v):
    if isinstance(v, torch.Tensor):
        return int(v) if v.numel() == 1 and v.dtype in INDEX and v.device.type != "meta" else None
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
        return int(v)
    return None


def _real(v):
    """v as a float where the ops take it as a number (Python or NumPy, not bool), else None."""
    if isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)):
        try:
            return float(v)
        except OverflowError:
            return None
    return None


def _usable(t, dim=None):
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and (dim is None or t.dim() == dim)


class _Unknown(Exception):
    """A tensor argument is not a usable tensor: another mutation has made the call malformed already."""


def _sh(a, name, optional=False):
    v = a.get(name)
    if v is None and optional:
        return None
    if not _usable(v):
        raise _Unknown
    return tuple(v.shape)


def shapes_fit(op, a):
    """Whether the final tensor shapes fit the op's documented shapes; None where that cannot be told."""
    try:
        ok, n, vocab = True, None, None
        if op in ("linear_logprobs", "linear_cross_entropy", "linear_entropy", "linear_exact_kl"):
            sides = (("hidden", "weight", "bias"), ("ref_hidden", "ref_weight", "ref_bias"))
            for i, (hn, wn, bn) in enumerate(sides[:2 if op == "linear_exact_kl" else 1]):
                h, w, b = _sh(a, hn), _sh(a, wn), _sh(a, bn, True)
                ok = ok and len(h) == 2 and len(w) == 2 and w[1] == h[1] and w[0] >= 1 and b in (None, w[:1])
                if ok and i == 0:
                    n, vocab = h[0], w[0]
                ok = ok and (h[0], w[0]) == (n, vocab)  # the reference side: as many rows, the same vocabulary
        elif op in ("logprobs", "entropy", "exact_kl"):
            lg = _sh(a, "logits")
            ok = len(lg) == 2 and lg[1] >= 1 and (op != "exact_kl" or _sh(a, "ref_logits") == lg)
            n = lg[0] if len(lg) == 2 else None
        if op in ("linear_logprobs", "logprobs", "linear_cross_entropy"):
            ok = ok and _sh(a, "targets") == (n,) and _sh(a, "segment_ids", True) in (None, (n,))
        elif op == "kl":
            ok = _sh(a, "logprobs") == _sh(a, "ref_logprobs")
        elif op == "segment_sum":
            v = _sh(a, "values")
            ok = len(v) == 1 and _sh(a, "segment_ids") == v
        elif op == "group_advantages":
            r = _sh(a, "rewards")
            ok = len(r) == 1 and _sh(a, "group_ids", True) in (None, r)
        elif op == "policy_loss":
            lp = _sh(a, "logprobs")
            ok = (len(lp) == 2 and _sh(a, "old_logprobs") == lp and _sh(a, "advantages") in (lp[:1], lp)
                  and _sh(a, "mask") == lp and _sh(a, "ref_logprobs", True) in (None, lp))
        return ok
    except _Unknown:
        return None


def finish(case):
    """The relations between arguments that single mutations can break, decided on the final arguments."""
    a = case.args
    tensors = {k for k, v in a.items() if isinstance(v, torch.Tensor) or k in ROLES}
    fit = shapes_fit(case.op, a)
    if fit is False:
        case.bad |= tensors  # a mismatch may be reported under either tensor's name
    elif fit is None and case.shaped:
        case.loose |= tensors
    if case.op in ("linear_logprobs", "logprobs", "linear_cross_entropy"):
        t, ig = a.get("targets"), _int_like(a.get("ignore_index", -100))
        source = a.get("logits" if case.op == "logprobs" else "weight")
        vocab = source.shape[case.op == "logprobs"] if _usable(source, 2) else None
        if _usable(t, 1) and t.dtype in INDEX and vocab and ig is not None and -2 ** 63 <= ig < 2 ** 63:
            live = t.long()[t.long() != ig]
            if live.numel() and (int(live.min()) < 0 or int(live.max()) >= vocab):
                case.bad |= {"targets", "ignore_index"}
        if ("segment_ids" in a) != ("num_segments" in a):
            case.bad |= {"segment_ids", "num_segments"}
    if case.op in ("linear_logprobs", "logprobs", "segment_sum") and "segment_ids" in a:
        ids, num = a["segment_ids"], _int_like(a.get("num_segments"))
        if _usable(ids, 1) and ids.dtype in INDEX and num is not None and ids.numel() and int(ids.max()) >= num:
            case.bad |= {"segment_ids", "num_segments"}
    if case.op == "group_advantages":
        if "group_size" in a and "group_ids" in a:
            case.bad |= {"group_size", "group_ids"}
        r, gs = a.get("rewards"), _int_like(a.get("group_size"))
        if _usable(r, 1) and gs is not None and gs > 0 and r.shape[0] % gs:
            case.bad.add("group_size")
        if a.get("normalize", "std") == "std" and _real(a.get("eps", 1e-6)) == 0:
            case.bad.add("eps")
    if case.op == "policy_loss":
        kc = _real(a.get("kl_coef", 0.0))
        if a.get("ref_logprobs") is None and kc is not None and kc > 0:
            case.bad |= {"kl_coef", "ref_logprobs"}
        lp = a.get("logprobs")
        if _usable(lp) and lp.dim() >= 1 and lp.shape[0] == 0 and a.get("aggregation") != "token-mean":
            case.tags.add(EMPTY_SEQ_MEAN)
    if any(isinstance(v, torch.Tensor) and v.numel() == 0 for v in a.values()):
        case.tags.add(EMPTY_BACKPROP)
    return case


def make_case(op, seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    case = build(op, rng, g)
    mutate(case, rng)
    return finish(case)


# --- running and judging a case ------------------------------------------------------------------------------

def _outputs(out):
    """The float tensors a result holds, flattened in a fixed order."""
    return list(out) if isinstance(out, tuple) else [out]


def _expected(case):
    """(type, shapes) the docstring promises for the valid form of the call."""
    a = case.args
    floats = [v for v in a.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    dt = torch.float64 if any(v.dtype == torch.float64 for v in floats
                              if case.op != "policy_loss" or v is not a.get("mask")) else torch.float32
    op = case.op
    if op in ("linear_logprobs", "logprobs"):
        n = (a["hidden"] if op == "linear_logprobs" else a["logits"]).shape[0]
        if "segment_ids" in a:
            return ops.SegmentLogProbs, [(n,), (_int_like(a["num_segments"]),)], dt
        return torch.Tensor, [(n,)], dt
    if op == "linear_cross_entropy":
        return torch.Tensor, [()], dt
    if op in ("linear_entropy", "linear_exact_kl"):
        return torch.Tensor, [(a["hidden"].shape[0],)], dt
    if op in ("entropy", "exact_kl"):
        return torch.Tensor, [(a["logits"].shape[0],)], dt
    if op == "kl":
        return torch.Tensor, [tuple(a["logprobs"].shape)], dt
    if op == "segment_sum":
        return torch.Tensor, [(_int_like(a["num_segments"]),)], dt
    if op == "group_advantages":
        return torch.Tensor, [tuple(a["rewards"].shape)], dt
    return ops.PolicyLoss, [()] * 4, dt


def _grad_inputs(case):
    return [k for k, v in case.args.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and v.device.type == "cpu" and ROLES.get(k) == "float"]


def call(case, backend, grad):
    """Runs the op; returns ('raised', exc) or ('ok', outputs, grads)."""
    args = dict(case.args)
    args.setdefault("backend", backend)
    names = _grad_inputs(case) if grad else []
    for k in names:
        args[k] = args[k].detach().requires_grad_()
    fn = getattr(ops, case.op)
    try:
        out = fn(**args)
    except Exception as exc:  # judged by the caller: only ValueError / TypeError naming an argument pass
        return "raised", exc
    grads = None
    first = _outputs(out)[0]  # policy_loss: only `loss` carries a gradient
    if names and first.requires_grad:
        up = torch.linspace(-1, 1, first.numel(), dtype=torch.float64).reshape(first.shape)
        try:
            gs = torch.autograd.grad((first.double() * up).sum(), [args[k] for k in names], allow_unused=True)
        except Exception as exc:
            return "raised-backward", exc
        grads = {k: (torch.zeros(args[k].shape) if gr is None else gr) for k, gr in zip(names, gs)}
    elif names:
        grads = "detached"  # inputs require grad but the result does not: judge() fails it (N = 0 aside)
    return "ok", out, grads


_ARG_NAMES = {op: tuple(inspect.signature(getattr(ops, op)).parameters) for op in OPS}


def _names(msg, op):
    return {a for a in _ARG_NAMES[op] if re.search(rf"(?<![A-Za-z0-9_]){a}(?![A-Za-z0-9_])", msg)}


def _compare_dtype(case):
    """float64 where every float input is float64; else float32 rounding is in play (the reference may round a
    side's GEMM in float32 where a kernel runs it in float64: linear_exact_kl with one float64 side)."""
    floats = [v for k, v in case.args.items() if ROLES.get(k) == "float" and isinstance(v, torch.Tensor)]
    return torch.float64 if all(v.dtype == torch.float64 for v in floats) else torch.float32


def _close(a, b, dtype):
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if not torch.equal(a.isnan(), b.isnan()):
        return "NaN at different places"
    fin = b[torch.isfinite(b)]
    scale = 1.0 + (fin.abs().max().item() if fin.numel() else 0.0)
    rtol = RTOL[dtype]
    atol = rtol * scale
    if not torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True).all():
        bad = ~torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
        return f"values differ: {a[bad][:4].tolist()} vs {b[bad][:4].tolist()}"
    return None


class Stats:
    def __init__(self):
        self.calls = self.raised = self.returned = self.compared = self.skipped = 0
        self.skipped_by = {}  # KNOWN tag: agreement checks skipped for it
        self.seconds = 0.0


def judge(case, backend, result, stats):
    """Checks one backend's result against the case's contract; returns it, or None if the call raised."""
    where = f"{case.op}[{backend}] {case.notes}"
    stats.calls += 1
    if result[0] == "raised":
        exc = result[1]
        assert isinstance(exc, (ValueError, TypeError)), f"{where}: {type(exc).__name__}: {exc}"
        named = _names(str(exc), case.op)
        assert named, f"{where}: {type(exc).__name__} names no argument of {case.op}: {exc}"
        allowed = case.bad | case.loose
        assert allowed, f"{where}: a legal call raised {type(exc).__name__}: {exc}"
        assert named & allowed, f"{where}: the error names {sorted(named)}, not one of {sorted(allowed)}: {exc}"
        stats.raised += 1
        return None
    # The reference is what the KNOWN differences are about: its own edge results are not judged in those cases.
    reference_known = backend == "torch" and bool(case.tags & set(KNOWN))
    if result[0] == "raised-backward":
        if reference_known:
            stats.skipped += 1
            return None
        exc = result[1]
        raise AssertionError(f"{where}: backward raised {type(exc).__name__}: {exc}")
    assert not case.bad, f"{where}: returned although {sorted(case.bad)} is malformed"
    stats.returned += 1
    out, grads = result[1], result[2]
    kind, shapes, dt = _expected(case)
    assert isinstance(out, kind), f"{where}: returned {type(out).__name__}, expected {kind.__name__}"
    for o, s in zip(_outputs(out), shapes):
        assert tuple(o.shape) == s, f"{where}: shape {tuple(o.shape)}, expected {s}"
        assert o.dtype == dt, f"{where}: dtype {o.dtype}, expected {dt}"
        if case.finite and not reference_known:
            assert torch.isfinite(o).all(), f"{where}: non-finite output from finite inputs: {o}"
    if grads == "detached":
        assert reference_known, f"{where}: inputs require grad but the result carries none"
        grads = None
    if grads is not None and case.finite and not reference_known:
        for k, gr in grads.items():  # float16 tops out at 65504: 1 / eps of a constant group overflows it, rightly
            assert gr.dtype == torch.float16 or torch.isfinite(gr).all(), f"{where}: non-finite gradient of {k}"
    if not reference_known:
        _documented_edges(case, out, where)
    return result[0], out, grads


def _documented_edges(case, out, where):
    """The per-op edge lines of the docstrings that are cheap to check on any returned call."""
    a = case.args
    if case.op in ("linear_logprobs", "logprobs"):
        tok = out[0] if isinstance(out, tuple) else out
        ignored = a["targets"].long() == _int_like(a.get("ignore_index", -100))
        assert (tok[ignored] == 0).all(), f"{where}: an ignored row is not 0: {tok}"
    if case.op == "segment_sum":
        ids, v = a["segment_ids"].long(), a["values"].double()
        for k in range(min(out.shape[0], 64)):
            if bool(torch.isfinite(v[ids == k]).all()):
                assert torch.isfinite(out[k]), f"{where}: segment {k} holds only finite values but sums to {out[k]}"
    if case.op == "policy_loss":
        live = torch.as_tensor(a["mask"]) != 0
        if not bool(live.any()):
            assert all(float(o.detach()) == 0 for o in out), f"{where}: no masked token, results {out}"
        if MASKED_NAN in case.tags and case.finite:
            assert all(bool(torch.isfinite(o)) for o in out), f"{where}: a mask-0 token reached the results: {out}"


def agree(case, ref, other, backend, stats):
    """torch (ref) and another backend: raise alike, return alike (values and gradients allclose)."""
    where = f"{case.op}[torch vs {backend}] {case.notes}"
    known = case.tags & set(KNOWN)
    if (ref is None) != (other is None):
        if known:
            stats.skipped += 1
            for k in known:
                stats.skipped_by[k] = stats.skipped_by.get(k, 0) + 1
            return
        raise AssertionError(f"{where}: one backend raised and the other returned")
    if ref is None:
        return
    diffs = []
    cmp = _compare_dtype(case)
    for i, (x, y) in enumerate(zip(_outputs(ref[1]), _outputs(other[1]))):
        d = _close(y, x, cmp)
        if d:
            diffs.append(f"output {i}: {d}")
    if ref[2] is not None and other[2] is not None and not case.nan_inputs:
        for k in ref[2]:
            d = _close(other[2][k], ref[2][k], max(case.args[k].dtype, cmp, key=RTOL.get))
            if d:
                diffs.append(f"grad {k}: {d}")
    if diffs and known:  # one of the KNOWN reference differences, fixed separately: not judged here
        stats.skipped += 1
        for k in known:
            stats.skipped_by[k] = stats.skipped_by.get(k, 0) + 1
        return
    assert not diffs, f"{where}: {'; '.join(diffs)}"
    stats.compared += 1


def fuzz_op(op, seed, n_cases, budget_s, backends=("torch", "cpu")):
    """Runs up to n_cases cases of ``op`` (fewer, but at least MIN_CASES, if budget_s runs out); returns the Stats."""
    stats = Stats()
    start = time.perf_counter()
    for i in range(n_cases):
        if i == 1:
            start = time.perf_counter()  # the clock starts after the first case: it pays the one-off warm-up
        if i >= MIN_CASES and time.perf_counter() - start > budget_s:
            break
        case = make_case(op, seed * 1000003 + i)
        grad = (i % 3 == 0)
        results = {b: judge(case, b, call(case, b, grad), stats) for b in backends}
        for b in backends[1:]:
            agree(case, results[backends[0]], results[b], b, stats)
    stats.seconds = time.perf_counter() - start
    return stats


def _have(backend):
    try:
        registry.resolve("logprobs", backend, torch.device("cpu"))
        return True
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def _no_hang():
    faulthandler.dump_traceback_later(HANG_S, exit=True)  # a hang ends pytest with every thread's traceback
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize("op", OPS)
def test_fuzz_op(op):
    backends = ("torch", "cpu") if _have("cpu") else ("torch",)
    stats = fuzz_op(op, SEED + OPS.index(op), CASES_PER_OP, BUDGET_S / len(OPS), backends)
    # Not vacuous: every op both raised and returned on some cases, and agreed across backends on some.
    assert stats.raised and stats.returned, f"{op}: {stats.raised} raised, {stats.returned} returned"
    if len(backends) > 1:
        assert stats.compared, f"{op}: no case compared across backends"


TRITON_CASES = 20  # per op: Triton's interpreter runs a kernel in milliseconds to seconds


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside Triton's interpreter, on NaN inputs
@pytest.mark.parametrize("op", OPS)
def test_fuzz_triton_subset(op):
    if not _have("triton"):
        pytest.skip("the triton backend cannot run here (no triton, or no GPU and TRITON_INTERPRET unset)")
    stats = fuzz_op(op, SEED + 7919 + OPS.index(op), TRITON_CASES, 0.5, ("torch", "triton"))
    assert stats.returned, f"{op}: no triton case returned"


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
import test_ops_fuzz as f
from ra3.ops import vocab_softmax_walk
# Odder still: vocabulary chunks of 7 columns (a ragged last chunk, offsets into every row), prime sizes, H = 0.
vocab_softmax_walk.MIN_CHUNK = 1
vocab_softmax_walk.chunk_size = lambda n, vocab, device: min(vocab, 7)
f.SIZES, f.VOCABS, f.HIDDEN = (0, 1, 1, 2, 3, 7, 13), (1, 2, 3, 5, 7, 8, 29), (0, 1, 3)
for i, op in enumerate(f.OPS):
    f.fuzz_op(op, {seed} + i, {n}, 60.0, ("torch", "cpu"))
print("ok")
"""


def test_odd_shapes_into_cpu_kernels_in_a_child_process():
    """The same property on odd shapes (0, 1, primes, H = 0, 7-column vocabulary chunks, strided views) in a child
    process: a crash in ra3._C fails this test with its signal instead of ending pytest."""
    if not _have("cpu"):
        pytest.skip("ra3._C (the cpu backend) is not built")
    code = _CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)), seed=SEED + 555, n=40)
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90, env=env)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the child hung for {exc.timeout} s") from None
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), \
        f"child exited with {proc.returncode}:\n{proc.stderr[-4000:]}"


def test_cpu_softmax_keeps_scaled_logits_finite():
    """Legal temperatures that scale a logit far enough that half an ulp of it exceeds exp's range: the reference
    gives log-prob 0 for the row max; the cpu kernel gave -inf (float32, T = 1e-9: 2.9 / T is 2.9e9 rounded, the
    fused product is 95.4 above it, exp(95.4) = inf) and +inf (float64, T = 1e-30: exp(-2.4e14) = 0 sums to 0)
    while GCC contracted z * inv_temp - m into an FMA; the CPU kernels build with -ffp-contract=off."""
    if not _have("cpu"):
        pytest.skip("ra3._C (the cpu backend) is not built")
    for dtype, temperature in ((torch.float32, 1e-9), (torch.float64, 1e-30)):
        logits = torch.tensor([[0.0, 1.0, 2.9]], dtype=dtype)
        got = ops.logprobs(logits, torch.tensor([2]), temperature=temperature, backend="cpu")
        want = ops.logprobs(logits, torch.tensor([2]), temperature=temperature, backend="torch")
        assert torch.isfinite(got).all() and torch.allclose(got.double(), want.double()), (dtype, got, want)

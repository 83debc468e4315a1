"""Bad input raises TypeError/ValueError naming the argument, on every backend, before any kernel runs."""
from __future__ import annotations

import fractions
import inspect
import math

import numpy as np
import pytest
import torch

from conftest import ALL_BACKENDS, backend_device, require_backend
from ra3 import ops


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    require_backend(request.param, "logprobs")
    return request.param


def _lin(n=4, h=6, v=10):
    return torch.randn(n, h), torch.randn(v, h), torch.randint(0, v, (n,))


@pytest.mark.parametrize("mutate, exc, name", [
    (lambda h, w, t: (h[:, :5], w, t), ValueError, "weight"),
    (lambda h, w, t: (h, w, t[:3]), ValueError, "targets"),
    (lambda h, w, t: (h, w, t.float()), TypeError, "targets"),
    (lambda h, w, t: (h.long(), w, t), TypeError, "hidden"),
    (lambda h, w, t: (h[0], w, t), ValueError, "hidden"),
    (lambda h, w, t: (h, w, torch.tensor([0, 1, 10, 2])), ValueError, "targets"),
    (lambda h, w, t: (h, w, torch.tensor([0, -5, 1, 2])), ValueError, "targets"),
    (lambda h, w, t: ("hidden", w, t), TypeError, "hidden"),
])
def test_linear_logprobs_rejects(backend, mutate, exc, name):
    h, w, t = mutate(*_lin())
    with pytest.raises(exc, match=name):
        ops.linear_logprobs(h, w, t, backend=backend)


def test_argument_errors_name_the_argument(backend):
    h, w, t = _lin()
    with pytest.raises(ValueError, match="temperature"):
        ops.linear_logprobs(h, w, t, temperature=0.0, backend=backend)
    with pytest.raises(ValueError, match="bias"):
        ops.linear_logprobs(h, w, t, bias=torch.zeros(9), backend=backend)
    with pytest.raises(ValueError, match="segment_ids"):
        ops.linear_logprobs(h, w, t, segment_ids=torch.tensor([0, 1, 2, 3]), num_segments=3, backend=backend)
    with pytest.raises(ValueError, match="num_segments"):
        ops.linear_logprobs(h, w, t, segment_ids=torch.tensor([0, 1, 2, 3]), backend=backend)
    with pytest.raises(ValueError, match="ref_logits"):
        ops.exact_kl(torch.randn(3, 5), torch.randn(3, 6), backend=backend)
    with pytest.raises(ValueError, match="estimator"):
        ops.kl(torch.randn(3), torch.randn(3), "k4", backend=backend)
    with pytest.raises(ValueError, match="ref_logprobs"):
        ops.kl(torch.randn(3), torch.randn(4), backend=backend)
    with pytest.raises(ValueError, match="rewards"):
        ops.group_advantages(torch.tensor([1.0, float("nan")]), backend=backend)
    with pytest.raises(ValueError, match="group_size"):
        ops.group_advantages(torch.randn(6), group_size=4, backend=backend)
    with pytest.raises(ValueError, match="normalize"):
        ops.group_advantages(torch.randn(6), group_size=3, normalize="z", backend=backend)
    with pytest.raises(ValueError, match="group_ids"):
        ops.group_advantages(torch.randn(3), group_ids=torch.tensor([0, -1, 1]), backend=backend)
    lp = torch.randn(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        ops.policy_loss(lp, lp, torch.randn(3), torch.ones(2, 3), backend=backend)
    with pytest.raises(ValueError, match="advantages"):
        ops.policy_loss(lp, lp, torch.tensor([1.0, float("inf")]), torch.ones(2, 3), backend=backend)
    with pytest.raises(ValueError, match="mask"):
        ops.policy_loss(lp, lp, torch.randn(2), torch.ones(2, 4), backend=backend)
    with pytest.raises(ValueError, match="ref_logprobs"):
        ops.policy_loss(lp, lp, torch.randn(2), torch.ones(2, 3), kl_coef=0.1, backend=backend)
    with pytest.raises(ValueError, match="aggregation"):
        ops.policy_loss(lp, lp, torch.randn(2), torch.ones(2, 3), aggregation="sum", backend=backend)
    with pytest.raises(ValueError, match="clip_low"):
        ops.policy_loss(lp, lp, torch.randn(2), torch.ones(2, 3), clip_low=1.5, backend=backend)
    with pytest.raises(ValueError, match="num_segments"):
        ops.segment_sum(torch.randn(3), torch.tensor([0, 5, 1]), 5, backend=backend)


def test_unknown_or_unusable_backend():
    h, w, t = _lin()
    with pytest.raises(ValueError, match="backend"):
        ops.linear_logprobs(h, w, t, backend="jax")
    with pytest.raises(ValueError, match="backend='cuda'"):
        ops.linear_logprobs(h, w, t, backend="cuda")  # CPU tensors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to place tensors on two devices")
def test_tensors_on_different_devices():
    h, w, t = _lin()
    with pytest.raises(ValueError, match="weight"):
        ops.linear_logprobs(h, w.cuda(), t)


def test_non_contiguous_inputs_are_handled(backend):
    hidden = torch.randn(8, 6).T  # [6, 8] non-contiguous
    weight = torch.randn(8, 10).T  # [10, 8] non-contiguous
    targets = torch.randint(0, 10, (12,))[::2]
    out = ops.linear_logprobs(hidden, weight, targets, backend=backend)
    want = ops.linear_logprobs(hidden.contiguous(), weight.contiguous(), targets.contiguous(), backend="torch")
    assert torch.allclose(out, want, atol=1e-5)
    logits = torch.randn(10, 6).T  # [6, 10] with unit stride along rows, not along the vocabulary
    assert torch.allclose(ops.logprobs(logits, targets, backend=backend),
                          ops.logprobs(logits.contiguous(), targets, backend="torch"), atol=1e-5)


# --- scalars and tensors on every edge: nothing overflows, allocates or reads a meta tensor before the checks ---

def _calls(backend):
    """One legal call per public op on the backend's device, as (op name, function, kwargs)."""
    return [(op, fn, {k: _on(backend, v) for k, v in kw.items()}) for op, fn, kw in _cpu_calls()]


def _on(backend, value):
    return value.to(backend_device(backend)) if isinstance(value, torch.Tensor) else value


def _cpu_calls():
    h, w, t = _lin()
    lp, seg = torch.randn(2, 3), torch.tensor([0, 1, 1, 0])
    return [
        ("linear_logprobs", ops.linear_logprobs, dict(hidden=h, weight=w, targets=t, segment_ids=seg, num_segments=2)),
        ("logprobs", ops.logprobs, dict(logits=torch.randn(4, 10), targets=t, segment_ids=seg, num_segments=2)),
        ("linear_cross_entropy", ops.linear_cross_entropy, dict(hidden=h, weight=w, targets=t)),
        ("linear_entropy", ops.linear_entropy, dict(hidden=h, weight=w)),
        ("entropy", ops.entropy, dict(logits=torch.randn(4, 10))),
        ("linear_exact_kl", ops.linear_exact_kl, dict(hidden=h, weight=w, ref_hidden=h, ref_weight=w)),
        ("exact_kl", ops.exact_kl, dict(logits=torch.randn(4, 10), ref_logits=torch.randn(4, 10))),
        ("kl", ops.kl, dict(logprobs=lp, ref_logprobs=lp)),
        ("segment_sum", ops.segment_sum, dict(values=torch.randn(4), segment_ids=seg, num_segments=2)),
        ("group_advantages", ops.group_advantages, dict(rewards=torch.randn(4), group_ids=seg)),
        ("policy_loss", ops.policy_loss, dict(logprobs=lp, old_logprobs=lp, advantages=torch.randn(2),
                                              mask=torch.ones(2, 3), ref_logprobs=lp, kl_coef=0.1)),
    ]


@pytest.mark.parametrize("name", ["temperature", "eps", "clip_low", "clip_high", "kl_coef"])
@pytest.mark.parametrize("value, exc", [pytest.param(10 ** 400, ValueError, id="10**400"),
                                        pytest.param(10 ** 5000, ValueError, id="10**5000"),
                                        (-1e400, ValueError), (float("inf"), ValueError),
                                        (float("nan"), ValueError), (True, TypeError), ("0.1", TypeError),
                                        (None, TypeError), (torch.tensor(0.1), TypeError)])
def test_float_scalars_never_overflow(backend, name, value, exc):
    hit = 0
    for op, fn, kw in _calls(backend):
        if name in inspect.signature(fn).parameters:
            with pytest.raises(exc, match=rf"^{name}\b"):
                fn(**{**kw, name: value}, backend=backend)
            hit += 1
    assert hit


@pytest.mark.parametrize("name, value, exc", [
    ("ignore_index", 2 ** 70, ValueError), ("ignore_index", 2 ** 63, ValueError),
    pytest.param("ignore_index", 10 ** 5000, ValueError, id="ignore_index-10**5000"),
    ("ignore_index", True, TypeError), ("ignore_index", -100.0, TypeError), ("ignore_index", "x", TypeError),
    ("ignore_index", torch.tensor(-100, device="meta"), TypeError), ("ignore_index", torch.tensor(True), TypeError),
    ("num_segments", 2 ** 70, ValueError), ("num_segments", 2 ** 62, ValueError), ("num_segments", -1, ValueError),
    ("num_segments", 2.0, TypeError), ("num_segments", torch.tensor(2 + 0j), TypeError),
    ("group_size", 2 ** 70, ValueError), ("group_size", 0, ValueError), ("group_size", np.float64(2), TypeError),
])
def test_int_scalars_never_overflow(backend, name, value, exc):
    hit = 0
    for op, fn, kw in _calls(backend):
        if name in inspect.signature(fn).parameters:
            kw = {k: v for k, v in kw.items() if not (name == "group_size" and k == "group_ids")}
            with pytest.raises(exc, match=rf"^{name}\b"):
                fn(**{**kw, name: value}, backend=backend)
            hit += 1
    assert hit


def test_numpy_scalars_are_numbers(backend):
    t = _on(backend, torch.randint(0, 10, (4,)))
    logits = _on(backend, torch.randn(4, 10))
    for temp in (np.float32(0.5), np.float64(0.5), np.int64(2), fractions.Fraction(1, 2)):
        a = ops.logprobs(logits, t, temperature=temp, ignore_index=np.int64(-100), backend=backend)
        b = ops.logprobs(logits, t, temperature=float(temp), backend="torch")
        assert torch.allclose(a, b, atol=1e-5) and a.shape == (4,)
    out = ops.segment_sum(_on(backend, torch.ones(3)), _on(backend, torch.tensor([0, 1, 1])), np.int32(2),
                          backend=backend)
    assert out.tolist() == [1.0, 2.0]
    ops.group_advantages(_on(backend, torch.randn(4)), group_size=np.int64(2), eps=np.float32(1e-3), backend=backend)


@pytest.mark.parametrize("name", ["estimator", "normalize", "kl_estimator", "aggregation", "reduction", "backend"])
def test_choices_that_are_not_strings(name):
    for op, fn, kw in _calls("torch"):
        if name in inspect.signature(fn).parameters:
            for value in (None, 3, torch.tensor([1, 2]), np.array(["k3", "k1"]), b"k3"):
                with pytest.raises(TypeError, match=rf"^{name}\b"):
                    fn(**{**kw, name: value})


def test_meta_tensors_are_refused_before_any_value_is_read(backend):
    for op, fn, kw in _calls(backend):
        for name, value in kw.items():
            if isinstance(value, torch.Tensor):
                meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
                for args in (meta, {**kw, name: value.to("meta")}):
                    with pytest.raises(ValueError, match=r"meta device"):
                        fn(**args, backend=backend)
        with pytest.raises(ValueError, match=r"meta device") as err:
            fn(**{k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}, backend=backend)
        first = next(k for k, v in kw.items() if isinstance(v, torch.Tensor))
        assert str(err.value).startswith(first), (op, str(err.value))


def test_sparse_group_ids_are_compacted(backend):
    """Any ids >= 0 are groups: [0, 0, 2**40, 2**40] is two groups, with nothing allocated per unused id."""
    rewards = _on(backend, torch.tensor([1.0, 3.0, 2.0, 7.0, 5.0]))
    dense = _on(backend, torch.tensor([0, 0, 1, 1, 2]))
    for sparse in (torch.tensor([0, 0, 2 ** 40, 2 ** 40, 2 ** 62]), torch.tensor([5, 5, 9, 9, 6]),
                   torch.tensor([7, 7, 3, 3, 2 ** 62], dtype=torch.int64)):
        for normalize in ("std", "mean", "rloo", "none"):
            want = ops.group_advantages(rewards, group_ids=dense, normalize=normalize, backend="torch")
            got = ops.group_advantages(rewards, group_ids=_on(backend, sparse), normalize=normalize, backend=backend)
            assert torch.allclose(got, want, atol=1e-6), (sparse, normalize, got, want)


def test_std_normalisation_needs_positive_eps(backend):
    constant = _on(backend, torch.ones(4))
    for eps in (0, 0.0, 1e-45):  # 1e-45 rounds to a float32 subnormal: below float32's smallest normal
        with pytest.raises(ValueError, match=r"^eps\b"):
            ops.group_advantages(constant, group_size=2, eps=eps, backend=backend)
    for normalize in ("mean", "rloo", "none"):
        assert torch.isfinite(ops.group_advantages(constant, group_size=2, normalize=normalize, eps=0,
                                                   backend=backend)).all()
    assert ops.group_advantages(constant, group_size=2, eps=1e-30, backend=backend).eq(0).all()


def test_temperature_must_stay_normal_in_the_compute_dtype(backend):
    logits, t = _on(backend, torch.randn(4, 10)), _on(backend, torch.randint(0, 10, (4,)))
    for temp in (1e-39, 1e-300, 1e38, 1e300):
        with pytest.raises(ValueError, match=r"^temperature\b"):
            ops.logprobs(logits, t, temperature=temp, backend=backend)
    # float64 inputs take what float64 can hold (1e300: its reciprocal is still a normal float64)
    assert torch.isfinite(ops.logprobs(logits.double(), t, temperature=1e300, backend=backend)).all()


def test_narrow_targets_are_compared_with_ignore_index_in_int64(backend):
    """uint8 targets: torch compares 156 == -100 as True (it wraps the scalar); the op must not."""
    logits = _on(backend, torch.randn(2, 10))
    targets = _on(backend, torch.tensor([156, 1], dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"^targets holds 156"):
        ops.logprobs(logits, targets, backend=backend)
    with pytest.raises(ValueError, match=r"^targets holds 100"):
        ops.logprobs(logits, _on(backend, torch.tensor([100, 1], dtype=torch.int8)), ignore_index=356,
                     backend=backend)
    ok = ops.logprobs(logits, _on(backend, torch.tensor([255, 1], dtype=torch.uint8)), ignore_index=255,
                      backend=backend)
    assert ok[0] == 0


def test_policy_loss_mask_is_real_and_finite(backend):
    lp, adv = _on(backend, torch.randn(2, 3)), _on(backend, torch.randn(2))
    with pytest.raises(TypeError, match=r"^mask\b"):
        ops.policy_loss(lp, lp, adv, _on(backend, torch.ones(2, 3, dtype=torch.complex64)), backend=backend)
    for bad in (float("nan"), float("inf")):
        mask = torch.ones(2, 3)
        mask[1, 2] = bad
        with pytest.raises(ValueError, match=r"^mask\b"):
            ops.policy_loss(lp, lp, adv, _on(backend, mask), backend=backend)
    for dtype in (torch.bool, torch.int64, torch.bfloat16):
        ops.policy_loss(lp, lp, adv, _on(backend, torch.ones(2, 3, dtype=dtype)), backend=backend)


def test_cross_entropy_backward_with_empty_hidden_size(backend):
    """H = 0: every gradient is empty, but the op ran with gradients and must differentiate."""
    for n in (3, 0):
        hidden = _on(backend, torch.zeros(n, 0)).requires_grad_()
        weight = _on(backend, torch.zeros(5, 0)).requires_grad_()
        targets = _on(backend, torch.zeros(n, dtype=torch.long))
        loss = ops.linear_cross_entropy(hidden, weight, targets, backend=backend)
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        assert gh.shape == (n, 0) and gw.shape == (5, 0)
        assert abs(loss.item() - (math.log(5) if n else 0.0)) < 1e-5

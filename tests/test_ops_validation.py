"""Bad input raises TypeError/ValueError naming the argument, on every backend, before any kernel runs."""
from __future__ import annotations

import pytest
import torch

from conftest import ALL_BACKENDS, require_backend
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

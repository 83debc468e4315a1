"""The benchmark's cases (benchmarks/ops.py): every implementation of an op computes the same function of the
same inputs, so the recorded rows compare like with like."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks.ops import PEERS, PRESETS, _make_case, flops
from conftest import require_backend


def _value(fn, *args) -> float:
    return float(fn(*args).float().sum())


@pytest.mark.parametrize("op", sorted(PRESETS["quick"]))
@pytest.mark.parametrize("backend", ("torch", "cpu"))
def test_a_case_computes_eager_s_function(op, backend):
    require_backend(backend, "logprobs")
    make, eager, fused = _make_case(op, PRESETS["quick"][op][0], "cpu", torch.float32)
    inputs = make()
    want = _value(eager, *inputs)
    got = _value(fused, *inputs, backend)
    assert abs(got - want) <= 1e-4 * max(abs(want), 1.0), (op, backend, got, want)


@pytest.mark.parametrize("backend", ("torch", "cpu"))
def test_the_unfused_grpo_row_computes_eager_s_function(backend):
    require_backend(backend, "logprobs")
    make, eager, fused = _make_case("linear_grpo", PRESETS["quick"]["linear_grpo"][0], "cpu", torch.float32)
    inputs = make()
    want = _value(eager, *inputs)
    got = float(fused(*inputs, backend, unfused=True))
    assert abs(got - want) <= 1e-4 * max(abs(want), 1.0), (backend, got, want)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_liger_s_grpo_loss_is_the_case_s_loss():
    """Liger's loss_type='grpo' and ra3's seq-mean-token-mean aggregation are one loss (Liger's chunked losses are
    plain torch, so they run on CPU)."""
    make, eager, fused = _make_case("linear_grpo", PRESETS["quick"]["linear_grpo"][0], "cpu", torch.float32)
    inputs = make()
    assert "liger" in PEERS["linear_grpo"]
    want = _value(eager, *inputs)
    assert abs(_value(fused, *inputs, "liger") - want) <= 1e-4 * abs(want)


def test_flops_count_the_tokens_of_either_shape():
    assert flops("linear_logprobs", dict(N=8, H=4, V=10)) == 6 * 8 * 4 * 10
    assert flops("linear_grpo", dict(B=2, T=4, H=4, V=10)) == 6 * 8 * 4 * 10
    assert flops("kl", dict(N=8)) is None

"""backend='auto': the measured per-op order (ra3/ops/auto_order.json, from recorded benchmarks), then the static one."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks.auto_order import main as write_table, order_from_report
from ra3.ops import registry


def _report(device="cpu"):
    row = lambda op, impl, ms, **shape: {"op": op, "impl": impl, "time_ms": ms, "shape": shape}  # noqa: E731
    return {"device": device, "device_name": "test", "date": "2026-12-01", "dtype": "float32", "rows": [
        row("kl", "torch-eager", 1.0, N=8), row("kl", "ra3:cpu", 3.0, N=8), row("kl", "ra3:torch", 2.0, N=8),
        row("kl", "ra3:torch", 0.1, N=2),  # a smaller shape does not vote
        row("linear_logprobs", "ra3:torch", 1.0, N=4, H=2, V=8), row("linear_logprobs", "ra3:cpu", 5.0, N=4, H=2, V=8),
        row("linear_cross_entropy", "ra3:torch", 0.5, N=4, H=2, V=8),  # the reference alone: no order
        {"op": "segment_sum", "impl": "ra3:cpu", "shape": {"N": 8}, "error": "boom"},
    ]}


def test_order_from_a_report_ranks_backends_and_never_the_reference_for_fused_linear_ops():
    assert order_from_report(_report()) == {"kl": ["torch", "cpu"], "logprobs": ["cpu"]}


def test_auto_follows_the_measured_table_then_the_static_order(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_report()))
    table = tmp_path / "auto_order.json"
    assert write_table([str(path), "--out", str(table)]) == 0
    assert json.loads(table.read_text())["order"] == {"cpu": {"kl": ["torch", "cpu"], "logprobs": ["cpu"]}}
    monkeypatch.setattr(registry, "AUTO_TABLE_FILE", table)
    registry.measured_order.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert registry.auto_order("kl", "cpu") == ("torch", "cpu")
        assert registry.auto_order("segment_sum", "cpu") == registry.AUTO_ORDER["cpu"]  # not measured
        assert registry.auto_order("kl", "cuda") == registry.AUTO_ORDER["cuda"]
        assert registry.resolve("kl", "auto", cpu) == "torch"
        if registry._usable("cpu", "cpu"):
            assert registry.resolve("segment_sum", "auto", cpu) == "cpu"
    finally:
        registry.measured_order.cache_clear()


def test_a_missing_or_broken_table_falls_back(tmp_path, monkeypatch):
    broken = tmp_path / "auto_order.json"
    broken.write_text("{not json")
    for path in (broken, tmp_path / "missing.json"):
        monkeypatch.setattr(registry, "AUTO_TABLE_FILE", path)
        registry.measured_order.cache_clear()
        assert registry.auto_order("kl", "cpu") == registry.AUTO_ORDER["cpu"]
    registry.measured_order.cache_clear()


def test_the_shipped_table_names_known_backends_and_ops():
    if not registry.AUTO_TABLE_FILE.exists():
        pytest.skip("no auto_order.json recorded")
    table = json.loads(registry.AUTO_TABLE_FILE.read_text())
    assert table["sources"], "the table must say which recorded benchmarks it came from"
    for dev, ops in table["order"].items():
        for op, order in ops.items():
            assert op in registry.OPS and set(order) <= set(registry.BACKENDS), (dev, op, order)


def test_designs_are_backend_names_and_features_steer_auto(monkeypatch):
    """'cuda-torch' / 'triton-fused' are designs of the vocabulary-softmax ops: elsewhere they run their base
    backend; a soft-cap skips (with auto) or refuses (by name) the designs that cannot apply one."""
    monkeypatch.setattr(registry, "_usable", lambda backend, dev: True)
    cuda = torch.device("cuda")
    assert registry.resolve("logprobs", "cuda-torch", cuda) == "cuda-torch"
    assert registry.resolve("cross_entropy", "triton-fused", cuda) == "triton-fused"
    assert registry.resolve("kl", "cuda-torch", cuda) == "cuda"
    assert registry.resolve("policy_loss", "triton-fused", cuda) == "triton"
    monkeypatch.setattr(registry, "measured_order", lambda: {})
    assert registry.resolve("logprobs", "auto", cuda) == "cuda"
    assert registry.resolve("logprobs", "auto", cuda, needs=("softcap",)) == "cuda-torch"
    with pytest.raises(ValueError, match="backend='cuda' does not implement softcap"):
        registry.resolve("logprobs", "cuda", cuda, needs=("softcap",))
    with pytest.raises(ValueError, match="triton-fused"):
        registry.resolve("logprobs", "triton-fused", cuda, needs=("softcap",))

"""A seeded 2-round RA3 run of the embedded default: it finishes, the E-step return and the ELBO rise, and a run
killed mid-E-step / mid-M-step resumes to the same metrics as the uninterrupted one."""
from __future__ import annotations

import json

import pytest

from ra3.midtrain import MidtrainConfig, run_midtrain

# wall-clock fields differ between runs; everything else must match exactly
TIMING = ("time_s", "rollout_s", "tokens_per_s")


def small_config(out, **overrides) -> MidtrainConfig:
    """The embedded default, shrunk to ~10 s: 2 rounds of 3 E-steps and 8 M-steps on 80 short documents."""
    base = dict(out=str(out), objective="ra3", em_iterations=2, corpus_limit=80, max_actions=10, e_steps=3,
                e_docs_per_step=4, group_size=2, max_rationale_tokens=4, annotate_docs=32, m_steps=8,
                m_batch_size=8, checkpoint_every=2, progress=False, num_samples=2, seed=0)
    base.update(overrides)
    return MidtrainConfig(**base)


def comparable(records):
    return [{k: v for k, v in r.items() if not any(k.endswith(t) for t in TIMING)} for r in records]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, run_midtrain(small_config(out))


def test_two_round_run_finishes_and_improves(full_run):
    out, result = full_run
    assert result["status"] == "completed"
    its = [r for r in result["records"] if r["kind"] == "iteration"]
    steps = [r for r in result["records"] if r["kind"] == "step"]
    assert [r["iteration"] for r in its] == [0, 1]
    assert len(steps) == 2 * (3 + 8)
    assert [r["phase"] for r in steps[:4]] == ["e_step"] * 3 + ["m_step"]
    for key in ("iteration", "elbo", "expert_loglik", "thinks_per_100_lines", "estep_return_mean", "mstep_loss",
                "heldout_ntp_loss"):
        assert all(r[key] is not None for r in its), key
    assert its[1]["estep_return_mean"] > its[0]["estep_return_mean"]
    assert its[1]["elbo"] > its[0]["elbo"]
    assert its[1]["heldout_ntp_loss"] < its[0]["heldout_ntp_loss"]
    # the fixed-cost ELBO is the expert log-likelihood minus c per think
    for r in its:
        assert r["elbo_fixed"] == pytest.approx(r["expert_loglik"] - r["cost_paid"], abs=1e-3)
        assert 0 <= r["thinks_per_100_lines"] <= 100
    # what a run leaves behind
    assert (out / "metrics.jsonl").exists() and (out / "summary.md").exists() and (out / "config.yaml").exists()
    assert "| ra3 | 1 |" in (out / "summary.md").read_text()
    sample = (out / "samples" / "ra3-iter1.md").read_text()
    assert "```python" in sample and "ELBO" in sample
    assert (out / "ra3" / "final" / "config.json").exists()
    from ra3.models import load_model

    model, tok = load_model(out / "ra3" / "final")
    assert len(tok.encode("\n#", add_special_tokens=False)) == 1
    ck = __import__("torch").load(out / "checkpoints" / "ra3" / "latest.pt", weights_only=False)
    assert ck["progress"]["done"] and ck["config"]["think_cost"] == 0.05


def test_killed_run_resumes_to_the_same_metrics(full_run, tmp_path):
    _, reference = full_run
    # killed after step 3 (mid E-step: last checkpoint at step 2 holds the reference policy and the optimizer)
    first = run_midtrain(small_config(tmp_path, stop_after_steps=3))
    assert first["status"] == "stopped"
    # resumed, killed again after 12 more steps (mid E-step of round 1)
    second = run_midtrain(small_config(tmp_path, stop_after_steps=12))
    assert second["status"] == "stopped"
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["iteration"] == 1 and last["phase"] == "e_step"
    final = run_midtrain(small_config(tmp_path))
    assert final["status"] == "completed"
    assert comparable(final["records"]) == comparable(reference["records"])
    # a finished run is not redone, and changing what it computes is refused
    again = run_midtrain(small_config(tmp_path))
    assert comparable(again["records"]) == comparable(reference["records"])
    with pytest.raises(ValueError, match="think_cost"):
        run_midtrain(small_config(tmp_path, think_cost=0.2))


def test_exact_kl_form_and_returns_to_go_run(tmp_path):
    result = run_midtrain(small_config(tmp_path, em_iterations=1, e_steps=2, m_steps=2, kl_form="exact",
                                       advantage="returns-to-go", kl_coef=0.0, format_penalty=0.1, discount=0.9,
                                       num_samples=0))
    its = [r for r in result["records"] if r["kind"] == "iteration"]
    assert its[0]["elbo"] == its[0]["elbo_exact"]
    assert its[0]["elbo_exact"] == pytest.approx(its[0]["expert_loglik"] - its[0]["kl_decision"]
                                                 - its[0]["kl_comment"], abs=1e-2)

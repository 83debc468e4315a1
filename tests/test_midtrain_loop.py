"""A seeded 2-round RA3 run of the embedded default: it finishes, the E-step return and the ELBO rise, and a run
killed mid-E-step / mid-M-step resumes to the same metrics as the uninterrupted one."""
from __future__ import annotations

import ast
import json
import re

import pytest

from ra3.midtrain import MidtrainConfig, run_midtrain

# wall-clock fields differ between runs; everything else must match exactly
TIMING = ("time_s", "rollout_s", "tokens_per_s")


def small_config(out, **overrides) -> MidtrainConfig:
    """The embedded default, shrunk to ~10 s: 2 rounds of 3 E-steps and 8 M-steps on 80 short documents."""
    base = dict(out=str(out), objective="ra3", em_iterations=2, corpus_limit=80, max_actions=10, e_steps=3,
                e_docs_per_step=4, group_size=2, max_rationale_tokens=4, annotate_docs=None, m_steps=8, m_lr=1e-3,
                m_batch_size=8, checkpoint_every=2, progress=False, num_samples=2, seed=0)
    base.update(overrides)
    return MidtrainConfig(**base)


def _parses(text: str) -> bool:
    try:
        ast.parse(text)
        return True
    except SyntaxError:
        return False


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
    # every round annotates the same training documents (annotate_docs covers them all), so the ELBO is measured on
    # one set: after an M-step on them it is higher
    assert its[1]["elbo"] > its[0]["elbo"]
    m_losses = [r["loss"] for r in steps if r["phase"] == "m_step"]
    assert sum(m_losses[-4:]) < sum(m_losses[:4])
    for r in its:
        assert 0 <= r["thinks_per_100_lines"] <= 100 and 0 < r["think_q_mean"] < 1
        assert r["heldout_code_loss"] > 0
    # what a run leaves behind
    assert (out / "metrics.jsonl").exists() and (out / "summary.md").exists() and (out / "config.yaml").exists()
    assert "| ra3 | 1 |" in (out / "summary.md").read_text()
    sample = (out / "samples" / "ra3-iter1.md").read_text()
    assert "```python" in sample and "ELBO" in sample
    # each heading counts its thinks in words ("1 think", "0 thinks", "2 thinks")
    headings = re.findall(r"^## document \d+: (\d+) (thinks?) ", sample, re.M)
    assert headings
    for n, word in headings:
        assert word == ("think" if n == "1" else "thinks"), (n, word)
    for block in sample.split("```python\n")[1:]:
        code = block.split("```")[0]
        plain = "".join(line for line in code.splitlines(True) if not line.lstrip().startswith("#"))
        if _parses(plain):  # documents cut at max_actions may end mid-block; those that parse still do annotated
            ast.parse(code)
    # no token added, no embedding row edited: the final model has exactly the base model's vocabulary
    from ra3.models import load_model

    base_model, base_tok = load_model("ra3-tiny")
    model, tok = load_model(out / "ra3" / "final")
    assert len(tok) == len(base_tok) and tok.get_vocab() == base_tok.get_vocab()
    assert model.get_input_embeddings().weight.shape == base_model.get_input_embeddings().weight.shape
    ck = __import__("torch").load(out / "checkpoints" / "ra3" / "latest.pt", weights_only=False)
    assert ck["progress"]["done"] and ck["config"]["think_cost"] == 0.05


def test_ra3_and_ntp_train_on_the_same_documents_in_the_same_order(tmp_path):
    result = run_midtrain(small_config(tmp_path, objective="both", em_iterations=1, e_steps=1, m_steps=5,
                                       num_samples=0))
    steps = [r for r in result["records"] if r["kind"] == "step" and r["phase"] == "m_step"]
    ra3 = [r["documents_crc"] for r in steps if r["objective"] == "ra3"]
    ntp = [r["documents_crc"] for r in steps if r["objective"] == "ntp"]
    assert len(ra3) == len(ntp) == 5 and ra3 == ntp and len(set(ra3)) > 1
    summary = (tmp_path / "summary.md").read_text()
    assert "Matched: the same documents in the same order" in summary and "RA3's extra compute" in summary


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


def test_exact_kl_form_and_whole_return_run(tmp_path):
    result = run_midtrain(small_config(tmp_path, em_iterations=1, e_steps=2, m_steps=2, kl_form="exact",
                                       advantage="return", kl_coef=0.0, format_penalty=0.1, discount=0.9,
                                       num_samples=0))
    its = [r for r in result["records"] if r["kind"] == "iteration"]
    # the exact bound pays at least the Bernoulli KL of every decision point (>= 0) on top of the likelihood
    assert its[0]["elbo_exact"] <= its[0]["expert_loglik"] + 1e-6
    assert its[0]["kl_decision"] >= 0 and its[0]["kl_comment"] >= 0

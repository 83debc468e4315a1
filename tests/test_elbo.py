"""The ELBO on a model small enough to enumerate every latent sequence, checked against a hand computation.

Toy vocabulary: 0 bos, 1 pad, 2 "\\n" (act, and the end of a comment), 3 "\\n#" (think), 4 "a", 5 "b".
The document has two actions ("ab", "b"), so two boundaries; with max_rationale_tokens = 1 each boundary is
act, or think with comment "" / "a" / "b": 16 latent sequences. The hand computation uses only the model's
full logits; the code under test goes through build_sequence, pack, the fused ops and elbo.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from ra3.data.sequences import DecisionTokens, Document, build_sequence
from ra3.midtrain.batch import pack
from ra3.midtrain.elbo import elbo, line_rewards, returns
from ra3.midtrain.rollout import HFGenerator
from ra3.midtrain.scoring import HeadRows, score_rollouts

BOS, PAD, NL, THINK, A, B = range(6)
TOKENS = DecisionTokens(act_id=NL, think_id=THINK, bos_id=BOS, pad_id=PAD, comment_ids=(A, B, NL))
DOC = Document(text="ab\nb\n", actions=["ab", "b"], action_ids=[[A, B], [B]])
OPTIONS = [None, [NL], [A, NL], [B, NL]]  # act, or think with these comment tokens
ALPHA, COST = 0.7, 0.3


@pytest.fixture(scope="module")
def toy_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.6, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=BOS,
                      pad_token_id=PAD)
    return LlamaForCausalLM(cfg).double().eval()


def latents():
    for choice in itertools.product(OPTIONS, repeat=DOC.num_actions):
        yield {k: c for k, c in enumerate(choice) if c is not None}


def hand_terms(model, comments: dict) -> tuple[float, float, float]:
    """(log q(z), log pi(x | z), log p(z)) from the full logits of one teacher-forced pass."""
    ids, spans = [BOS], []
    for k, action in enumerate(DOC.action_ids):
        if k in comments:
            start = len(ids)
            ids += [THINK] + comments[k]
            spans.append(("think", start, comments[k]))
        else:
            spans.append(("act", len(ids), None))
            ids.append(NL)
        spans.append(("code", len(ids), action))
        ids += action
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    log_q = log_pi = log_p = 0.0
    comment_vocab = list(TOKENS.comment_ids)
    for kind, start, toks in spans:
        if kind == "code":
            log_pi += sum(float(logp[start + j - 1, t]) for j, t in enumerate(toks))
            continue
        two_way = torch.log_softmax(logp[start - 1, [NL, THINK]], -1)
        if kind == "act":
            log_q += float(two_way[0])
            log_p += math.log(ALPHA)
            continue
        log_q += float(two_way[1])
        log_p += math.log(1 - ALPHA)
        for j, t in enumerate(toks):
            if j == 1:  # after max_rationale_tokens = 1 content token, the closing newline is forced
                assert t == NL
                break
            restricted = torch.log_softmax(logp[start + j, comment_vocab], -1)
            log_q += float(restricted[comment_vocab.index(t)])
            log_p -= math.log(len(comment_vocab))
    return log_q, log_pi, log_p


def scored(model, backend="torch"):
    zs = list(latents())
    batch = pack([build_sequence(DOC, TOKENS, z) for z in zs], PAD, 1)
    head = HeadRows(TOKENS, 6, "cpu")
    scores = score_rollouts(model, batch, head, backend=backend)
    return zs, scores, head


def _cpu_backends():
    from ra3 import ops

    return [b for b in ops.available_backends() if b in ("torch", "cpu")]


@pytest.mark.parametrize("backend", _cpu_backends())
def test_exact_elbo_equals_the_enumerated_bound_and_stays_below_the_loglik(toy_model, backend):
    zs, scores, head = scored(toy_model, backend)
    hand = [hand_terms(toy_model, z) for z in zs]
    q = torch.tensor([math.exp(h[0]) for h in hand], dtype=torch.float64)
    assert abs(float(q.sum()) - 1.0) < 1e-12, "the enumeration must cover q's whole support"
    # the code's per-rollout log q and log pi match the hand computation
    log_q_code = (scores.decision_logq + scores.comment_logq * scores.thinks).sum(1)
    assert torch.allclose(log_q_code.double(), torch.tensor([h[0] for h in hand], dtype=torch.float64), atol=1e-10)
    assert torch.allclose(scores.line_logprobs.sum(1).double(), torch.tensor([h[1] for h in hand],
                                                                               dtype=torch.float64), atol=1e-10)
    bound = sum(float(qz) * (lpi + lp - lq) for qz, (lq, lpi, lp) in zip(q, hand))
    loglik = torch.logsumexp(torch.tensor([lpi + lp for _, lpi, lp in hand]), 0).item()
    parts = elbo(scores, think_cost=COST, alpha=ALPHA, comment_vocab_size=head.comment_vocab_size)
    expected_exact = float((q * parts["elbo_exact"].double()).sum())
    assert expected_exact == pytest.approx(bound, abs=1e-9)
    assert bound <= loglik + 1e-12
    # the per-sample reward form has the same expectation
    r = line_rewards(scores, kl_form="exact", think_cost=COST, alpha=ALPHA, comment_vocab_size=3)
    ret, _ = returns(r, scores.valid, 1.0)
    assert float((q * ret.double()).sum()) == pytest.approx(bound, abs=1e-9)
    # and per rollout the reward is exactly log pi + log p - log q
    assert torch.allclose(ret.double(), torch.tensor([lpi + lp - lq for lq, lpi, lp in hand], dtype=torch.float64),
                          atol=1e-10)


def test_fixed_cost_form_subtracts_c_per_think(toy_model):
    zs, scores, head = scored(toy_model)
    parts = elbo(scores, think_cost=COST, alpha=ALPHA, comment_vocab_size=3)
    n_thinks = torch.tensor([len(z) for z in zs], dtype=torch.float64)
    assert torch.equal(parts["thinks"], n_thinks)
    assert torch.equal(parts["elbo_fixed"], parts["expert_loglik"] - COST * n_thinks)
    r = line_rewards(scores, kl_form="fixed", think_cost=COST, alpha=ALPHA, comment_vocab_size=3)
    assert torch.allclose(r.sum(1), parts["elbo_fixed"], atol=1e-6)
    # the format penalty hits exactly the empty and the cut comments (here: every think)
    r_fmt = line_rewards(scores, kl_form="fixed", think_cost=COST, alpha=ALPHA, comment_vocab_size=3,
                         format_penalty=1.0)
    assert torch.allclose(r.sum(1) - r_fmt.sum(1), n_thinks, atol=1e-6)


def test_discounted_returns_and_returns_to_go():
    r = torch.tensor([[1.0, 2.0, 4.0], [3.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    ret, rtg = returns(r, valid, 0.5)
    assert torch.allclose(ret, torch.tensor([1 + 0.5 * 2 + 0.25 * 4, 3.0]))
    assert torch.allclose(rtg, torch.tensor([[1 + 0.5 * 4, 2 + 0.5 * 4, 4.0], [3.0, 0.0, 0.0]]))


def test_hf_generator_samples_the_scored_q(toy_model):
    """Rollout frequencies over many samples match q(z) from the scoring path: the engine samples what is scored."""
    zs, scores, _ = scored(toy_model)
    q = (scores.decision_logq + scores.comment_logq * scores.thinks).sum(1).double().exp()
    gen = HFGenerator(toy_model, TOKENS, max_rationale_tokens=1, batch_size=3000)
    samples = gen.rollout([DOC] * 3000, seed=1)
    keys = [tuple(sorted((k, tuple(v)) for k, v in z.items())) for z in zs]
    counts = torch.zeros(len(zs), dtype=torch.float64)
    for s in samples:
        counts[keys.index(tuple(sorted((k, tuple(v)) for k, v in s.items())))] += 1
    freq = counts / counts.sum()
    assert (freq - q).abs().max() < 0.035, (freq, q)
    assert gen.rollout([DOC] * 5, seed=7) == gen.rollout([DOC] * 5, seed=7)

"""The ELBO, its rewards and the HF engine's sampling on a model small enough to enumerate every latent sequence,
checked against a hand computation from the model's full logits.

Toy tokenizer: one token per character, "a", "b", "#", " ", "\\n", plus bos / eos / pad specials (a real fast
tokenizer, so the code under test maps tokens onto lines through its offsets). The document "a\\nb\\n" has two
lines, both decision points. With max_rationale_tokens = 1 a boundary is act, or think with comment "" (the
first content token is the newline) or one of "a", "b", "#", " " (then the newline is forced and the comment is
truncated): 6 x 6 = 36 latent sequences.

By hand, from ``log_softmax(model(ids).logits)`` of each annotated sequence: the decision set at a line with no
indentation is {"#"}, so q(think) = p("#" | prefix) over the full vocabulary and q(act) = 1 - q(think); on act
the line's first token is expert code and gets -log q(act); a comment token is drawn from the distribution
restricted to the five characters (the specials masked out). The code under test goes through build_sequences,
pack, score_rollouts (fused ops), elbo, line_rewards and returns.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from ra3.data.sequences import Comment, CommentVocab, annotated_text, build_sequences, make_documents
from ra3.midtrain.batch import pack
from ra3.midtrain.elbo import elbo, line_rewards, returns
from ra3.midtrain.rollout import HFRollout
from ra3.midtrain.scoring import PolicyHead, score_rollouts

SPECIALS = ("<s>", "</s>", "<pad>")
CHARS = ("a", "b", "#", " ", "\n")
ID = {t: i for i, t in enumerate(SPECIALS + CHARS)}
BOS, HASH, NL = ID["<s>"], ID["#"], ID["\n"]
COMMENT_IDS = [ID[c] for c in CHARS]  # every id a comment may use: all but the specials
LINES = ("a", "b")
CONTENTS = ("", "a", "b", "#", " ")  # a think's comment text with max_rationale_tokens = 1
ALPHA, COST, DISCOUNT = 0.7, 0.3, 0.6
# the per-boundary scores are float32 by contract (scoring.RolloutScores; the model and the hand computation are
# float64): the code's values are held to a few float32 roundings of values of a few nats
F32 = dict(rtol=16 * torch.finfo(torch.float32).eps, atol=16 * torch.finfo(torch.float32).eps)


def char_tokenizer():
    """A fast tokenizer with one token per character and a bos prepended (offsets and special masks work)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=ID, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # every character alone
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok.decoder = decoders.Fuse()  # decode joins the characters (no spaces between tokens)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


TOKENIZER = char_tokenizer()
VOCAB = CommentVocab(TOKENIZER)
DOC, = make_documents(["".join(f"{line}\n" for line in LINES)])


@pytest.fixture(scope="module")
def toy_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    # seed and scale picked so that q(think) lies in [0.2, 0.32] at every decision point of every latent (most
    # random toy models almost never write "#"), while the specials keep 20-70% of the mass at those rows
    torch.manual_seed(59)
    cfg = LlamaConfig(vocab_size=len(ID), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.3, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=ID["</s>"],
                      pad_token_id=ID["<pad>"])
    return LlamaForCausalLM(cfg).double().eval()


def latents() -> list[dict[int, Comment]]:
    """Every latent sequence of DOC: per line act (absent) or a think's comment (truncated when its one content
    token was not the newline)."""
    options = [None] + [Comment(c, truncated=bool(c)) for c in CONTENTS]
    return [{k: c for k, c in enumerate(choice) if c is not None} for choice in itertools.product(options, repeat=2)]


def key(comments: dict[int, Comment]) -> tuple:
    return tuple(sorted((k, c.text, c.truncated) for k, c in comments.items()))


def hand_terms(model, z: dict[int, Comment]) -> dict[str, list[float]]:
    """Per line of DOC, from the full logits of one teacher-forced pass: line (log pi of the expert line given
    the decision taken), decision (log q of it), think_logq, comment_logq, comment_entropy (of the masked
    distribution at the sampled comment token), sampled (sampled comment tokens), think."""
    text = "".join((f"#{z[k].text}\n" if k in z else "") + f"{line}\n" for k, line in enumerate(LINES))
    ids = [BOS] + [ID[c] for c in text]
    assert ids == TOKENIZER(annotated_text(DOC, z))["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)  # row j predicts token j + 1
    masked = torch.log_softmax(logits[:, COMMENT_IDS], -1)  # the comment distribution: specials masked out
    out = {name: [0.0] * len(LINES) for name in ("line", "decision", "think_logq", "comment_logq",
                                                  "comment_entropy", "sampled", "think")}
    pos = 1  # the token where this line's comment and expert paths part ways
    for k, line in enumerate(LINES):
        log_think = float(logp[pos - 1, HASH])
        out["think_logq"][k] = log_think
        line_ll = 0.0
        if k in z:
            out["decision"][k] = log_think
            out["think"][k] = 1.0
            # the row after "#" predicts the comment's one sampled token (the newline when the comment is empty)
            tok = ID[z[k].text] if z[k].text else NL
            out["comment_logq"][k] = float(masked[pos, COMMENT_IDS.index(tok)])
            out["comment_entropy"][k] = float(-(masked[pos].exp() * masked[pos]).sum())
            out["sampled"][k] = 1.0
            pos += len(f"#{z[k].text}\n")
        else:
            out["decision"][k] = math.log1p(-math.exp(log_think))
            line_ll = -out["decision"][k]  # the act's token at pos is expert code: log p(token | act)
        line_ll += sum(float(logp[pos + j - 1, ID[c]]) for j, c in enumerate(line + "\n"))
        out["line"][k] = line_ll
        pos += len(line) + 1
    assert pos == len(ids)
    return out


def hand_totals(t: dict[str, list[float]]) -> tuple[float, float, float]:
    """(log q(z), log pi(x | z), log p(z)) of one latent sequence; the prior draws a comment's tokens uniformly
    from the 5 comment tokens (a forced newline costs nothing)."""
    log_q = sum(t["decision"]) + sum(c * th for c, th in zip(t["comment_logq"], t["think"]))
    log_p = sum(math.log(1 - ALPHA) - n * math.log(len(COMMENT_IDS)) if th else math.log(ALPHA)
                for n, th in zip(t["sampled"], t["think"]))
    return log_q, sum(t["line"]), log_p


def scored(model, backend="torch"):
    """(latents, RolloutScores of all of them in one batch, PolicyHead)."""
    zs = latents()
    batch = pack(build_sequences([DOC] * len(zs), VOCAB, zs), VOCAB.pad_id)
    head = PolicyHead(VOCAB, "cpu")
    return zs, score_rollouts(model, batch, head, backend=backend), head


def scored_q(scores) -> torch.Tensor:
    """q(z) per rollout from the code's scores: [B] float64."""
    return (scores.decision_logq + scores.comment_logq * scores.thinks).sum(1).double().exp()


def _cpu_backends():
    from ra3 import ops

    return [b for b in ops.available_backends() if b in ("torch", "cpu")]


@pytest.fixture(scope="module")
def hand(toy_model):
    return [hand_terms(toy_model, z) for z in latents()]


def _as(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_the_enumeration_covers_q_and_the_prior(toy_model, hand):
    totals = [hand_totals(t) for t in hand]
    assert len({key(z) for z in latents()}) == 36
    assert sum(math.exp(lq) for lq, _, _ in totals) == pytest.approx(1.0, abs=1e-12)
    assert sum(math.exp(lp) for _, _, lp in totals) == pytest.approx(1.0, abs=1e-12)
    q_think = [math.exp(lq) for t in hand for lq in t["think_logq"]]
    assert 0.2 < min(q_think) and max(q_think) < 0.35, "the toy model must think and act often (frequency tests)"
    _, scores, _ = scored(toy_model)
    assert float(scored_q(scores).sum()) == pytest.approx(1.0, abs=F32["atol"])


@pytest.mark.parametrize("backend", _cpu_backends())
def test_scores_match_the_hand_computation(toy_model, hand, backend):
    zs, scores, head = scored(toy_model, backend)
    assert head.comment_vocab_size == len(COMMENT_IDS)
    assert torch.equal(scores.valid, torch.ones(len(zs), 2, dtype=torch.bool))
    assert torch.equal(scores.decision_valid, scores.valid)
    assert torch.equal(scores.thinks, _as([t["think"] for t in hand]).bool())
    assert torch.equal(scores.truncated, torch.tensor([[k in z and z[k].truncated for k in range(2)] for z in zs]))
    for name, field in [("line", "line_logprobs"), ("decision", "decision_logq"), ("think_logq", "think_logq"),
                        ("comment_logq", "comment_logq"), ("comment_entropy", "comment_entropy"),
                        ("sampled", "comment_sampled")]:
        got = getattr(scores, field).double()
        want = _as([t[name] for t in hand])
        assert torch.allclose(got, want, **F32), (field, (got - want).abs().max())


@pytest.mark.parametrize("backend", _cpu_backends())
def test_elbo_matches_the_hand_bound_and_stays_below_the_loglik(toy_model, hand, backend):
    zs, scores, head = scored(toy_model, backend)
    parts = elbo(scores, think_cost=COST, alpha=ALPHA, comment_vocab_size=head.comment_vocab_size)
    log_c = math.log(len(COMMENT_IDS))

    def kl_bernoulli(q, r):
        return q * math.log(q / r) + (1 - q) * math.log((1 - q) / (1 - r))

    expert = _as([sum(t["line"]) for t in hand])
    thinks = _as([sum(t["think"]) for t in hand])
    kl_dec = _as([sum(kl_bernoulli(math.exp(lq), 1 - ALPHA) for lq in t["think_logq"]) for t in hand])
    kl_com = _as([sum(th * (n * log_c - h) for th, n, h in zip(t["think"], t["sampled"], t["comment_entropy"]))
                  for t in hand])
    for name, want in [("expert_loglik", expert), ("thinks", thinks), ("cost_paid", COST * thinks),
                       ("elbo_fixed", expert - COST * thinks), ("kl_decision", kl_dec), ("kl_comment", kl_com),
                       ("elbo_exact", expert - kl_dec - kl_com)]:
        assert torch.allclose(parts[name].double(), want, **F32), (name, parts[name], want)
    # the analytic KL terms have the expectation of the per-sample log-ratio: E_q[elbo_exact] is the bound
    totals = [hand_totals(t) for t in hand]
    q = _as([math.exp(lq) for lq, _, _ in totals])
    bound = sum(float(qz) * (lpi + lp - lq) for qz, (lq, lpi, lp) in zip(q, totals))
    loglik = float(torch.logsumexp(_as([lpi + lp for _, lpi, lp in totals]), 0))
    assert float((q * parts["elbo_exact"].double()).sum()) == pytest.approx(bound, rel=F32["rtol"], abs=F32["atol"])
    assert bound < loglik  # strictly: q is not the posterior here


def test_line_rewards_and_returns_to_go_match_the_hand_computation(toy_model, hand):
    zs, scores, head = scored(toy_model)
    n_c = head.comment_vocab_size
    log_c = math.log(len(COMMENT_IDS))
    line = _as([t["line"] for t in hand])
    think = _as([t["think"] for t in hand])
    fixed = line - COST * think
    log_q = _as([[d + th * c for d, th, c in zip(t["decision"], t["think"], t["comment_logq"])] for t in hand])
    log_p = _as([[math.log(1 - ALPHA) - n * log_c if th else math.log(ALPHA) for n, th in
                  zip(t["sampled"], t["think"])] for t in hand])
    exact = line - (log_q - log_p)
    for form, want in (("fixed", fixed), ("exact", exact)):
        r = line_rewards(scores, kl_form=form, think_cost=COST, alpha=ALPHA, comment_vocab_size=n_c)
        assert torch.allclose(r.double(), want, **F32), form
        ret, rtg = returns(r, scores.valid, DISCOUNT)
        # two lines: the first line's return-to-go is r0 + gamma r1, the second's is r1
        assert torch.allclose(rtg.double(), torch.stack([want[:, 0] + DISCOUNT * want[:, 1], want[:, 1]], 1),
                              **F32), form
        assert torch.allclose(ret.double(), want[:, 0] + DISCOUNT * want[:, 1], **F32), form
        # the discount matters on these numbers: an undiscounted sum would be off by far more than the tolerance
        assert float(((1 - DISCOUNT) * want[:, 1]).abs().min()) > 1e-3
    # undiscounted, the exact form's per-sample return is log pi(x | z) + log p(z) - log q(z)
    r = line_rewards(scores, kl_form="exact", think_cost=COST, alpha=ALPHA, comment_vocab_size=n_c)
    ret, _ = returns(r, scores.valid, 1.0)
    totals = [hand_totals(t) for t in hand]
    assert torch.allclose(ret.double(), _as([lpi + lp - lq for lq, lpi, lp in totals]), **F32)


def test_format_penalty_hits_the_cut_comments(toy_model):
    zs, scores, head = scored(toy_model)
    kw = dict(kl_form="fixed", think_cost=COST, alpha=ALPHA, comment_vocab_size=head.comment_vocab_size)
    penalty = line_rewards(scores, **kw) - line_rewards(scores, format_penalty=1.0, **kw)
    cut = _as([[float(k in z and z[k].truncated) for k in range(2)] for z in zs])
    assert torch.allclose(penalty.double() * cut, cut)


def test_format_penalty_hits_the_empty_comments(toy_model):
    zs, scores, head = scored(toy_model)
    kw = dict(kl_form="fixed", think_cost=COST, alpha=ALPHA, comment_vocab_size=head.comment_vocab_size)
    penalty = line_rewards(scores, **kw) - line_rewards(scores, format_penalty=1.0, **kw)
    # an empty comment says nothing after its "#" (blank), whatever tokens closed its line
    malformed = _as([[float(k in z and (z[k].truncated or not z[k].text.strip())) for k in range(2)] for z in zs])
    assert torch.allclose(penalty.double(), malformed)


def test_discounted_returns_and_returns_to_go():
    # the second row's slots past its document's end hold rewards that must not leak into its returns
    r = torch.tensor([[1.5, -2.0, 4.0], [3.0, 7.0, -1.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True, True], [True, False, False]])
    ret, rtg = returns(r, valid, 0.6)
    # by hand: 4; -2 + 0.6 * 4 = 0.4; 1.5 + 0.6 * 0.4 = 1.74 (undiscounted it would be 3.5)
    assert torch.allclose(rtg, torch.tensor([[1.74, 0.4, 4.0], [3.0, 0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(ret, torch.tensor([1.74, 3.0], dtype=torch.float64))


def frequency_bound(q: torch.Tensor, n: int) -> torch.Tensor:
    """How far the counts of n draws from the categorical q may be from n q: 4 standard deviations of each
    multinomial count, plus 1 (a continuity correction that keeps the bound honest for latents expected only a
    few times). For a correct sampler a count leaves it with probability < 1e-4; the 36 counts together < 0.5%;
    an engine that sampled a wrong q (say the decision over the comment-masked distribution: 1.3 to 3.4 times the
    think rate here) is off by tens of sigmas."""
    return 4 * torch.sqrt(n * q * (1 - q)) + 1


def rollout_counts(samples: list[dict[int, Comment]], zs: list[dict[int, Comment]]) -> torch.Tensor:
    keys = [key(z) for z in zs]
    counts = torch.zeros(len(zs), dtype=torch.float64)
    for s in samples:
        counts[keys.index(key(s))] += 1
    return counts


def test_hf_generator_samples_the_scored_q(toy_model):
    """Rollout frequencies match q(z) from the scoring path: the engine samples what is scored."""
    zs, scores, _ = scored(toy_model)
    q = scored_q(scores)
    gen = HFRollout(toy_model, VOCAB, max_rationale_tokens=1, batch_size=3000, backend="torch")
    n = 3000
    counts = rollout_counts(gen.rollout([DOC] * n, seed=1), zs)
    assert bool(((counts - n * q).abs() <= frequency_bound(q, n)).all()), torch.stack([counts, n * q], 1)
    assert gen.rollout([DOC] * 5, seed=7) == gen.rollout([DOC] * 5, seed=7)
    assert gen.rollout([DOC] * 20, seed=7) != gen.rollout([DOC] * 20, seed=8)

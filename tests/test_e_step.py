"""The E-step's wiring on small hand-built batches: which token positions get the policy gradient, how
advantages are grouped and credited, what a think costs; every expectation is derived here from the text and the
tokenizer alone (not from the code's own index arrays)."""
from __future__ import annotations

import copy

import pytest
import torch

from midtrain_helpers import annotate_by_hand, boost_comments, code_tokenizer, snippet_texts, toy_llama
from ra3 import ops
from ra3.data.sequences import Comment, CommentVocab, build_sequences, make_documents
from ra3.midtrain import e_step as e_step_module
from ra3.midtrain.batch import pack
from ra3.midtrain.config import MidtrainConfig
from ra3.midtrain.e_step import advantages, e_step
from ra3.midtrain.elbo import returns
from ra3.midtrain.scoring import PolicyHead, policy_logprobs


class FixedGenerator:
    """Hands out preset comments (one dict per rollout), whatever the model."""

    def __init__(self, comments):
        self.comments = comments

    def rollout(self, docs, *, seed):
        assert len(docs) == len(self.comments)
        return copy.deepcopy(self.comments)

    def sync_weights(self, model):
        pass


def _first_difference(a, b) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def expected_policy_positions(tokenizer, doc, comments: dict) -> set[int]:
    """Token positions (in tokenizer(annotated text)) that the policy samples: at every line that may take a
    comment, the position where the comment and the expert paths part ways; after it, the comment's tokens up
    to its newline (not the newline when it was forced)."""
    text, spans = annotate_by_hand(doc, comments)
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    lines = doc.text.split("\n")[:-1]
    out = set()
    for k, line in enumerate(lines):
        if doc.anchors[k] < 0:
            continue
        if k in comments:
            s, e = spans[k]
            other = tokenizer(text[:s] + text[e:])["input_ids"]
            p = _first_difference(ids, other)
            out.add(p)
            last = max(j for j, (a, _) in enumerate(offsets) if a < e)
            for j in range(p + 1, last + 1):
                if not (comments[k].truncated and j == last):
                    out.add(j)
        else:
            at = _line_start(text, spans, k, lines)
            indent = line[:len(line) - len(line.lstrip())]
            other = tokenizer(text[:at] + f"{indent}# note\n" + text[at:])["input_ids"]
            out.add(_first_difference(ids, other))
    return out


def _line_start(text, spans, k, lines) -> int:
    pos = 0
    for j in range(k):
        if j in spans:
            pos = spans[j][1]
        pos += len(lines[j]) + 1
    if k in spans:
        pos = spans[k][1]
    return pos


@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def setting(request):
    tok = code_tokenizer(request.param)
    docs = make_documents(snippet_texts(6), tok, max_actions=10)
    model = toy_llama(len(tok))
    vocab = CommentVocab(tok, len(tok))
    return tok, docs, model, vocab


def _some_comments(doc, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, a in enumerate(doc.anchors):
        if a >= 0 and float(torch.rand(1, generator=g)) < 0.5:
            out[k] = Comment([" check it", " x = y", "", " done"][int(torch.randint(4, (1,), generator=g))],
                             truncated=bool(torch.rand(1, generator=g) < 0.3))
    return out


def test_policy_gradient_reaches_decisions_and_sampled_comment_tokens_only(setting):
    tok, docs, model, vocab = setting
    comments = [_some_comments(d, i) for i, d in enumerate(docs)]
    seqs = build_sequences(docs, vocab, comments)
    batch = pack(seqs, vocab.pad_id)
    T1 = batch.input_ids.shape[1] - 1
    torch.manual_seed(0)
    hidden = torch.randn(batch.size * T1, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(len(tok), 16, dtype=torch.float64)
    lp, mask, _ = policy_logprobs(hidden, weight, None, batch, PolicyHead(vocab, "cpu"), temperature=1.0,
                                  backend="torch")
    (lp * mask).sum().backward()
    got = set(hidden.grad.abs().sum(1).nonzero().squeeze(1).tolist())
    want = set()
    for b, (doc, c) in enumerate(zip(docs, comments)):
        want |= {b * T1 + p - 1 for p in expected_policy_positions(tok, doc, c)}
    assert got == want
    assert int(mask.sum()) == len(want)


def _config(**kw) -> MidtrainConfig:
    base = dict(group_size=2, kl_coef=0.0, ppo_epochs=1, progress=False, backend="torch", think_cost=0.05,
                advantage="returns-to-go", advantage_normalize="mean", e_lr=1e-3)
    base.update(kw)
    return MidtrainConfig(**base)


def _run_e_step(monkeypatch, setting, comments, cfg, *, capture_grad=False):
    """e_step on the setting's first documents with preset rollouts; returns what reached policy_loss."""
    tok, docs, model, vocab = setting
    model = copy.deepcopy(model)
    G = cfg.group_size
    use = docs[:len(comments) // G]
    seen = {}
    real_loss, real_rewards, real_hidden = ops.policy_loss, e_step_module.line_rewards, e_step_module.hidden_states

    def loss(lp, old, adv, weights, **kw):
        seen.setdefault("adv", adv.detach().clone())
        seen.setdefault("weights", weights.detach().clone())
        return real_loss(lp, old, adv, weights, **kw)

    def rewards(scores, **kw):
        r = real_rewards(scores, **kw)
        seen["scores"], seen["rewards"] = scores, r
        return r

    def hidden(m, batch):
        h = real_hidden(m, batch)
        if h.requires_grad and capture_grad:
            h.register_hook(lambda g: seen.setdefault("grad", g.detach().clone()))
        seen["T1"] = batch.input_ids.shape[1] - 1
        return h

    monkeypatch.setattr(ops, "policy_loss", loss)
    monkeypatch.setattr(e_step_module, "line_rewards", rewards)
    monkeypatch.setattr(e_step_module, "hidden_states", hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.e_lr)
    metrics = e_step(model, None, opt, use, FixedGenerator(comments), PolicyHead(vocab, "cpu"), vocab, cfg, seed=0)
    return seen, metrics, [d for d in use for _ in range(G)]


def test_the_ppo_update_touches_only_policy_positions(monkeypatch, setting):
    tok = setting[0]
    docs = setting[1]
    comments = [_some_comments(docs[i // 2], 10 + i) for i in range(6)]
    seen, _, expanded = _run_e_step(monkeypatch, setting, comments, _config(), capture_grad=True)
    T1 = seen["T1"]
    got = set(seen["grad"].abs().sum(1).nonzero().squeeze(1).tolist())
    allowed = set()
    for b, (doc, c) in enumerate(zip(expanded, comments)):
        allowed |= {b * T1 + p - 1 for p in expected_policy_positions(tok, doc, c)}
    assert got and got <= allowed


def test_advantages_are_returns_to_go_centred_per_document_group(monkeypatch, setting):
    docs = setting[1]
    G = 3
    # three documents x G rollouts; each document's rollouts differ, and the documents' levels differ a lot
    comments = [_some_comments(docs[i // G], 20 + i) for i in range(3 * G)]
    seen, _, expanded = _run_e_step(monkeypatch, setting, comments, _config(group_size=G))
    r = seen["rewards"].double()
    valid = seen["scores"].valid
    B, A = r.shape
    rtg = torch.zeros_like(r)
    for b in range(B):
        for t in range(A):
            rtg[b, t] = sum(float(r[b, u]) for u in range(t, A) if valid[b, u])
    centred = rtg.clone()
    for g in range(0, B, G):
        centred[g:g + G] = rtg[g:g + G] - rtg[g:g + G].mean(0, keepdim=True)
    adv, weights = seen["adv"].double(), seen["weights"]
    # every policy token of rollout b carries the centred return-to-go of one of its boundaries; which one is
    # fixed by its order: a rollout's tokens are in sequence order, boundary by boundary
    for b in range(B):
        tokens = adv[b][weights[b] > 0] if weights[b].any() else adv[b][:0]
        for v in tokens:
            assert float((centred[b] - v).abs().min()) < 1e-4 * max(1.0, abs(float(v))), (b, float(v))
    # per document, the G rollouts' advantages at each boundary sum to zero (not zero over the whole batch only)
    per_doc = centred.view(3, G, A).sum(1)
    assert torch.allclose(per_doc, torch.zeros_like(per_doc), atol=1e-9)
    assert float(rtg.view(3, G, A).mean((1, 2)).std()) > 1.0  # documents differ: batch centring would differ


def test_returns_to_go_carry_a_lines_reward_to_the_decisions_before_it_only():
    rewards = torch.tensor([[1.0, -2.0, 4.0, 0.5], [0.25, 3.0, -1.0, 2.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    ret, rtg = returns(rewards, valid, 0.5)
    # by hand: rtg_t = r_t + 0.5 r_t+1 + 0.25 r_t+2 + ...
    assert rtg[0].tolist() == pytest.approx([1 - 1 + 1 + 0.0625, -2 + 2 + 0.125, 4 + 0.25, 0.5])
    assert rtg[1].tolist() == pytest.approx([0.25 + 1.5 - 0.25, 3 - 0.5, -1.0, 0.0])
    assert ret.tolist() == pytest.approx([rtg[0, 0].item(), rtg[1, 0].item()])
    bumped = rewards.clone()
    bumped[0, 2] += 10.0
    _, rtg2 = returns(bumped, valid, 1.0)
    _, rtg1 = returns(rewards, valid, 1.0)
    assert (rtg2[0, :3] - rtg1[0, :3]).tolist() == pytest.approx([10.0] * 3)
    assert rtg2[0, 3] == rtg1[0, 3] and torch.equal(rtg2[1], rtg1[1])


def test_advantage_modes_by_hand():
    rewards = torch.tensor([[1.0, 2.0], [3.0, 0.0], [10.0, 10.0], [20.0, 14.0]])
    valid = torch.ones(4, 2, dtype=torch.bool)
    boundary = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    mask = torch.ones(4, 2, dtype=torch.bool)
    adv, ret = advantages(rewards, valid, boundary, mask, group_size=2, advantage="return", normalize="mean",
                          discount=1.0, backend="torch")
    assert ret.tolist() == [3.0, 3.0, 20.0, 34.0]
    assert adv.tolist() == [[0.0, 0.0], [0.0, 0.0], [-7.0, -7.0], [7.0, 7.0]]
    adv, _ = advantages(rewards, valid, boundary, mask, group_size=2, advantage="returns-to-go",
                        normalize="mean", discount=1.0, backend="torch")
    # rtg: [3, 2], [3, 0], [20, 10], [34, 14]; centred per (document, boundary)
    assert adv.tolist() == [[0.0, 1.0], [0.0, -1.0], [-7.0, -2.0], [7.0, 2.0]]


def test_identical_rollouts_leave_the_loss_and_its_normaliser(monkeypatch, setting):
    docs = setting[1]
    same = _some_comments(docs[0], 5)
    comments = [same, dict(same), _some_comments(docs[1], 6), _some_comments(docs[1], 7)]
    assert comments[2] != comments[3]
    seen, metrics, _ = _run_e_step(monkeypatch, setting, comments, _config())
    w = seen["weights"]
    assert not w[:2].any() and w[2:].any()
    assert metrics["informative_groups"] == 0.5


def test_a_thinks_cost_is_paid_once(monkeypatch, setting):
    docs = setting[1]
    comments = [_some_comments(docs[i // 2], 30 + i) for i in range(4)]
    cost = 0.37
    seen, metrics, _ = _run_e_step(monkeypatch, setting, comments, _config(think_cost=cost))
    line, r = seen["scores"].line_logprobs.double(), seen["rewards"].double()
    paid = (line - r).sum(1)
    assert paid.tolist() == pytest.approx([cost * len(c) for c in comments], abs=1e-5)
    elbo = (line.sum(1) - torch.tensor([cost * len(c) for c in comments], dtype=torch.float64)).mean()
    assert metrics["elbo"] == pytest.approx(float(elbo), abs=1e-4)


def test_the_e_step_learns_to_think_where_thinking_pays(setting):
    """With a cost of 0, a comment that makes the following code likelier is rewarded: q(think) rises."""
    tok, docs, model, vocab = setting
    model = copy.deepcopy(model)
    boost_comments(model, vocab, docs[:2])
    from ra3.midtrain.rollout import HFRollout

    cfg = _config(group_size=4, think_cost=0.0, e_lr=3e-3, max_rationale_tokens=3)
    head = PolicyHead(vocab, "cpu")
    gen = HFRollout(model, vocab, max_rationale_tokens=3)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.e_lr)
    first = e_step(model, None, opt, docs[:2], gen, head, vocab, cfg, seed=0)
    assert first["thinks_per_100_lines"] > 0 and first["advantage_abs_mean"] > 0
    assert first["grad_norm"] > 0

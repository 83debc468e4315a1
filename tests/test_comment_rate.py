"""A model NTP-trained on code where a known share of lines is preceded by a comment starts the E-step at that
comment rate: the think decision is the model's own probability of starting a comment line, in its own tokens."""
from __future__ import annotations

import random

import pytest
import torch

from midtrain_helpers import toy_llama
from ra3.data.sequences import Comment, CommentVocab, build_sequences, make_documents
from ra3.midtrain.batch import pack
from ra3.midtrain.config import MidtrainConfig
from ra3.midtrain.e_step import e_step
from ra3.midtrain.rollout import HFRollout
from ra3.midtrain.scoring import PolicyHead, hidden_states, output_head

SHARE = 0.2
BODY = ["x = a + {k}", "y = x * b", "print(y)", "z = [x, y, {k}]", "a = b - {k}", "b = max(a, {k})",
        "total += x", "out.append(z)"]
COMMENTS = [" add them", " keep the larger", " show it", " collect", " step {k}", " the difference"]


def _document(rng: random.Random, i: int, share: float) -> tuple[str, str]:
    """(plain code, the same code with a comment above each line with probability ``share``)."""
    lines = [f"def f{i % 50}(a, b):", "    total = 0", "    out = []"]
    lines += ["    " + rng.choice(BODY).format(k=rng.randint(0, 9)) for _ in range(rng.randint(4, 7))]
    lines.append("    return out")
    annotated = []
    for line in lines:
        if rng.random() < share:
            indent = line[:len(line) - len(line.lstrip())]
            annotated.append(indent + "#" + rng.choice(COMMENTS).format(k=rng.randint(0, 9)))
        annotated.append(line)
    return "\n".join(lines) + "\n", "\n".join(annotated) + "\n"


@pytest.fixture(scope="module")
def trained():
    from ra3.data.tokenizer import train_code_tokenizer

    rng = random.Random(0)
    pairs = [_document(rng, i, SHARE) for i in range(600)]
    tok = train_code_tokenizer([a for _, a in pairs], 420, style="qwen2")
    model = toy_llama(len(tok), hidden=64, layers=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        texts = [a for _, a in pairs[:500]]
        for step in range(260):
            batch = [texts[(step * 16 + j) % len(texts)] for j in range(16)]
            enc = tok(batch, padding=True, return_tensors="pt")
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            loss = model(**enc, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    held_out = [plain for plain, _ in pairs[500:]]
    return model, tok, held_out, float(loss.detach())


def test_first_e_step_starts_at_the_corpus_comment_rate(trained):
    model, tok, held_out, loss = trained
    assert loss < 1.5, loss  # it learned the code
    vocab = CommentVocab(tok, output_head(model)[0].shape[0])
    head = PolicyHead(vocab, "cpu")
    docs = make_documents(held_out, tok)
    batch = pack(build_sequences(docs, vocab), vocab.pad_id)
    with torch.no_grad():
        h = hidden_states(model, batch)
        weight, bias = output_head(model)
        _, lq = head.decisions(h, weight, bias, batch, temperature=1.0, backend="torch")
    q = lq.exp()
    assert len(q) == sum(d.num_decisions for d in docs)
    assert SHARE - 0.08 < float(q.mean()) < SHARE + 0.08, float(q.mean())

    cfg = MidtrainConfig(group_size=4, kl_coef=0.0, progress=False, backend="torch", max_rationale_tokens=6)
    gen = HFRollout(model, vocab, max_rationale_tokens=6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    m = e_step(model, None, opt, docs[:8], gen, head, vocab, cfg, seed=0)
    assert SHARE - 0.08 < m["think_q_mean"] < SHARE + 0.08
    lines_per_think = m["thinks_per_100_lines"] / 100
    assert 0.08 < lines_per_think < 0.35  # it samples comments at about the model's own rate
    assert m["advantage_abs_mean"] > 0 and m["grad_norm"] > 0


def test_sampled_comments_read_as_the_corpus_comments(trained):
    model, tok, held_out, _ = trained
    vocab = CommentVocab(tok, output_head(model)[0].shape[0])
    docs = make_documents(held_out[:40], tok)
    comments = HFRollout(model, vocab, max_rationale_tokens=8).rollout(docs, seed=3)
    written = [c for z in comments for c in z.values()]
    assert len(written) > 10
    known = {c.split("{")[0].strip() for c in COMMENTS}
    # most comments are whole corpus comments, written at the indentation of the line they precede
    assert sum(any(c.text.strip().startswith(k) for k in known if k) for c in written) > 0.6 * len(written)
    from ra3.data.sequences import annotated_text, check_annotation

    for doc, z in zip(docs, comments):
        check_annotation(doc, z)
        text = annotated_text(doc, z)
        for line, nxt in zip(text.split("\n"), text.split("\n")[1:]):
            if line.lstrip().startswith("#"):
                assert line[:len(line) - len(line.lstrip())] == nxt[:len(nxt) - len(nxt.lstrip())]
    assert all(isinstance(c, Comment) for c in written)

"""Sequences are the tokenizer's own, and their per-token ids agree with a reference built from the text alone.

For two locally trained tokenizers (GPT-2 style byte-level BPE; Qwen2 / Llama-3 style, whose pre-tokenizer glues
newlines to punctuation: "):\\n", "\\n\\n"), random documents (multi-byte characters, empty lines, strings) and
random rationales: the ids are exactly ``tokenizer(annotated_text)``, where the annotated text is built here line
by line; every token is labelled by the line of its first character (character offsets); a comment's tokens
before the decision position are the expert prefix both paths share.
"""
from __future__ import annotations

import random

import pytest
import torch

from midtrain_helpers import annotate_by_hand, code_tokenizer, snippet_texts
from ra3.data.sequences import (KIND_CODE, KIND_COMMENT, KIND_SPECIAL, KIND_THINK, Comment, CommentVocab,
                                annotated_text, build_sequences, check_annotation, comment_lines, make_documents)
from ra3.midtrain.batch import pack

STYLES = ["gpt2", "qwen2"]
PIECES = ["x", "y_1", "return", " ", "  ", "(", ")", "=", "+", "'é'", "日本", "→", "🙂", "ß", "0", "None", ":",
          ",", "[i]", "naïve", "数据"]


def random_code(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(1, 9)):
        if rng.random() < 0.2:
            lines.append("")
            continue
        indent = rng.choice(["", "    ", "        "]) if lines else ""
        body = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6))).strip() or "z"
        lines.append(indent + body.lstrip("#"))
    if not any(line.strip() for line in lines):
        lines.append("z")
    return "\n".join(lines) + "\n"


def random_rationale(rng: random.Random) -> str:
    return "".join(rng.choice([" sum", " the", " é", " 日本語", " →", "🙂", " list", "!", "x", ")", " #"])
                   for _ in range(rng.randint(0, 5)))


def reference_labels(tokenizer, doc, comments):
    """(ids, kinds, line_ids, segment_ids, boundary_ids) from the annotated text and character offsets alone."""
    text, spans = annotate_by_hand(doc, comments)
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids, offsets, special = enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]
    think_pos = {}
    for k, (s, e) in spans.items():
        other = tokenizer(text[:s] + text[e:])["input_ids"]
        think_pos[k] = next(i for i, (a, b) in enumerate(zip(ids, other)) if a != b)
    line_of_char, pos = [], 0
    for k, line in enumerate(doc.text.split("\n")[:-1]):
        if k in spans:
            line_of_char += [("comment", k)] * (spans[k][1] - spans[k][0])
        line_of_char += [("code", k)] * (len(line) + 1)
    labels = []
    for j, ((start, _), sp) in enumerate(zip(offsets, special)):
        if sp:
            labels.append((KIND_SPECIAL, -1, -1, -1))
            continue
        what, k = line_of_char[start]
        if what == "comment" and j >= think_pos[k]:
            labels.append((KIND_THINK if j == think_pos[k] else KIND_COMMENT, -1, -1, k))
        else:
            labels.append((KIND_CODE, k, sum(1 for t in comments if t <= k), -1))
    return ids, *[list(col) for col in zip(*labels)]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("seed", range(6))
def test_sequences_are_the_tokenizers_own_and_ids_match_the_reference(style, seed):
    tok = code_tokenizer(style)
    vocab = CommentVocab(tok)
    rng = random.Random(seed)
    texts = [random_code(rng) for _ in range(3)] + [snippet_texts(5)[seed % 5]]
    docs = make_documents(texts, tok)
    comments = [{k: Comment(random_rationale(rng), rng.random() < 0.3) for k, a in enumerate(d.anchors)
                 if a >= 0 and rng.random() < 0.5} for d in docs]
    for doc, c, seq in zip(docs, comments, build_sequences(docs, vocab, comments)):
        text, _ = annotate_by_hand(doc, c)
        assert seq.text == text == annotated_text(doc, c)
        ids, kinds, lines, segments, boundaries = reference_labels(tok, doc, c)
        assert seq.input_ids == ids == tok(text)["input_ids"]
        assert seq.kinds == kinds
        assert seq.line_ids == lines
        assert seq.segment_ids == segments
        assert seq.boundary_ids == boundaries
        assert sorted(d.action for d in seq.decisions if d.think) == sorted(c)
        check_annotation(doc, c)


def test_the_two_tokenizers_really_differ_in_how_newlines_glue():
    text = "def f(x):\n\n    return x\n"
    gpt2 = code_tokenizer("gpt2").convert_ids_to_tokens(code_tokenizer("gpt2")(text)["input_ids"])
    qwen = code_tokenizer("qwen2").convert_ids_to_tokens(code_tokenizer("qwen2")(text)["input_ids"])
    assert any(t.startswith("):") and "Ċ" in t for t in qwen)  # "):\n..." glued (byte-level "Ċ" is "\n")
    assert not any(t.startswith("):") and "Ċ" in t for t in gpt2)


def test_comments_go_only_where_python_reads_a_comment():
    text = ('def f(a,\n      b):\n    """Doc line.\n\n    more doc\n    """\n    # already a comment\n'
            '    x = a + \\\n        b\n    s = """\n    not code\n    """\n    return [\n        x,\n    ]\n')
    allowed = comment_lines(text)
    lines = text.split("\n")
    ok = {lines[i].strip() for i, a in enumerate(allowed) if a}
    assert ok == {"def f(a,", "b):", '"""Doc line.', "x = a + \\", "s = \"\"\"", "return [", "x,", "]"}
    doc = make_documents([text])[0]
    comments = {k: Comment(" why") for k, a in enumerate(doc.anchors) if a >= 0}
    check_annotation(doc, comments)  # every inserted line is a COMMENT token, code intact, still parses


def test_check_annotation_rejects_a_comment_inside_a_string():
    from ra3.data.sequences import Document

    text = 's = """\nx\n"""\n'
    doc = make_documents([text])[0]
    forged = Document(doc.text, doc.starts, [doc.anchors[0], doc.starts[1], doc.anchors[2]],
                      ["", "", ""])
    with pytest.raises(ValueError, match="comment"):
        check_annotation(forged, {1: Comment(" inside")})


def test_pack_indexes_shifted_targets_and_policy_rows():
    tok = code_tokenizer("qwen2")
    vocab = CommentVocab(tok)
    rng = random.Random(0)
    docs = make_documents(snippet_texts(4), tok, max_actions=8)
    comments = [{k: Comment(random_rationale(rng), rng.random() < 0.5) for k, a in enumerate(d.anchors)
                 if a >= 0 and rng.random() < 0.6} for d in docs]
    seqs = build_sequences(docs, vocab, comments)
    batch = pack(seqs, vocab.pad_id)
    B, T = batch.input_ids.shape
    A = batch.max_actions
    code, dec, com = set(batch.code_rows.tolist()), batch.decision_rows.tolist(), set(batch.comment_rows.tolist())
    for b, s in enumerate(seqs):
        for p in range(len(s) - 1):
            row = b * (T - 1) + p
            assert int(batch.targets[row]) == s.input_ids[p + 1]
            kind = s.kinds[p + 1]
            assert (row in code) == (kind == KIND_CODE)
            assert (row in com) == (kind == KIND_COMMENT and p + 1 not in s.forced)
        assert {r - b * (T - 1) + 1 for r in dec if r // (T - 1) == b} == {d.position for d in s.decisions}
        for k in range(s.num_actions):
            assert bool(batch.thinks[b, k]) == (k in comments[b])
            assert bool(batch.truncated[b, k]) == (k in comments[b] and comments[b][k].truncated)
            assert bool(batch.decision_valid[b, k]) == (docs[b].anchors[k] >= 0)
    assert torch.equal(batch.valid.sum(1), torch.tensor([s.num_actions for s in seqs]))
    # the held-out code-only loss leaves out the acts' decision positions, the M-step's 'code' rows keep them
    from ra3.midtrain.m_step import _rows

    acts = {r for r, think in zip(dec, batch.decision_think.tolist()) if not think}
    assert acts and acts <= code
    assert set(_rows(batch, "code-only").tolist()) == code - acts
    assert set(_rows(batch, "code").tolist()) == code


def test_comment_vocabulary_excludes_special_and_added_tokens():
    from transformers import PreTrainedTokenizerFast

    base = code_tokenizer("qwen2")
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer.__class__.from_str(
        base.backend_tokenizer.to_str()), bos_token=base.bos_token, eos_token=base.eos_token,
        pad_token=base.pad_token)
    tok.add_special_tokens({"additional_special_tokens": ["<|fim_prefix|>"]})
    tok.add_tokens(["<|repo_name|>"])
    vocab = CommentVocab(tok, len(tok) + 7)  # an lm_head padded past the tokenizer
    for name in ("<|fim_prefix|>", "<|repo_name|>", base.bos_token, base.pad_token):
        assert tok.convert_tokens_to_ids(name) in vocab.excluded
    assert set(range(len(tok), len(tok) + 7)) <= vocab.excluded
    set_id = vocab.decision_set("#")
    assert not set(vocab.sets[set_id]) & vocab.excluded and all(vocab.texts[i].startswith("#")
                                                                for i in vocab.sets[set_id])


def test_a_tokenizer_without_offsets_is_refused_with_what_is_needed():
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast tokenizer.*offset"):
        CommentVocab(Slow())

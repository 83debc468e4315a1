"""Line and segment ids of the data pipeline against a slow per-token reference built from the bytes alone.

The reference never looks at how sequences are assembled: it decodes every token to its bytes, checks they
spell the annotated text, parses that text into comment lines and code lines, and labels each token by the
line its bytes fall in. Random code mixes multi-byte characters (2-, 3- and 4-byte UTF-8), empty lines and
rationales that tokenise into several pieces (some of them splitting a character across tokens).
"""
from __future__ import annotations

import random

import pytest
import torch

from ra3.data import (KIND_ACT, KIND_BOS, KIND_CODE, KIND_COMMENT, KIND_THINK, DecisionTokens, annotated_text,
                      build_sequence, tokenize_documents)
from ra3.midtrain.batch import pack


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ra3.models.tiny import build_tiny

    return AutoTokenizer.from_pretrained(build_tiny(0))


def _byte_decoder():
    # GPT-2's byte <-> printable-unicode map, rebuilt here so the reference does not depend on ra3 or tokenizers
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _byte_decoder()


def token_bytes(tokenizer, token_id: int) -> bytes:
    added = {v: k for k, v in tokenizer.get_added_vocab().items()}
    if token_id in added:
        return added[token_id].encode("utf-8")
    return bytes(_BYTE_DECODER[c] for c in tokenizer.convert_ids_to_tokens(token_id))


PIECES = ["x", "y_1", "return", " ", "  ", "    ", "(", ")", "=", "+", "'é'", "日本", "→", "🙂", "ß", "0",
          "None", ":", ",", "[i]", "\t", "naïve", "数据", "#"]


def random_code(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(1, 9)):
        if rng.random() < 0.2:
            lines.append("")  # empty line
        else:
            line = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 8)))
            lines.append(line.lstrip("#") or "z")  # a code line never starts with '#' (that marks a comment)
    if not any(lines):
        lines.append("z")  # a document of empty lines only has no actions
    return "\n".join(lines) + "\n"


def random_rationale(rng: random.Random) -> str:
    return "".join(rng.choice([" sum", " the", " é", " 日本語", " →", "🙂", " list", "!", "x"])
                   for _ in range(rng.randint(0, 6)))


def reference_ids(tokenizer, tokens: DecisionTokens, input_ids: list[int]):
    """(kinds, line_ids, segment_ids, boundary_ids) per token, from the token bytes and the annotated text alone."""
    assert input_ids[0] == tokens.bos_id
    pieces = [token_bytes(tokenizer, i) for i in input_ids[1:]]
    text = b"".join(pieces)
    assert text.startswith(b"\n")
    # label each byte (kind, line, segment, boundary): the newline that starts each physical line is a separator;
    # a line starting with '#' is a comment (the '#' and its text) before the next code line; any other line is
    # the next code action. Separators and comments belong to the boundary of the action that follows them.
    labels = []
    physical = text[1:].split(b"\n")
    action, segment = -1, 0
    for i, phys in enumerate(physical):
        if phys.startswith(b"#"):
            segment += 1
            labels.append((KIND_THINK, -1, -1, action + 1))  # the "\n" of "\n#"
            labels.append((KIND_THINK, -1, -1, action + 1))  # the "#"
            labels.extend([(KIND_COMMENT, -1, -1, action + 1)] * (len(phys) - 1))
        else:
            action += 1
            after_comment = i > 0 and physical[i - 1].startswith(b"#")
            # the newline before a code line: an act, or the closing newline of the comment above it
            labels.append((KIND_COMMENT if after_comment else KIND_ACT, -1, -1, action))
            labels.extend([(KIND_CODE, action, segment, -1)] * len(phys))
    assert len(labels) == len(text)
    out, pos = [(KIND_BOS, -1, -1, -1)], 0
    for piece in pieces:
        span = set(labels[pos:pos + len(piece)])
        assert len(span) == 1, f"token {piece!r} straddles {span}"
        label = span.pop()
        assert label[0] != KIND_THINK or piece == b"\n#", f"a comment's '#' is not the think token: {piece!r}"
        out.append(label)
        pos += len(piece)
    return tuple(list(col) for col in zip(*out))


@pytest.mark.parametrize("seed", range(12))
def test_ids_match_the_per_token_reference(tokenizer, seed):
    rng = random.Random(seed)
    tokens = DecisionTokens.from_tokenizer(tokenizer)
    texts = [random_code(rng) for _ in range(3)]
    docs = tokenize_documents(texts, tokenizer)
    for doc, text in zip(docs, texts):
        assert "\n".join(doc.actions) + "\n" == text
        comments = {}
        for k in range(doc.num_actions):
            if rng.random() < 0.5:
                comments[k] = tokenizer.encode(random_rationale(rng), add_special_tokens=False) + [tokens.act_id]
        seq = build_sequence(doc, tokens, comments)
        kinds, lines, segments, boundaries = reference_ids(tokenizer, tokens, seq.input_ids)
        assert seq.kinds == kinds
        assert seq.line_ids == lines
        assert seq.segment_ids == segments
        assert seq.boundary_ids == boundaries
        assert seq.num_segments == len(comments) + 1
        # the annotated text is the code with one comment line per think
        shown = annotated_text(doc, tokenizer, comments)
        assert b"".join(token_bytes(tokenizer, i) for i in seq.input_ids[1:]).decode("utf-8") == "\n" + shown[:-1]


def test_multi_piece_rationales_are_exercised(tokenizer):
    ids = tokenizer.encode(" 日本語🙂 sum", add_special_tokens=False)
    assert len(ids) >= 3
    assert any(b"\xf0" in token_bytes(tokenizer, i) and len(token_bytes(tokenizer, i)) < 4 for i in ids) or \
        any(len(token_bytes(tokenizer, i).decode("utf-8", errors="replace")) != len(token_bytes(tokenizer, i))
            for i in ids)


def test_pack_indexes_shifted_targets(tokenizer):
    rng = random.Random(0)
    tokens = DecisionTokens.from_tokenizer(tokenizer)
    docs = tokenize_documents([random_code(rng) for _ in range(4)], tokenizer)
    max_rt = 2
    seqs = []
    for doc in docs:
        comments = {}
        for k in range(doc.num_actions):
            if rng.random() < 0.6:
                n = rng.randint(0, max_rt)
                comments[k] = [rng.choice(tokens.comment_ids[:-1]) for _ in range(n)] + [tokens.act_id]
        seqs.append(build_sequence(doc, tokens, comments))
    batch = pack(seqs, tokens.pad_id, max_rt)
    B, T = batch.input_ids.shape
    A = batch.max_actions
    for b, s in enumerate(seqs):
        for p in range(len(s) - 1):
            row = b * (T - 1) + p
            assert int(batch.targets[row]) == s.input_ids[p + 1]
            kind = s.kinds[p + 1]
            assert (row in batch.code_rows.tolist()) == (kind == KIND_CODE)
            assert (row in batch.decision_rows.tolist()) == (kind in (KIND_ACT, KIND_THINK))
        code = batch.code_rows // (T - 1) == b
        want = [b * A + s.line_ids[p + 1] for p in range(len(s) - 1) if s.kinds[p + 1] == KIND_CODE]
        assert batch.code_lines[code].tolist() == want
        for k in range(s.num_actions):
            comment = [i for i in range(len(s)) if s.kinds[i] == KIND_COMMENT and s.boundary_ids[i] == k]
            assert bool(batch.thinks[b, k]) == (k in s.thinks)
            assert int(batch.comment_len[b, k]) == max(len(comment) - 1, 0)
            assert bool(batch.truncated[b, k]) == (k in s.thinks and len(comment) - 1 == max_rt)
            sampled = (batch.comment_boundary == b * A + k).sum()
            # a truncated comment's closing newline was forced, so it is not a policy token
            assert int(sampled) == len(comment) - int(bool(batch.truncated[b, k]))
    assert torch.equal(batch.valid.sum(1), torch.tensor([s.num_actions for s in seqs]))

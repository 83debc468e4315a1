"""Annotated documents as the tokenizer's own sequences, with per-token kinds, line ids, segment ids and the
model's own think decisions.

A document is expert Python split into actions (source lines, or blank-line separated blocks). A rollout's
annotation is a comment line before some actions: ``<indent of the line it precedes>#<text>\\n``. The sequence
the ELBO scores and the M-step trains on is exactly ``tokenizer(annotated_text)`` (special tokens included);
tokens are mapped onto lines through character offsets, a token that straddles a line boundary belonging to the
line of its first character.

The think decision is the model's own (RA3.md, E-step). At each decision point t (an action whose first code line
may carry a comment: not blank, not itself a comment, not inside a multi-line string, not after a backslash),
the tokenisations of "context + comment line" and "context + expert line" share a prefix of tokens and part ways
at one position ``p``. q(think at t) is the probability of the tokens that begin the comment path there: every
vocabulary token whose text starts with the rest of the indentation and then "#" (``X``), found by
``CommentVocab.decision_set``. q(act) = 1 - q(think). On an act the token at ``p`` is expert code (its
log-probability given the act is log p(token) - log q(act)); on a think it opens the comment.

Per-token arrays (all the length of ``input_ids``):
- ``kinds``: SPECIAL | THINK (the token at p of a think) | COMMENT (the rest of a comment line) | CODE;
- ``line_ids``: the action index of a CODE token, else -1;
- ``boundary_ids``: the action a THINK / COMMENT token precedes, else -1;
- ``segment_ids``: for CODE tokens, the number of thinks at or before its action (0: a costless prelude).
``decisions``: one ``Decision`` per decision point; ``forced``: positions of comment tokens that were not
sampled (the newline closing a comment cut at ``max_rationale_tokens``).
"""
from __future__ import annotations

import io
import tokenize
from dataclasses import dataclass, field

from ra3.data.actions import split_actions

KIND_SPECIAL, KIND_THINK, KIND_COMMENT, KIND_CODE = 0, 2, 3, 4
KIND_NAMES = {KIND_SPECIAL: "special", KIND_THINK: "think", KIND_COMMENT: "comment", KIND_CODE: "code"}
# the comment line put where an act was taken, only to find where the two tokenisations part ways
_PROBE = " note"
# a comment ends at the first of these (a newline token ends it; the rest would break the line or the parse)
COMMENT_ENDS = ("\n", "\r", "\x00")


@dataclass(frozen=True)
class Comment:
    """A rationale: the text after "#" (one line, no newline) and whether it was cut at max_rationale_tokens."""
    text: str
    truncated: bool = False


class CommentVocab:
    """What RA3 needs from a tokenizer: its own token texts, which ids a comment may use, and the sets of tokens
    that begin a comment line (by their text).

    tokenizer: a fast Hugging Face tokenizer (offset mappings are how tokens are mapped onto lines).
    vocab_size: rows of the model's lm_head (may exceed ``len(tokenizer)``: the extra rows are never comments).
    """

    def __init__(self, tokenizer, vocab_size: int | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"tokenizer: RA3 maps tokens onto lines through character offsets, which needs a fast "
                             f"tokenizer (return_offsets_mapping=True); got {type(tokenizer).__name__}. Load it with "
                             f"AutoTokenizer.from_pretrained(..., use_fast=True) or convert it to a "
                             f"PreTrainedTokenizerFast")
        self.tokenizer = tokenizer
        n_tok = len(tokenizer)
        self.vocab_size = max(int(vocab_size or n_tok), n_tok)
        self.texts = tokenizer.batch_decode([[i] for i in range(n_tok)], skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False)
        # every special and added token (bos/eos/pad, FIM / repo / reserved ones) is excluded from comments
        excluded = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self.excluded = frozenset(i for i in excluded if 0 <= i < n_tok) | frozenset(range(n_tok, self.vocab_size))
        self.newline = frozenset(i for i, t in enumerate(self.texts) if any(c in t for c in COMMENT_ENDS))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer: it has neither a pad nor an eos token to pad batches with")
        self.pad_id = pad
        self._sets: dict[str, int] = {}
        self.sets: list[list[int]] = []  # decision-set id -> vocabulary ids
        self.set_prefixes: list[str] = []  # decision-set id -> the text its tokens start with

    def decision_set(self, prefix: str, extra: int | None = None) -> int:
        """Id of the set of comment-usable tokens whose text starts with ``prefix`` (the rest of the indentation,
        then "#"), plus ``extra`` when given; -1 when that set is empty."""
        key = f"{extra}|{prefix}"
        if key not in self._sets:
            ids = [i for i, t in enumerate(self.texts) if i not in self.excluded and t.startswith(prefix)]
            if extra is not None and extra not in ids:
                ids.append(extra)
            self._sets[key] = len(self.sets) if ids else -1
            if ids:
                self.sets.append(sorted(ids))
                self.set_prefixes.append(prefix)
        return self._sets[key]

    def opening(self, set_id: int, first: int) -> list[int]:
        """The tokens that open a comment line drawn from decision set ``set_id`` with token ``first``: that token,
        then the rest of "<indent>#" (forced) when it is whitespace only."""
        text, prefix = self.texts[first], self.set_prefixes[set_id]
        if "#" in text:
            return [first]
        rest = prefix[len(text):] if prefix.startswith(text) else "#"
        return [first] + self.tokenizer.encode(rest, add_special_tokens=False)

    def comment(self, ids: list[int], *, truncated: bool) -> Comment:
        """The Comment that tokens ``ids`` (from the decision token on) write: the text after the first "#", up to
        the line's end."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        text = text[text.index("#") + 1:] if "#" in text else ""
        for end in COMMENT_ENDS:
            text = text.split(end, 1)[0]
        return Comment(text, truncated)

    def encode(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]], list[int]]]:
        """(ids, offsets, special mask) of each text, exactly as ``tokenizer(text)`` gives them."""
        enc = self.tokenizer(texts, return_offsets_mapping=True, return_special_tokens_mask=True)
        return list(zip(enc["input_ids"], [[tuple(o) for o in x] for x in enc["offset_mapping"]],
                        enc["special_tokens_mask"]))


@dataclass
class Document:
    """One expert document. text: the code, newline-normalised, ending with one "\\n"; starts[k]: the first
    character of action k; anchors[k]: where a comment before action k goes (its first non-blank line) or -1
    where no comment may go; indents[k]: that line's indentation."""
    text: str
    starts: list[int]
    anchors: list[int]
    indents: list[str]

    @property
    def num_actions(self) -> int:
        return len(self.starts)

    @property
    def num_decisions(self) -> int:
        return sum(a >= 0 for a in self.anchors)


def comment_lines(text: str) -> list[bool]:
    """Per source line of ``text`` (split on "\\n"): may a comment line be inserted before it? Python's own
    tokenizer decides: the line before must end a logical or bracketed line (not inside a multi-line string, no
    backslash continuation), and the line itself must hold code (not blank, not a comment). Lines after a
    tokenize error are excluded."""
    lines = text.split("\n")
    ended = {0}  # 1-based rows that end with NEWLINE / NL; row 0 is "before the first line"
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.NEWLINE, tokenize.NL):
                ended.add(tok.start[0])
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    out = []
    for i, line in enumerate(lines):
        body = line.strip()
        out.append(bool(body) and not body.startswith("#") and i in ended)
    return out


def make_documents(texts: list[str], tokenizer=None, *, unit: str = "line", max_actions: int | None = None,
                   max_action_tokens: int | None = None) -> list[Document]:
    """Split each text into actions and keep the first ``max_actions``; a document is cut before an action
    longer than ``max_action_tokens`` tokens (tokenised on its own; needs ``tokenizer``). Documents left with no
    action are dropped."""
    docs = []
    for text in texts:
        actions = split_actions(text, unit)
        if max_actions is not None:
            actions = actions[:max_actions]
        if max_action_tokens is not None and actions:
            ids = tokenizer(actions, add_special_tokens=False)["input_ids"]
            for k, a in enumerate(ids):
                if len(a) > max_action_tokens:
                    actions = actions[:k]
                    break
        if actions:
            docs.append(_document(actions))
    return docs


def _document(actions: list[str]) -> Document:
    text = "\n".join(actions) + "\n"
    allowed = comment_lines(text)
    line_starts = [0]
    for i, c in enumerate(text):
        if c == "\n":
            line_starts.append(i + 1)
    starts, anchors, indents = [], [], []
    pos = line = 0
    for action in actions:
        starts.append(pos)
        anchor, indent = -1, ""
        for j, row in enumerate(action.split("\n")):
            if row.strip():  # the action's first code line
                if allowed[line + j]:
                    anchor, indent = line_starts[line + j], row[:len(row) - len(row.lstrip())]
                break
        anchors.append(anchor)
        indents.append(indent)
        pos += len(action) + 1
        line += action.count("\n") + 1
    return Document(text, starts, anchors, indents)


def annotated_text(doc: Document, comments: dict[int, Comment] | None = None) -> str:
    """The document with each comment's line (at the indentation of the line it precedes) before its action."""
    text, _ = _annotate(doc, comments or {})
    return text


def _annotate(doc: Document, comments: dict[int, Comment]) -> tuple[str, dict[int, tuple[int, int]]]:
    """(annotated text, action index -> (start, end) of its comment line in that text)."""
    for k, c in comments.items():
        if not 0 <= k < doc.num_actions or doc.anchors[k] < 0:
            raise ValueError(f"comments: action {k} is not a decision point of the document (decision points: "
                             f"{[i for i, a in enumerate(doc.anchors) if a >= 0]})")
        if any(e in c.text for e in COMMENT_ENDS):
            raise ValueError(f"comments[{k}]: a comment is one line, got {c.text!r}")
    parts, spans, last, shift = [], {}, 0, 0
    for k in sorted(comments):
        at = doc.anchors[k]
        line = f"{doc.indents[k]}#{comments[k].text}\n"
        parts += [doc.text[last:at], line]
        spans[k] = (at + shift, at + shift + len(line))
        shift += len(line)
        last = at
    parts.append(doc.text[last:])
    return "".join(parts), spans


@dataclass
class Decision:
    """A decision point of a sequence: action ``action``, the token position ``position`` where the comment and
    the expert paths part ways, whether the rollout thought there, and the id of its decision set (the tokens
    that begin the comment path, ``CommentVocab.sets``)."""
    action: int
    position: int
    think: bool
    set_id: int


@dataclass
class Sequence:
    """One (annotated) document as model input; see the module docstring for the per-token arrays."""
    text: str
    input_ids: list[int]
    kinds: list[int]
    line_ids: list[int]
    boundary_ids: list[int]
    segment_ids: list[int]
    num_actions: int
    num_segments: int
    decisions: list[Decision] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)
    thinks: list[int] = field(default_factory=list)  # actions preceded by a comment, ascending
    truncated: list[int] = field(default_factory=list)  # actions whose comment was cut at max_rationale_tokens
    empty: list[int] = field(default_factory=list)  # actions whose comment says nothing (blank after "#")

    def __len__(self) -> int:
        return len(self.input_ids)


def build_sequences(docs: list[Document], vocab: CommentVocab,
                    comments: list[dict[int, Comment] | None] | None = None) -> list[Sequence]:
    """The sequence of each document with its comments (one rollout each): ``tokenizer(annotated_text)`` with
    per-token ids and the document's decision points. Tokenises in batches (the texts, then short windows
    around every decision point, both paths)."""
    comments = comments or [None] * len(docs)
    texts, spans = zip(*[_annotate(d, c or {}) for d, c in zip(docs, comments)]) if docs else ((), ())
    encoded = vocab.encode(list(texts))
    # every decision point's two paths, in a window from a little before the line to the end of the next line
    jobs, windows = [], []
    for i, (doc, text, span, (ids, offsets, special)) in enumerate(zip(docs, texts, spans, encoded)):
        starts = [o[0] if not s else -1 for o, s in zip(offsets, special)]
        for k, anchor in enumerate(doc.anchors):
            if anchor < 0:
                continue
            at = anchor + sum(e - s for j, (s, e) in span.items() if j < k)  # where the comment line starts
            think = k in span
            code_at = span[k][1] if think else at
            line_end = text.find("\n", code_at) + 1
            line_end = (text.find("\n", line_end) + 1 or len(text)) if line_end < len(text) else len(text)
            w_tok = _window_start(starts, at)
            w = starts[w_tok] if w_tok is not None else 0
            if think:
                other = text[:at] + text[code_at:]
                other_end = line_end - (code_at - at)
            else:
                probe = f"{doc.indents[k]}#{_PROBE}\n"
                other = text[:at] + probe + text[at:]
                other_end = line_end + len(probe)
            jobs.append((i, k, think, at, w_tok, w, other))
            windows += [text[w:line_end], other[w:other_end]]
    win_enc = vocab.encode(windows) if windows else []
    out_decisions: list[list[Decision]] = [[] for _ in docs]
    for j, (i, k, think, at, w_tok, w, other) in enumerate(jobs):
        ids, offsets, special = encoded[i]
        mine, alt = win_enc[2 * j], win_enc[2 * j + 1]
        base = w_tok if w_tok is not None else 0
        p_local = _first_difference(_plain(mine), _plain(alt))
        ok = w_tok is not None and p_local is not None and \
            _plain(mine)[:p_local + 1] == [t for t, s in zip(ids[base:base + p_local + 1],
                                                             special[base:base + p_local + 1]) if not s]
        alt_ids, alt_offsets = _plain(alt), [o for o, s in zip(alt[1], alt[2]) if not s]
        ok = ok and p_local < len(alt_ids)
        if ok:
            p = base + _plain_index(special, base, p_local)
            alt_tok, alt_start = alt_ids[p_local], alt_offsets[p_local][0] + w
        else:  # the window disagrees with the whole text's tokenisation: tokenise the other path whole
            other_ids, other_offsets, other_special = vocab.encode([other])[0]
            p = _first_difference(ids, other_ids)
            if p is None or p >= len(other_ids):
                continue
            alt_tok, alt_start = other_ids[p], other_offsets[p][0]
        if p < 1 or p >= len(ids) or special[p]:
            continue
        hash_at = at + len(docs[i].indents[k]) + 1  # one past the comment's "#"
        if think:
            start, tok = offsets[p][0], ids[p]
            prefix = texts[i][start:hash_at]
        else:
            start, tok = alt_start, alt_tok
            prefix = other[start:hash_at]
        if not (start <= at + len(docs[i].indents[k]) and prefix.endswith("#")):
            continue  # the paths part ways elsewhere than at the comment's start: no decision of the model's
        set_id = vocab.decision_set(prefix, extra=tok)
        if set_id < 0:
            continue
        out_decisions[i].append(Decision(k, p, think, set_id))
    return [_label(doc, text, span, enc, dec, c or {}, vocab)
            for doc, text, span, enc, dec, c in zip(docs, texts, spans, encoded, out_decisions, comments)]


def build_sequence(doc: Document, vocab: CommentVocab, comments: dict[int, Comment] | None = None) -> Sequence:
    """``build_sequences`` for one document."""
    return build_sequences([doc], vocab, [comments])[0]


def _plain(enc) -> list[int]:
    ids, _, special = enc
    return [t for t, s in zip(ids, special) if not s]


def _plain_index(special: list[int], base: int, k: int) -> int:
    """Offset from ``base`` of the k-th non-special token at or after it."""
    seen = -1
    for j in range(base, len(special)):
        if not special[j]:
            seen += 1
            if seen == k:
                return j - base
    return len(special) - base


def _window_start(starts: list[int], at: int) -> int | None:
    """Index of a token boundary a little before character ``at``: the token before the one holding ``at - 1``."""
    holder = None
    for j, s in enumerate(starts):
        if s < 0:
            continue
        if s <= max(at - 1, 0):
            holder = j
        else:
            break
    if holder is None:
        return None
    prev = [j for j in range(holder) if starts[j] >= 0]
    return prev[-1] if prev else holder


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return min(len(a), len(b)) if len(a) != len(b) else None


def _label(doc: Document, text: str, spans: dict[int, tuple[int, int]], enc, decisions: list[Decision],
           comments: dict[int, Comment], vocab: CommentVocab) -> Sequence:
    ids, offsets, special = enc
    # character -> action (expert code) or -(1 + action) (its comment line)
    shift_before = []
    shift = 0
    for k in range(doc.num_actions):
        if k in spans:
            shift += spans[k][1] - spans[k][0]
        shift_before.append(shift)
    action_starts = [s + shift_before[k] - (spans[k][1] - spans[k][0] if k in spans else 0)
                     for k, s in enumerate(doc.starts)]
    think_pos = {d.action: d.position for d in decisions if d.think}
    kinds, line_ids, boundary_ids, segment_ids = [], [], [], []
    thinks = sorted(spans)
    forced = []
    for pos, ((start, _), is_special) in enumerate(zip(offsets, special)):
        if is_special:
            kinds.append(KIND_SPECIAL)
            line_ids.append(-1), boundary_ids.append(-1), segment_ids.append(-1)
            continue
        k = next((j for j, (s, e) in spans.items() if s <= start < e), None)
        p = think_pos.get(k, -1)
        if k is not None and pos >= p:
            # the decision token, then the comment; without a decision (never in a rollout's own output) the
            # comment's tokens are nobody's samples
            kinds.append(KIND_THINK if pos == p else KIND_COMMENT)
            line_ids.append(-1), boundary_ids.append(k), segment_ids.append(-1)
            if p < 0:
                forced.append(pos)
            continue
        # expert code; before a think's decision token that is the prefix both paths share
        k = _action_of(action_starts, start)
        kinds.append(KIND_CODE)
        line_ids.append(k)
        boundary_ids.append(-1)
        segment_ids.append(sum(1 for t in thinks if t <= k))
    for k, (s, e) in spans.items():
        if comments[k].truncated:  # the newline closing a comment cut at max_rationale_tokens was forced
            holder = max((p for p, (a, _) in enumerate(offsets) if not special[p] and a <= e - 1), default=None)
            if holder is not None and kinds[holder] == KIND_COMMENT and holder not in forced:
                forced.append(holder)
    return Sequence(text, list(ids), kinds, line_ids, boundary_ids, segment_ids, doc.num_actions, len(thinks) + 1,
                    decisions, sorted(forced), thinks, sorted(k for k in spans if comments[k].truncated),
                    sorted(k for k in spans if not comments[k].text.strip()))


def _action_of(action_starts: list[int], char: int) -> int:
    k = 0
    for j, s in enumerate(action_starts):
        if s <= char:
            k = j
        else:
            break
    return k


def check_annotation(doc: Document, comments: dict[int, Comment]) -> None:
    """Raise ValueError unless every inserted line is a Python COMMENT token, removing them gives back the
    expert document, and the annotated document parses whenever the expert one does."""
    text, spans = _annotate(doc, comments)
    rows = {text.count("\n", 0, s) + 1 for s, _ in spans.values()}
    seen = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.start[0] in rows and tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                                                         tokenize.DEDENT):
                if tok.type != tokenize.COMMENT:
                    raise ValueError(f"inserted line {tok.start[0]} holds a {tokenize.tok_name[tok.type]} token, "
                                     f"not a comment: {tok.line!r}")
                seen.add(tok.start[0])
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    if not _parses(doc.text) and rows - seen:
        return  # the expert text itself does not tokenize to the end: nothing more to hold it to
    if rows - seen:
        raise ValueError(f"inserted lines {sorted(rows - seen)} are not comment tokens")
    stripped = "".join(text[last:s] for last, s in _gaps(spans, len(text)))
    if stripped != doc.text:
        raise ValueError("removing the comment lines does not give back the expert document")
    if _parses(doc.text) and not _parses(text):
        raise ValueError("the annotated document does not parse although the expert one does")


def _gaps(spans: dict[int, tuple[int, int]], n: int):
    last = 0
    for s, e in sorted(spans.values()):
        yield last, s
        last = e
    yield last, n


def _parses(text: str) -> bool:
    import ast

    try:
        ast.parse(text)
        return True
    except (SyntaxError, ValueError):
        return False

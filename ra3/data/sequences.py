"""Token sequences of (annotated) documents, with exact per-token kinds, line ids and segment ids.

Layout (ours): ``[bos] sep_0 action_0 sep_1 action_1 ...`` where every action is preceded by its decision:
act: the single token "\\n"; think: the single token "\\n#", the comment's tokens, then "\\n". So the annotated
text is the document with one comment line before each thinking step, plus a leading "\\n".

Every piece (action, comment) is tokenised on its own and the pieces are concatenated, so no token ever
straddles a line boundary: line and segment ids are exact by construction, for any tokenizer, multi-byte
characters included, and decisions always sit at one token position.

Per-token arrays (all the length of ``input_ids``):
- ``kinds``: BOS | ACT | THINK | COMMENT | CODE (see the constants).
- ``line_ids``: the action index of a CODE token, else -1 (the ELBO's and the rewards' segments).
- ``boundary_ids``: the index of the action that an ACT/THINK/COMMENT token precedes, else -1.
- ``segment_ids``: for CODE tokens, how many thinks happened at or before its action (0 = before any think:
  a costless prelude), else -1. ``num_segments`` = thinks + 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ra3.data.actions import split_actions

KIND_BOS, KIND_ACT, KIND_THINK, KIND_COMMENT, KIND_CODE = 0, 1, 2, 3, 4
KIND_NAMES = ("bos", "act", "think", "comment", "code")
ACT_TEXT, THINK_TEXT = "\n", "\n#"


@dataclass(frozen=True)
class DecisionTokens:
    """The token ids the RA3 layout needs from a tokenizer.

    act_id: the single token "\\n" (an act decision, and the end of every comment); think_id: the single token
    "\\n#"; bos_id: the first token of every sequence; pad_id: padding. comment_ids: the ids a comment may use
    (no newline inside, no special tokens), ``act_id`` last, as the terminator.
    """
    act_id: int
    think_id: int
    bos_id: int
    pad_id: int
    comment_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "DecisionTokens":
        act = tokenizer.encode(ACT_TEXT, add_special_tokens=False)
        think = tokenizer.encode(THINK_TEXT, add_special_tokens=False)
        if len(act) != 1:
            raise ValueError(f"tokenizer must encode '\\n' as one token, got {act}")
        if len(think) != 1:
            raise ValueError(f"tokenizer must encode '\\n#' as one token, got {think}; call "
                             "ra3.models.ensure_decision_tokens(model, tokenizer) first")
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise ValueError("tokenizer has neither a bos nor an eos token to start sequences with")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        special = set(tokenizer.all_special_ids)
        vocab_size = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(vocab_size)])
        comment = [i for i, t in enumerate(texts)
                   if i not in special and i != think[0] and "\n" not in t and "\r" not in t]
        return cls(act[0], think[0], bos, pad, tuple(comment) + (act[0],))


@dataclass
class Document:
    """One expert document: its actions and their token ids (each action tokenised on its own)."""
    text: str
    actions: list[str]
    action_ids: list[list[int]]

    @property
    def num_actions(self) -> int:
        return len(self.actions)

    @property
    def num_code_tokens(self) -> int:
        return sum(len(a) for a in self.action_ids)


@dataclass
class Sequence:
    """One (annotated) document as model input. See the module docstring for the per-token arrays."""
    input_ids: list[int]
    kinds: list[int]
    line_ids: list[int]
    boundary_ids: list[int]
    segment_ids: list[int]
    num_actions: int
    num_segments: int
    thinks: list[int] = field(default_factory=list)  # action indices preceded by a think, ascending

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_documents(texts: list[str], tokenizer, *, unit: str = "line", max_actions: int | None = None,
                       max_action_tokens: int | None = None) -> list[Document]:
    """Split each text into actions, keep the first ``max_actions``, tokenise each action on its own.

    An action longer than ``max_action_tokens`` tokens ends the document there (it is cut before that action),
    so every kept action is whole. Documents left with no action are dropped.
    """
    docs = []
    for text in texts:
        actions = split_actions(text, unit)
        if max_actions is not None:
            actions = actions[:max_actions]
        if not actions:
            continue
        ids = tokenizer(actions, add_special_tokens=False)["input_ids"]
        if max_action_tokens is not None:
            for k, a in enumerate(ids):
                if len(a) > max_action_tokens:
                    actions, ids = actions[:k], ids[:k]
                    break
        if actions:
            docs.append(Document(text, list(actions), [list(a) for a in ids]))
    return docs


def build_sequence(doc: Document, tokens: DecisionTokens, comments: dict[int, list[int]] | None = None) -> Sequence:
    """The token sequence of ``doc`` with a think (and its comment) before each action in ``comments``.

    comments: action index -> comment token ids, ending with ``tokens.act_id`` (the newline that closes the
    comment line); the other boundaries are acts. Returns the Sequence with exact per-token ids.
    """
    comments = comments or {}
    for k, c in comments.items():
        if not 0 <= k < doc.num_actions:
            raise ValueError(f"comments: action index {k} is outside the document's {doc.num_actions} actions")
        if not c or c[-1] != tokens.act_id:
            raise ValueError(f"comments[{k}] must end with the newline token {tokens.act_id}, got {c}")
    ids, kinds, line_ids, boundary_ids, segment_ids = [tokens.bos_id], [KIND_BOS], [-1], [-1], [-1]
    segment = 0
    for k, action in enumerate(doc.action_ids):
        comment = comments.get(k)
        if comment is None:
            ids.append(tokens.act_id)
            kinds.append(KIND_ACT)
            n_sep = 1
        else:
            segment += 1
            ids.append(tokens.think_id)
            ids.extend(comment)
            kinds.append(KIND_THINK)
            kinds.extend([KIND_COMMENT] * len(comment))
            n_sep = 1 + len(comment)
        line_ids.extend([-1] * n_sep)
        boundary_ids.extend([k] * n_sep)
        segment_ids.extend([-1] * n_sep)
        ids.extend(action)
        kinds.extend([KIND_CODE] * len(action))
        line_ids.extend([k] * len(action))
        boundary_ids.extend([-1] * len(action))
        segment_ids.extend([segment] * len(action))
    return Sequence(ids, kinds, line_ids, boundary_ids, segment_ids, doc.num_actions, segment + 1,
                    sorted(comments))


def annotated_text(doc: Document, tokenizer, comments: dict[int, list[int]] | None = None) -> str:
    """The annotated document as text: each think's comment line above its action (no leading newline)."""
    comments = comments or {}
    out = []
    for k, action in enumerate(doc.actions):
        if k in comments:
            out.append("#" + tokenizer.decode(comments[k][:-1]))
        out.append(action)
    return "\n".join(out) + "\n"

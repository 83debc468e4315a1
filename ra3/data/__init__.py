"""Code corpora for RA3: loading, splitting into actions, and the tokenizer's own sequences of annotated code."""
from ra3.data.actions import ACTION_UNITS, split_actions
from ra3.data.corpus import DEFAULT_CORPUS_PATH, load_code_corpus
from ra3.data.sequences import (KIND_CODE, KIND_COMMENT, KIND_NAMES, KIND_SPECIAL, KIND_THINK, Comment, CommentVocab,
                                Decision, Document, Sequence, annotated_text, build_sequence, build_sequences,
                                check_annotation, make_documents)

__all__ = [
    "load_code_corpus", "DEFAULT_CORPUS_PATH", "split_actions", "ACTION_UNITS", "Comment", "CommentVocab",
    "Decision", "Document", "Sequence", "make_documents", "build_sequence", "build_sequences", "annotated_text",
    "check_annotation", "KIND_SPECIAL", "KIND_THINK", "KIND_COMMENT", "KIND_CODE", "KIND_NAMES",
]

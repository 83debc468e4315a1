"""Code corpora for RA3: loading, splitting into actions, and token sequences with exact line/segment ids."""
from ra3.data.actions import ACTION_UNITS, split_actions
from ra3.data.corpus import DEFAULT_CORPUS_PATH, load_code_corpus
from ra3.data.sequences import (KIND_ACT, KIND_BOS, KIND_CODE, KIND_COMMENT, KIND_NAMES, KIND_THINK, DecisionTokens,
                                Document, Sequence, annotated_text, build_sequence, tokenize_documents)

__all__ = [
    "load_code_corpus", "DEFAULT_CORPUS_PATH", "split_actions", "ACTION_UNITS", "DecisionTokens", "Document",
    "Sequence", "tokenize_documents", "build_sequence", "annotated_text", "KIND_BOS", "KIND_ACT", "KIND_THINK",
    "KIND_COMMENT", "KIND_CODE", "KIND_NAMES",
]

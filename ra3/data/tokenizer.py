"""Train a byte-level BPE tokenizer on a code corpus, offline (the tokenizer of the shipped ``ra3-tiny``).

Byte-level, so any UTF-8 text round-trips, with two special tokens, ``<|endoftext|>`` (bos and eos) and
``<|pad|>``, and nothing added to the vocabulary: RA3's think decision is whatever tokens the model itself uses
to start a comment line. Two pre-tokenizers:

- ``"qwen2"`` (default): the split regex of Qwen2 / Llama-3 (:data:`QWEN2_SPLIT_PATTERN`), then byte-level
  without a regex. Newlines glue to the punctuation before them and runs of newlines stay together, as in the
  tokenizers of current code models: ``"):\\n"``, ``"\\n\\n"``; indentation is one piece ``"   "`` with its last space
  going to the next word (``" return"``, ``" #"``).
- ``"gpt2"``: GPT-2's byte-level pre-tokenizer (its own regex): ``"\\n"`` and indentation form one piece
  (``"\\n   "``), punctuation never takes a newline.

Both return offset mappings (``tokenizer(text, return_offsets_mapping=True)``) in characters of ``text``; a
token that holds part of a multi-byte character maps to that whole character. Training is deterministic for a
given corpus (in a given order) and vocabulary size.
"""
from __future__ import annotations

EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
TOKENIZER_STYLES = ("qwen2", "gpt2")
# Qwen2's (and Llama-3's) pre-tokenizer split, as in their tokenizer.json.
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(style: str):
    from tokenizers import Regex, pre_tokenizers

    if style == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def bos_template(tok):
    """The post-processor that puts the bos token (``<|endoftext|>``) in front of every encoded text."""
    from tokenizers import processors

    bos = tok.token_to_id(EOS_TOKEN)
    return processors.TemplateProcessing(single=f"{EOS_TOKEN} $A", pair=f"{EOS_TOKEN} $A {EOS_TOKEN} $B",
                                         special_tokens=[(EOS_TOKEN, bos)])


def train_code_tokenizer(texts: list[str], vocab_size: int = 2048, *, style: str = "qwen2"):
    """A ``transformers.PreTrainedTokenizerFast`` trained on ``texts``: byte-level BPE with ``vocab_size``
    entries in all (256 bytes, the 2 specials, the merges), ``style`` 'qwen2' or 'gpt2' (see the module).

    Encoding puts ``bos_token_id`` in front (as Llama-3's tokenizer does), so ``tokenizer(text)`` is exactly the
    sequence a model sees, the first token included; ``add_special_tokens=False`` leaves it out.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in TOKENIZER_STYLES:
        raise ValueError(f"style must be one of {TOKENIZER_STYLES}, got {style!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size must be an int >= 300 (256 bytes + specials + merges), got {vocab_size!r}")
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings: nothing to train a tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(style)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = bos_template(tok)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False)

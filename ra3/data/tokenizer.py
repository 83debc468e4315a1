"""Train the byte-level BPE tokenizer of the embedded ``ra3-tiny`` model on a code corpus, offline.

The tokenizer is GPT-2 style (byte-level, so any UTF-8 text round-trips) with two special tokens,
``<|endoftext|>`` (bos/eos) and ``<|pad|>``, and the RA3 think token "\\n#" added as one ordinary token, so a
think decision is always a single token. Training is deterministic for a given corpus and vocabulary size.
"""
from __future__ import annotations

EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
THINK_TOKEN = "\n#"


def train_code_tokenizer(texts: list[str], vocab_size: int = 1024, *, add_think_token: bool = True):
    """A ``transformers.PreTrainedTokenizerFast`` trained on ``texts`` (byte-level BPE, ``vocab_size`` entries,
    plus the "\\n#" think token unless ``add_think_token`` is False)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + specials + merges), got {vocab_size}")
    if not texts:
        raise ValueError("texts is empty: nothing to train a tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False)
    if add_think_token:
        fast.add_tokens([THINK_TOKEN])
    return fast

"""``ra3-tiny``: a ~1M-parameter Llama-style causal LM with a BPE tokenizer trained on the embedded corpus.

Built offline from a config, so the whole RA3 loop runs on a laptop CPU with no download. The first build
trains the tokenizer and initialises the weights (deterministic for a seed) and saves both under the cache
dir (env ``RA3_CACHE``, default ``~/.cache/ra3``); later loads read that copy. The cache key covers the config,
the seed and the corpus bytes, so editing any of them builds a fresh copy.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

TINY_NAME = "ra3-tiny"
_FORMAT_VERSION = 1  # bump when the build recipe changes, so stale caches are not reused


@dataclass(frozen=True)
class TinyConfig:
    """Shape of ``ra3-tiny`` (LlamaForCausalLM) and of its tokenizer."""
    vocab_size: int = 1024  # BPE entries before the added "\n#" token
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048


def cache_dir() -> Path:
    """Where built models live: env RA3_CACHE, else ~/.cache/ra3."""
    return Path(os.environ.get("RA3_CACHE") or Path.home() / ".cache" / "ra3")


def _key(config: TinyConfig, seed: int, corpus_bytes: bytes) -> str:
    h = hashlib.sha256(json.dumps([_FORMAT_VERSION, dataclasses.asdict(config), seed]).encode())
    h.update(corpus_bytes)
    return h.hexdigest()[:12]


def build_tiny(seed: int = 0, config: TinyConfig | None = None, root: Path | None = None) -> Path:
    """The directory holding ``ra3-tiny`` for ``seed`` (``from_pretrained``-loadable), built on first use."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ra3.data.corpus import DEFAULT_CORPUS_PATH, load_code_corpus
    from ra3.data.tokenizer import train_code_tokenizer

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    config = config or TinyConfig()
    root = Path(root) if root is not None else cache_dir()
    target = root / f"{TINY_NAME}-{_key(config, seed, DEFAULT_CORPUS_PATH.read_bytes())}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}-", dir=root))
    try:
        tokenizer = train_code_tokenizer(load_code_corpus(), config.vocab_size)
        llama = LlamaConfig(vocab_size=len(tokenizer), hidden_size=config.hidden_size,
                            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                            num_attention_heads=config.num_attention_heads,
                            num_key_value_heads=config.num_key_value_heads,
                            max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=False,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, initializer_range=0.02)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(llama)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: concurrent builders race, one wins, the others reuse it
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target

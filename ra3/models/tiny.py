"""``ra3-tiny``: a ~1.8M-parameter Llama pretrained on Python, shipped inside the package, so RA3 runs offline.

The weights and tokenizer in ``ra3/models/ra3-tiny/`` (a ``save_pretrained`` directory: config.json,
model.safetensors, tokenizer files, PRETRAIN.md with the recipe and its measured losses) were made by
``scripts/pretrain_base.py``: a byte-level BPE tokenizer (Qwen2-style pre-tokenizer, 2048 entries, no added
tokens) and next-token prediction on ``ra3/data/pretrain_corpus.jsonl.gz`` (CPython's standard library and test
suites, module-disjoint from the mid-training default corpus). So the base model writes Python with comments at
about the rate its data does, which is where RA3's E-step starts from.

:func:`build_tiny` returns that directory (nothing is built or cached). :func:`build_random_tiny` builds a
randomly initialised model of any :class:`TinyConfig` with a tokenizer trained on the default corpus, cached
under ``RA3_CACHE`` (default ``~/.cache/ra3``): small, fast models for tests.
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
TINY_DIR = Path(__file__).resolve().parent / TINY_NAME
_FORMAT_VERSION = 2  # bump when the random build recipe changes, so stale caches are not reused


@dataclass(frozen=True)
class TinyConfig:
    """Shape of ``ra3-tiny`` (LlamaForCausalLM, untied embeddings) and of its tokenizer (``vocab_size`` entries,
    specials included)."""
    vocab_size: int = 2048
    hidden_size: int = 160
    intermediate_size: int = 432
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048

    def llama_config(self, tokenizer):
        """The ``transformers.LlamaConfig`` of this shape for ``tokenizer`` (its length, bos/eos/pad ids)."""
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=len(tokenizer), hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                           num_attention_heads=self.num_attention_heads,
                           num_key_value_heads=self.num_key_value_heads,
                           max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=False,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, initializer_range=0.02)


def build_tiny(seed: int = 0) -> Path:
    """The directory of the shipped, pretrained ``ra3-tiny`` (``from_pretrained``-loadable).

    seed: accepted for callers of the former random build and ignored: the weights are the pretrained ones for
    every seed. Raises FileNotFoundError when the install lacks the package data.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not (TINY_DIR / "config.json").exists() or not (TINY_DIR / "model.safetensors").exists():
        raise FileNotFoundError(f"{TINY_NAME}'s weights are missing from {TINY_DIR}: reinstall ra3 with its "
                                f"package data, or rebuild them with scripts/pretrain_base.py")
    return TINY_DIR


def cache_dir() -> Path:
    """Where randomly initialised models live: env RA3_CACHE, else ~/.cache/ra3."""
    return Path(os.environ.get("RA3_CACHE") or Path.home() / ".cache" / "ra3")


def _key(config: TinyConfig, seed: int, corpus_bytes: bytes) -> str:
    h = hashlib.sha256(json.dumps([_FORMAT_VERSION, dataclasses.asdict(config), seed]).encode())
    h.update(corpus_bytes)
    return h.hexdigest()[:12]


def build_random_tiny(seed: int = 0, config: TinyConfig | None = None, root: Path | None = None) -> Path:
    """A directory holding a randomly initialised model of ``config`` (default: ra3-tiny's shape) for ``seed``,
    with a tokenizer (qwen2 style, ``config.vocab_size``) trained on the default corpus; built on first use and
    cached under ``root`` (default :func:`cache_dir`). Deterministic for a config, seed and corpus."""
    import torch
    from transformers import LlamaForCausalLM

    from ra3.data.corpus import DEFAULT_CORPUS_PATH, load_code_corpus
    from ra3.data.tokenizer import train_code_tokenizer

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    config = config or TinyConfig()
    root = Path(root) if root is not None else cache_dir()
    target = root / f"{TINY_NAME}-random-{_key(config, seed, DEFAULT_CORPUS_PATH.read_bytes())}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}-", dir=root))
    try:
        tokenizer = train_code_tokenizer(load_code_corpus(), config.vocab_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config.llama_config(tokenizer))
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

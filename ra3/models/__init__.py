"""Causal LMs for RA3: any Hugging Face model by name or path, or the embedded offline ``ra3-tiny``.

    model, tokenizer = load_model("ra3-tiny")                    # built locally, cached, ~1M params
    model, tokenizer = load_model("/path/to/checkpoint", dtype="bfloat16", device="cuda")
"""
from ra3.models.loading import DTYPES, ensure_decision_tokens, load_model
from ra3.models.tiny import TINY_NAME, TinyConfig, build_tiny

__all__ = ["load_model", "ensure_decision_tokens", "DTYPES", "build_tiny", "TinyConfig", "TINY_NAME"]

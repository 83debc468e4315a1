"""Causal LMs for RA3: any Hugging Face model by name or path, or the embedded, pretrained ``ra3-tiny``.

    model, tokenizer = load_model("ra3-tiny")                    # shipped in the package, ~1.8M params
    model, tokenizer = load_model("/path/to/checkpoint", dtype="bfloat16", device="cuda")
"""
from ra3.models.loading import DTYPES, load_model
from ra3.models.tiny import TINY_DIR, TINY_NAME, TinyConfig, build_random_tiny, build_tiny

__all__ = ["load_model", "DTYPES", "build_tiny", "build_random_tiny", "TinyConfig", "TINY_NAME", "TINY_DIR"]

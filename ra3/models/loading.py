"""Load a causal LM and its tokenizer: Hugging Face by name or local path, or the embedded ``ra3-tiny``."""
from __future__ import annotations

import os
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16", "float64")


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return getattr(torch, dtype)


def hub_reachable(timeout: float = 2.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub endpoint does not answer a TCP connect within ``timeout``."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _looks_like_path(name: str) -> bool:
    """True for what can only be a filesystem path, never a hub id (ORG/NAME or NAME): absolute, ~, ./ or ../
    prefixed, more than one '/', a trailing '/', or a backslash."""
    return (name.startswith(("/", "~", "./", "../", ".\\")) or name in (".", "..") or name.count("/") > 1
            or name.endswith("/") or "\\" in name)


def load_model(name_or_path: str | os.PathLike, *, dtype="float32", device="cpu", seed: int = 0):
    """(model, tokenizer) for a Hugging Face causal LM name or local directory, or ``"ra3-tiny"``.

    dtype: 'float32' | 'bfloat16' | 'float16' | 'float64' (or a torch.dtype); device: anything torch accepts.
    seed: the initialisation seed of ``ra3-tiny`` (ignored for other models). The model is returned in eval
    mode on ``device``; the tokenizer always has a pad token (eos when the model defines none).
    Raises ValueError naming ``name_or_path`` when the model cannot be found (no hub access here).
    """
    import torch

    from ra3.models.tiny import TINY_NAME, build_tiny

    torch_dtype = _torch_dtype(dtype)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device: {exc}") from None
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"name_or_path must be a model name or a path, got {name_or_path!r}")
    name = str(name_or_path)
    if name == TINY_NAME:
        path = str(build_tiny(seed))
    else:
        path = name
        local = Path(name).expanduser()
        if not local.exists() and _looks_like_path(name):
            raise ValueError(f"name_or_path {name!r}: no such directory (a local model is a save_pretrained "
                             f"directory; a hub model is named ORG/NAME)")
        if local.exists():
            if not (local / "config.json").exists():
                raise ValueError(f"name_or_path {name!r} is a local path without a config.json: not a model "
                                 f"saved with save_pretrained")
            path = str(local)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A hub name: use the local HF cache when the hub is offline or unreachable, instead of letting the hub
    # client retry with back-off for a minute (HF_HUB_OFFLINE=1 is honoured as is).
    local_only = path == name and not Path(name).expanduser().exists() and not hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=local_only)
    except (OSError, ValueError) as exc:  # the hub's "not found" / offline errors are OSError subclasses
        raise ValueError(f"name_or_path {name!r} is neither {TINY_NAME!r}, a local model directory, nor a "
                         f"Hugging Face model that can be loaded here ({type(exc).__name__}: {exc})") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer

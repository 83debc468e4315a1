"""ra3.models: the shipped, pretrained ra3-tiny; the random-init builder (deterministic, cached); HF loading errors."""
from __future__ import annotations

import time

import pytest
import torch

from ra3.data.corpus import load_code_corpus
from ra3.models import TINY_DIR, TinyConfig, build_random_tiny, build_tiny, load_model

SMALL = TinyConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=128)


def test_ra3_tiny_is_the_shipped_pretrained_model():
    assert build_tiny() == build_tiny(7) == TINY_DIR  # nothing is built: the seed does not matter
    for name in ("config.json", "model.safetensors", "tokenizer.json", "PRETRAIN.md"):
        assert (TINY_DIR / name).is_file(), name
    assert (TINY_DIR / "model.safetensors").stat().st_size <= 10_000_000
    model, tok = load_model("ra3-tiny")
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n_params <= 2_500_000
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training and model.dtype == torch.float32
    assert len(tok) == model.config.vocab_size == TinyConfig().vocab_size
    assert set(tok.get_added_vocab()) == {"<|endoftext|>", "<|pad|>"}  # no "\n#" decision token
    assert len(tok.encode("\n#", add_special_tokens=False)) == 2
    assert tok.bos_token_id == tok.eos_token_id != tok.pad_token_id
    code = "def café(x):\n    return x → '日本🙂'\n"
    assert tok.decode(tok.encode(code, add_special_tokens=False)) == code
    pieces = [tok.decode([i]) for i in tok.encode("def f(x):\n    y = x\n\n    return y\n", add_special_tokens=False)]
    assert "):\n" in pieces and "\n\n" in pieces  # qwen2-style: newlines glue to punctuation and to each other


def test_ra3_tiny_writes_python_and_comments():
    model, tok = load_model("ra3-tiny")
    # held-out documents (the default corpus shares no module with the pretraining set): far below ln(2048) = 7.6
    texts = load_code_corpus(limit=8)
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[tok.bos_token_id] + tok.encode(text, add_special_tokens=False)])
            nll += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert nll / count < 4.5  # a random model: ~7.6; the shipped one: ~3.0 (PRETRAIN.md)
    # after an indented code line, " #" (a comment line at 4 spaces) is a likely continuation: ~1-5% (the corpus
    # has a comment before ~4% of its code lines)
    comment = [i for i in range(len(tok)) if tok.decode([i]).startswith(" #")]
    prompts = ["def parse(self, text):\n    lines = text.splitlines()\n   ",
               "def _check(self, value):\n    if value is None:\n        raise TypeError('expected an int')\n   ",
               "def read_config(path):\n    with open(path) as f:\n        data = f.read()\n   ",
               "def close(self):\n    if self._closed:\n        return\n   ",
               "def update(self, items):\n    for key, value in items:\n        self[key] = value\n   "]
    q = []
    for prompt in prompts:
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            q.append(model(ids).logits[0, -1].softmax(-1)[comment].sum().item())
    assert 0.01 < sum(q) / len(q) < 0.5
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("def add(a, b):\n", add_special_tokens=False)])
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                            pad_token_id=tok.pad_token_id)
    assert tok.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True).startswith("    ")  # an indented body


def test_ra3_tiny_dtype_and_errors():
    model, _ = load_model("ra3-tiny", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_model("ra3-tiny", dtype="int8")
    with pytest.raises(ValueError, match="device"):
        load_model("ra3-tiny", device="nonsense-device")


def test_random_build_is_deterministic_and_cached(tmp_path):
    a = build_random_tiny(3, SMALL, root=tmp_path / "a")
    b = build_random_tiny(3, SMALL, root=tmp_path / "b")
    c = build_random_tiny(4, SMALL, root=tmp_path / "a")
    assert a.name == b.name and a != c
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    stamp = (a / "config.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert build_random_tiny(3, SMALL, root=tmp_path / "a") == a  # second call reuses the cache
    assert time.perf_counter() - t0 < 1.0
    assert (a / "config.json").stat().st_mtime_ns == stamp
    model, tok = load_model(a)  # a built directory loads like any local model
    assert model.config.hidden_size == 32 and len(tok) == 400
    with pytest.raises(TypeError, match="seed"):
        build_random_tiny("3", SMALL, root=tmp_path / "a")


def test_unknown_model_names_the_argument(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="name_or_path 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")
    assert time.perf_counter() - t0 < 30
    with pytest.raises(ValueError, match="without a config.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="name_or_path"):
        load_model("")

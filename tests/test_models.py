"""ra3.models: the embedded ra3-tiny (built offline, cached, deterministic), HF loading errors, decision tokens."""
from __future__ import annotations

import time

import pytest
import torch

from ra3.models import TinyConfig, build_tiny, ensure_decision_tokens, load_model

SMALL = TinyConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=128)


def test_ra3_tiny_loads_with_its_tokenizer():
    model, tok = load_model("ra3-tiny")
    n_params = sum(p.numel() for p in model.parameters())
    assert 300_000 <= n_params <= 2_000_000
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float32
    assert len(tok.encode("\n", add_special_tokens=False)) == 1
    assert len(tok.encode("\n#", add_special_tokens=False)) == 1
    assert tok.eos_token_id is not None and tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    code = "def café(x):\n    return x → '日本🙂'\n"
    assert tok.decode(tok.encode(code, add_special_tokens=False)) == code
    ids = torch.tensor([tok.encode("def f(x):\n    return x", add_special_tokens=False)])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    assert not ensure_decision_tokens(model, tok)  # already has both decision tokens


def test_ra3_tiny_dtype_and_errors():
    model, _ = load_model("ra3-tiny", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_model("ra3-tiny", dtype="int8")
    with pytest.raises(ValueError, match="device"):
        load_model("ra3-tiny", device="nonsense-device")


def test_build_is_deterministic_and_cached(tmp_path):
    a = build_tiny(3, SMALL, root=tmp_path / "a")
    b = build_tiny(3, SMALL, root=tmp_path / "b")
    c = build_tiny(4, SMALL, root=tmp_path / "a")
    assert a.name == b.name and a != c
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    stamp = (a / "config.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert build_tiny(3, SMALL, root=tmp_path / "a") == a  # second call reuses the cache
    assert time.perf_counter() - t0 < 1.0
    assert (a / "config.json").stat().st_mtime_ns == stamp
    model, tok = load_model(a)  # a built directory loads like any local model
    assert model.config.hidden_size == 32 and len(tok) == 401


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


def test_ensure_decision_tokens_grows_the_vocabulary(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ra3.data.corpus import load_code_corpus
    from ra3.data.tokenizer import train_code_tokenizer

    # a tokenizer without the think token, as most pretrained ones are
    plain = train_code_tokenizer(load_code_corpus(limit=50), 320, add_think_token=False)
    plain_vocab = len(plain)
    assert len(plain.encode("\n#", add_special_tokens=False)) == 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=plain_vocab, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    hash_id = plain.encode("#", add_special_tokens=False)[-1]
    assert ensure_decision_tokens(model, plain)
    think = plain.encode("\n#", add_special_tokens=False)
    assert len(think) == 1 and think[0] == plain_vocab
    assert model.get_input_embeddings().weight.shape[0] >= plain_vocab + 1
    assert torch.equal(model.get_input_embeddings().weight[think[0]], model.get_input_embeddings().weight[hash_id])
    assert torch.equal(model.get_output_embeddings().weight[think[0]], model.get_output_embeddings().weight[hash_id])
    assert not ensure_decision_tokens(model, plain)

"""The Generator interface: the Hugging Face engine on ra3-tiny, and the vLLM adapter against a stand-in vllm
module (vLLM itself needs a GPU; the adapter's mapping of its outputs is what is tested here)."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from ra3.generation import Completion, HFGenerator, VLLMGenerator, make_generator

PROMPTS = ["def add(a, b):\n    return ", "import os\n", "x = [1, 2, 3]\nprint("]


@pytest.fixture(scope="module")
def generator():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster on a shared 2-core machine
    yield make_generator("ra3-tiny", engine="hf", device="cpu", batch_size=8)
    torch.set_num_threads(threads)


def test_auto_engine_is_hf_without_vllm_or_gpu(generator, monkeypatch):
    assert isinstance(generator, HFGenerator) and generator.engine == "hf"
    monkeypatch.setitem(sys.modules, "vllm", None)  # not importable
    with pytest.raises(ValueError, match="vllm"):
        make_generator("ra3-tiny", engine="vllm")
    with pytest.raises(ValueError, match="engine"):
        make_generator("ra3-tiny", engine="sglang")


def test_sampling_shapes_and_seeds(generator):
    out = generator.generate(PROMPTS, n=3, temperature=1.0, max_new_tokens=6, seed=1, progress=False)
    assert len(out) == 3 and all(len(row) == 3 for row in out)
    for row in out:
        for c in row:
            assert isinstance(c, Completion) and 0 < len(c.token_ids) <= 6
            assert c.finish_reason in ("eos", "stop", "length")
            assert c.text == generator.tokenizer.decode(list(c.token_ids), skip_special_tokens=True)
    again = generator.generate(PROMPTS, n=3, temperature=1.0, max_new_tokens=6, seed=1, progress=False)
    assert again == out
    other = generator.generate(PROMPTS, n=3, temperature=1.0, max_new_tokens=6, seed=2, progress=False)
    assert other != out
    # the seed does not leak into the global RNG
    torch.manual_seed(123)
    a = torch.rand(1)
    torch.manual_seed(123)
    generator.generate(PROMPTS[:1], n=2, temperature=1.0, max_new_tokens=3, seed=5, progress=False)
    assert torch.equal(torch.rand(1), a)


def test_greedy_is_batch_invariant_and_repeats(generator):
    batched = generator.generate(PROMPTS, n=2, temperature=0.0, max_new_tokens=8, progress=False)
    assert all(row[0] == row[1] for row in batched)
    single = HFGenerator(generator.model, generator.tokenizer, batch_size=1)
    one_by_one = [single.generate([p], max_new_tokens=8, progress=False)[0][0] for p in PROMPTS]
    assert [row[0] for row in batched] == one_by_one


def test_stop_strings_end_generation(generator):
    out = generator.generate(PROMPTS * 2, n=4, temperature=1.0, max_new_tokens=24, stop=["e"], seed=0,
                             progress=False)
    stopped = [c for row in out for c in row if c.finish_reason == "stop"]
    assert stopped, "no sample hit the stop string in 24 tokens"
    for c in stopped:
        head = generator.tokenizer.decode(list(c.token_ids[:-1]), skip_special_tokens=True)
        assert "e" in c.text and "e" not in head  # generation ended on the token that completed the stop


def test_eos_and_padding_are_cut(generator):
    tok = generator.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    word = tok.encode("return", add_special_tokens=False)
    c = generator._completion(word + [eos, pad, pad], {eos}, pad, [])
    assert c.token_ids == tuple(word + [eos]) and c.finish_reason == "eos" and c.text == "return"
    c = generator._completion(word + [pad, pad], {eos}, pad, ["rn"])
    assert c.token_ids == tuple(word) and c.finish_reason == "stop"
    c = generator._completion(word, {eos}, pad, [])
    assert c.finish_reason == "length"


def test_bad_arguments(generator):
    with pytest.raises(TypeError, match="prompts"):
        generator.generate("a single string")
    with pytest.raises(ValueError, match="n must"):
        generator.generate(PROMPTS, n=0)
    with pytest.raises(ValueError, match="temperature"):
        generator.generate(PROMPTS, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generator.generate(PROMPTS, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generator.generate(PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        HFGenerator(generator.model, generator.tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="chat template"):
        generator.apply_chat_template([{"role": "user", "content": "hi"}])
    assert generator.generate([], progress=False) == []


# ---- vLLM adapter -------------------------------------------------------------------------------------------
def _fake_vllm(calls: dict):
    """A stand-in for the parts of vllm's offline API the adapter uses: LLM, SamplingParams, RequestOutput."""
    mod = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    def output(text, ids, finish, stop_reason):
        return types.SimpleNamespace(text=text, token_ids=ids, finish_reason=finish, stop_reason=stop_reason)

    class LLM:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def get_tokenizer(self):
            return "tokenizer"

        def generate(self, prompts, params, use_tqdm=True):
            calls["generate"] = (prompts, params.kwargs, use_tqdm)
            n = params.kwargs["n"]
            rows = [output(" a", [7], "stop", None), output(" b", [8, 9], "stop", "\ndef"),
                    output(" c", [1, 2, 3], "length", None)]
            return [types.SimpleNamespace(outputs=rows[:n]) for _ in prompts]

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


def test_vllm_adapter_maps_outputs(monkeypatch):
    calls = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    gen = VLLMGenerator("some/model", dtype="bfloat16", seed=3)
    assert calls["init"]["model"] == "some/model" and calls["init"]["enable_prefix_caching"] is True
    out = gen.generate(["p1", "p2"], n=3, temperature=0.7, top_p=0.9, max_new_tokens=5, stop=["\ndef"], seed=4,
                       progress=False)
    prompts, params, _ = calls["generate"]
    assert prompts == ["p1", "p2"]
    assert params == {"n": 3, "temperature": 0.7, "top_p": 0.9, "max_tokens": 5, "stop": ["\ndef"], "seed": 4}
    assert [c.finish_reason for c in out[0]] == ["eos", "stop", "length"]
    assert out[1][1] == Completion(" b", (8, 9), "stop")
    greedy = gen.generate(["p"], n=2, temperature=0.0, max_new_tokens=5, progress=False)
    assert calls["generate"][1]["n"] == 1 and greedy[0][0] == greedy[0][1]  # one greedy sample, repeated


def test_auto_picks_vllm_with_a_gpu(monkeypatch):
    calls = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "vllm" else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gen = make_generator("org/model", engine="auto", dtype="bfloat16")
    assert isinstance(gen, VLLMGenerator) and calls["init"]["model"] == "org/model"
    assert calls["init"]["dtype"] == "bfloat16"

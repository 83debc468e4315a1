"""The vLLM rollout engine's walk, against a stand-in for vLLM's ``LLM`` (vLLM needs a CUDA GPU).

The stand-in implements the part of vLLM's contract the engine relies on, from the toy model's exact next-token
distributions: ``allowed_token_ids`` masks every other logit before the temperature, ``stop_token_ids`` ends a
request with the stop token included, ``seed`` fixes a request's draws, and ``llm_engine...model.load_weights``
/ ``reset_prefix_cache`` update the weights. Against it, rollout frequencies must match q(z) as scored by
``score_rollouts``, exactly as for the Hugging Face engine (tests/test_elbo.py).
"""
from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from test_elbo import DOC, TOKENS, scored, toy_model  # noqa: F401  (toy_model is a fixture)


class _Loader:
    def __init__(self, llm):
        self.llm = llm

    def load_weights(self, weights):
        state = dict(weights)
        self.llm.model.load_state_dict(state)
        self.llm.loaded.append(sorted(state))


class FakeLLM:
    def __init__(self, model):
        self.model = copy.deepcopy(model)
        self.requests: list[tuple[list[int], dict]] = []
        self.loaded: list[list[str]] = []
        self.resets = 0
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}
        worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=_Loader(self)))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(worker=worker)))

    def reset_prefix_cache(self):
        self.resets += 1
        self._cache.clear()

    def _logits(self, ids: tuple[int, ...]) -> torch.Tensor:
        if ids not in self._cache:
            with torch.no_grad():
                self._cache[ids] = self.model(torch.tensor([ids])).logits[0, -1].double()
        return self._cache[ids]

    def generate(self, prompts, params, use_tqdm=True):
        outs = []
        for prompt, p in zip(prompts, params):
            ids = list(prompt["prompt_token_ids"])
            self.requests.append((ids, p))
            g = torch.Generator().manual_seed(p.seed)
            out: list[int] = []
            for _ in range(p.max_tokens):
                logits = self._logits(tuple(ids + out))
                masked = torch.full_like(logits, -torch.inf)
                masked[p.allowed_token_ids] = logits[p.allowed_token_ids]
                tok = int(torch.multinomial(torch.softmax(masked / p.temperature, -1), 1, generator=g))
                out.append(tok)
                if tok in (p.stop_token_ids or ()):
                    break
            outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=out)]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kw: types.SimpleNamespace(**{"stop_token_ids": None, **kw})
    module.LLM = None  # the engine under test is always handed an LLM here
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def _engine(model, llm, **kw):
    from ra3.midtrain.rollout_vllm import VLLMGenerator

    return VLLMGenerator(model, None, TOKENS, max_rationale_tokens=1, llm=llm, **kw)


def _key(z):
    return tuple(sorted((k, tuple(v)) for k, v in z.items()))


def test_vllm_engine_samples_the_scored_q(toy_model, fake_vllm):
    zs, scores, _ = scored(toy_model)
    q = (scores.decision_logq + scores.comment_logq * scores.thinks).sum(1).double().exp()
    gen = _engine(toy_model, FakeLLM(toy_model))
    samples = gen.rollout([DOC] * 3000, seed=1)
    keys = [_key(z) for z in zs]
    counts = torch.zeros(len(zs), dtype=torch.float64)
    for s in samples:
        counts[keys.index(_key(s))] += 1
    freq = counts / counts.sum()
    assert (freq - q).abs().max() < 0.035, (freq, q)
    assert gen.rollout([DOC] * 5, seed=7) == gen.rollout([DOC] * 5, seed=7)
    assert gen.rollout([DOC] * 20, seed=7) != gen.rollout([DOC] * 20, seed=8)


def test_vllm_engine_resubmits_each_documents_growing_prefix(toy_model, fake_vllm):
    llm = FakeLLM(toy_model)
    gen = _engine(toy_model, llm)
    comments = gen.rollout([DOC] * 4, seed=3)
    prompts = [ids for ids, _ in llm.requests]
    # boundary 0: 4 decision prompts [BOS]; later prompts extend one of the earlier ones (prefix-cache hits)
    assert prompts[:4] == [[TOKENS.bos_id]] * 4
    for later in prompts[4:]:
        assert any(later[:len(p)] == p and len(later) > len(p) for p in prompts[:prompts.index(later)])
    for z in comments:
        for k, toks in z.items():
            assert toks[-1] == TOKENS.act_id and 1 <= len(toks) <= 2
            assert all(t in TOKENS.comment_ids for t in toks)
    decisions = [p for _, p in llm.requests if p.stop_token_ids is None]
    written = [p for _, p in llm.requests if p.stop_token_ids is not None]
    assert len(decisions) == 4 * DOC.num_actions and len(written) == sum(len(z) for z in comments)
    assert all(p.max_tokens == 1 and sorted(p.allowed_token_ids) == sorted([TOKENS.act_id, TOKENS.think_id])
               for p in decisions)
    assert all(p.stop_token_ids == [TOKENS.act_id] and list(p.allowed_token_ids) == list(TOKENS.comment_ids)
               for p in written)


def test_sync_weights_loads_the_trainer_weights_and_drops_the_prefix_cache(toy_model, fake_vllm):
    llm = FakeLLM(toy_model)
    gen = _engine(toy_model, llm)
    trained = copy.deepcopy(toy_model)
    with torch.no_grad():
        trained.lm_head.weight.copy_(torch.randn(trained.lm_head.weight.shape, generator=torch.Generator()
                                                 .manual_seed(5), dtype=torch.float64) * 3)
    before = gen.rollout([DOC] * 50, seed=2)
    gen.sync_weights(trained)
    assert llm.resets == 1 and llm.loaded == [sorted(trained.state_dict())]
    assert torch.equal(llm.model.lm_head.weight, trained.lm_head.weight)
    after = gen.rollout([DOC] * 50, seed=2)
    # the same draws as an engine that started from the trained weights: nothing stale survived the sync
    assert after == _engine(trained, FakeLLM(trained)).rollout([DOC] * 50, seed=2) and after != before


def test_vllm_engine_without_vllm_names_the_engine_field(toy_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ValueError, match="'engine'.*vllm"):
        _engine(toy_model, None)


def test_midtrain_with_the_vllm_engine_and_no_vllm_fails_at_start(tmp_path, monkeypatch):
    from ra3.midtrain.config import MidtrainConfig
    from ra3.midtrain.loop import run_midtrain

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ValueError, match="config field 'engine'"):
        run_midtrain(MidtrainConfig(out=str(tmp_path), engine="vllm", objective="ra3", progress=False))
    assert not (tmp_path / "checkpoints").exists()

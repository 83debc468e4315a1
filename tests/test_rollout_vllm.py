"""The vLLM rollout engine's walk, against a stand-in for vLLM's ``LLM`` (vLLM needs a CUDA GPU).

The stand-in implements the part of vLLM's contract the engine relies on, from the toy model's exact next-token
distributions: ``prompt_token_ids``; per request ``allowed_token_ids`` (every other logit masked before the
temperature; None: the full vocabulary), ``stop_token_ids`` (the stop token kept in ``token_ids``, finish reason
"stop"; the length cap is checked first, as in vLLM V1's ``check_stop``), ``max_tokens``, ``temperature`` and
``seed`` (a request's draws depend on its seed only); ``llm_engine...model.load_weights`` / ``reset_prefix_cache``.
Against it, rollout frequencies must match q(z) as scored by ``score_rollouts``, exactly as for the Hugging Face
engine (tests/test_elbo.py, whose toy tokenizer, document and model are reused).
"""
from __future__ import annotations

import collections
import copy
import sys
import types

import pytest
import torch

from ra3.data.sequences import Comment, build_sequences, make_documents
from test_elbo import COMMENT_IDS, DOC, HASH, NL, TOKENIZER, VOCAB, frequency_bound, rollout_counts, scored, scored_q
from test_elbo import toy_model  # noqa: F401  (a fixture)

# three decision points, so rollouts run up to four rounds
DOC3, = make_documents(["a\nb\na\n"])


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
        self.requests: list[tuple[list[int], object, list[int]]] = []  # (prompt, params, sampled ids)
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
        for prompt, p in zip(prompts, params, strict=True):
            ids = list(prompt["prompt_token_ids"])
            g = torch.Generator().manual_seed(p.seed)
            out: list[int] = []
            finish = None
            while finish is None:
                logits = self._logits(tuple(ids + out))
                if p.allowed_token_ids is not None:
                    masked = torch.full_like(logits, -torch.inf)
                    masked[p.allowed_token_ids] = logits[p.allowed_token_ids]
                    logits = masked
                tok = int(torch.multinomial(torch.softmax(logits / p.temperature, -1), 1, generator=g))
                out.append(tok)
                if len(out) >= p.max_tokens:
                    finish = "length"
                elif tok in (p.stop_token_ids or ()):
                    finish = "stop"
            self.requests.append((ids, p, out))
            outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=out, finish_reason=finish)]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kw: types.SimpleNamespace(**{"stop_token_ids": None,
                                                                  "allowed_token_ids": None, **kw})
    module.LLM = None  # the engine under test is always handed an LLM here
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def _engine(model, llm, max_rationale_tokens=1, **kw):
    from ra3.midtrain.rollout_vllm import VLLMRollout

    return VLLMRollout(model, TOKENIZER, VOCAB, max_rationale_tokens=max_rationale_tokens, llm=llm, **kw)


def test_vllm_engine_samples_the_scored_q(toy_model, fake_vllm):
    zs, scores, _ = scored(toy_model)
    q = scored_q(scores)
    gen = _engine(toy_model, FakeLLM(toy_model))
    n = 3000
    counts = rollout_counts(gen.rollout([DOC] * n, seed=1), zs)
    assert bool(((counts - n * q).abs() <= frequency_bound(q, n)).all()), torch.stack([counts, n * q], 1)
    assert gen.rollout([DOC] * 5, seed=7) == gen.rollout([DOC] * 5, seed=7)
    assert gen.rollout([DOC] * 20, seed=7) != gen.rollout([DOC] * 20, seed=8)


def expected_requests(doc, z: dict[int, Comment]) -> list[tuple[tuple[int, ...], str]]:
    """(prompt, 'decide' | 'write') of every request a rollout of ``doc`` that ended with comments ``z`` makes:
    per round, one decision at every decision point after the cursor on the document annotated so far, then the
    comment of the first think, from the decision prefix and its "#"."""
    out, so_far, cursor = [], {}, 0
    while cursor < doc.num_actions:
        s = build_sequences([doc], VOCAB, [so_far])[0]
        later = [d for d in s.decisions if d.action >= cursor]
        out += [(tuple(s.input_ids[:d.position]), "decide") for d in later]
        think = min((k for k in z if k >= cursor), default=None)
        if think is None:
            break
        d = next(d for d in later if d.action == think)
        out.append((tuple(s.input_ids[:d.position] + [HASH]), "write"))
        so_far[think] = z[think]
        cursor = think + 1
    return out


def test_vllm_engine_resubmits_each_documents_growing_prefix(toy_model, fake_vllm):
    llm = FakeLLM(toy_model)
    gen = _engine(toy_model, llm, max_rationale_tokens=3)
    docs = [DOC3] * 24
    comments = gen.rollout(docs, seed=3)
    assert max(len(z) for z in comments) >= 2, "want rollouts of three rounds or more"
    phase = {1: "decide", 3: "write"}
    made = collections.Counter((tuple(ids), phase[p.max_tokens]) for ids, p, _ in llm.requests)
    assert made == collections.Counter(r for z in comments for r in expected_requests(DOC3, z))
    for z in comments:
        reqs = expected_requests(DOC3, z)
        writes = [ids for ids, ph in reqs if ph == "write"]
        # every later request re-submits a prefix holding the comments written before it (prefix-cache hits)
        for w, later in zip(writes, writes[1:]):
            assert later[:len(w)] == w and len(later) > len(w)
    for ids, p, out in llm.requests:
        if p.max_tokens == 1:  # a decision: one token from the model's full distribution
            assert p.allowed_token_ids is None and p.stop_token_ids is None and len(out) == 1
        else:  # a comment: the masked vocabulary, up to the first newline
            assert ids[-1] == HASH and p.max_tokens == 3
            assert sorted(p.allowed_token_ids) == COMMENT_IDS and list(p.stop_token_ids) == [NL]
    # each comment is the text its request sampled, truncated iff no newline came within 3 tokens
    sampled = collections.Counter((tuple(ids), Comment(TOKENIZER.decode(out[:-1] if NL in out else out),
                                                       truncated=NL not in out))
                                  for ids, p, out in llm.requests if p.max_tokens == 3)
    kept = collections.Counter((ids, z[k]) for z in comments
                               for (ids, _), k in zip([r for r in expected_requests(DOC3, z) if r[1] == "write"],
                                                      sorted(z)))
    assert sampled == kept
    assert {c.truncated for _, c in kept} == {False, True}


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

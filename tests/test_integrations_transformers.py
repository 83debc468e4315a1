"""apply_ra3 / token_logprobs against the unpatched Hugging Face forward, on tiny random models of each family."""
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ra3.integrations.transformers import (  # noqa: E402
    SUPPORTED_ARCHITECTURES, apply_ra3, is_patched, patch, token_logprobs, unapply_ra3,
)

VOCAB = 211
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _configs():
    t = transformers
    return {
        "llama": (t.LlamaConfig(**_DECODER), t.LlamaForCausalLM),
        "llama_tied": (t.LlamaConfig(**_DECODER, tie_word_embeddings=True), t.LlamaForCausalLM),
        "mistral": (t.MistralConfig(**_DECODER, sliding_window=None), t.MistralForCausalLM),
        "qwen2": (t.Qwen2Config(**_DECODER), t.Qwen2ForCausalLM),
        "qwen3": (t.Qwen3Config(**_DECODER, head_dim=8), t.Qwen3ForCausalLM),
        "gemma": (t.GemmaConfig(**_DECODER, head_dim=8), t.GemmaForCausalLM),
        # Small caps so tanh is far from linear on the test's logits.
        "gemma2": (t.Gemma2Config(**_DECODER, head_dim=8, final_logit_softcapping=2.0, sliding_window=16),
                   t.Gemma2ForCausalLM),
        "gemma3": (t.Gemma3TextConfig(**_DECODER, head_dim=8, final_logit_softcapping=3.0, sliding_window=16),
                   t.Gemma3ForCausalLM),
        "gpt2": (t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                              embd_pdrop=0.0, attn_pdrop=0.0), t.GPT2LMHeadModel),
        "cohere": (t.CohereConfig(**_DECODER, logit_scale=0.5), t.CohereForCausalLM),
        "granite": (t.GraniteConfig(**_DECODER, logits_scaling=3.0), t.GraniteForCausalLM),
    }


def _model(name):
    config, cls = _configs()[name]
    torch.manual_seed(0)
    model = cls(config).float()
    with torch.no_grad():  # larger head weights: logits of a few units, so caps and scales matter
        model.get_output_embeddings().weight.mul_(30.0)
    model.train()
    return model


def _batch(b=3, t=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, -4:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100  # an unscored prompt
    return ids, mask, labels


def _loss_and_grads(model, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_close_grads(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_every_supported_architecture_is_covered():
    covered = {cls.__name__ for _, cls in _configs().values()}
    assert covered == set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(_configs()))
def test_patched_loss_and_grads_match_unpatched(name):
    model = _model(name)
    ids, mask, labels = _batch()
    ref, ref_grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert ref.logits.shape == (*ids.shape, VOCAB)
    apply_ra3(model)
    assert is_patched(model)
    out, grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None  # the point: no [B, T, V] tensor
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=0)
    _assert_close_grads(grads, ref_grads)
    unapply_ra3(model)
    assert not is_patched(model)
    again, again_grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    # unpatched means the original forward again: the same logits, loss and gradients, bit for bit
    torch.testing.assert_close(again.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(again.loss, ref.loss, rtol=0, atol=0)
    _assert_close_grads(again_grads, ref_grads)


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "cohere", "granite"])
def test_scaling_and_softcap_are_exercised(name):
    """The head transform matters on these models: dropping it changes the loss, so the match is not vacuous."""
    model = apply_ra3(_model(name))
    ids, mask, labels = _batch()
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        cfg = model.config
        for attr, neutral in (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0)):
            if getattr(cfg, attr, None) is not None:
                setattr(cfg, attr, neutral)
        plain = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert (loss - plain).abs() > 1e-2


def test_softcap_chunks_cover_the_vocabulary(monkeypatch):
    """Force many vocabulary chunks in the soft-capped path (one tile of 256 columns) and still match."""
    from ra3.ops import vocab_softmax_walk

    monkeypatch.setattr(vocab_softmax_walk, "TILE_ELEMENTS", {"cpu": 1, "cuda": 1})
    config, cls = transformers.Gemma2Config(**{**_DECODER, "vocab_size": 700}, head_dim=8,
                                            final_logit_softcapping=2.0), transformers.Gemma2ForCausalLM
    torch.manual_seed(0)
    model = cls(config).train()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    ids = torch.randint(0, 700, (2, 9))
    ref, ref_grads = _loss_and_grads(model, input_ids=ids, labels=ids)
    apply_ra3(model)
    out, grads = _loss_and_grads(model, input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=0)
    _assert_close_grads(grads, ref_grads)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_num_items_in_batch_and_shift_labels(name):
    model = _model(name)
    ids, mask, labels = _batch()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    calls = [dict(labels=labels, num_items_in_batch=torch.tensor(17)), dict(labels=labels, shift_labels=shifted),
             dict(labels=labels, num_items_in_batch=5)]
    refs = [_loss_and_grads(model, input_ids=ids, attention_mask=mask, **kw) for kw in calls]
    patch(model)  # the short alias
    for kw, (ref, ref_grads) in zip(calls, refs):
        out, grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, **kw)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=0)
        _assert_close_grads(grads, ref_grads)


def test_eval_mode_keeps_logits_unless_skip_logits():
    ids, mask, labels = _batch()
    with torch.no_grad():
        plain = _model("llama").eval()(input_ids=ids, attention_mask=mask, labels=labels)  # unpatched
    model = apply_ra3(_model("llama")).eval()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, labels=labels)
        fused = model(input_ids=ids, attention_mask=mask, labels=labels, skip_logits=True)
        no_labels = model(input_ids=ids, attention_mask=mask)
    # the logits kept are the model's real logits, with or without labels
    torch.testing.assert_close(full.logits, plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_labels.logits, plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.loss, plain.loss, rtol=1e-4, atol=0)
    assert no_labels.loss is None
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, full.loss, rtol=1e-4, atol=0)


def test_positional_labels_and_class_patch():
    cls = transformers.Qwen2ForCausalLM
    original_forward = cls.forward
    model = _model("qwen2")
    ids, mask, labels = _batch()
    ref, ref_grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    apply_ra3(cls)
    try:
        assert is_patched(model)
        model.zero_grad(set_to_none=True)
        # LlamaForCausalLM-style positional order: input_ids, attention_mask, position_ids, cache, embeds, labels
        out = model(ids, mask, None, None, None, labels)
        out.loss.backward()
        assert out.logits is None
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=0)
        _assert_close_grads({n: p.grad for n, p in model.named_parameters()}, ref_grads)
    finally:
        unapply_ra3(cls)
    assert not is_patched(model) and cls.forward is original_forward


def test_generate_still_works_and_signature_is_kept():
    model = _model("llama").eval()
    before = list(inspect.signature(model.forward).parameters)
    apply_ra3(model)
    assert list(inspect.signature(model.forward).parameters) == before
    ids = torch.randint(0, VOCAB, (1, 4))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("name", ["llama", "gemma2", "cohere", "gpt2"])
@pytest.mark.parametrize("patched", [False, True])
def test_token_logprobs_match_log_softmax(name, patched):
    model = _model(name)
    ids, mask, labels = _batch()
    temperature = 0.7
    logits = model(input_ids=ids, attention_mask=mask).logits.float() / temperature
    logp = logits.log_softmax(-1)
    ref_lp = torch.zeros(labels.shape)
    ref_ent = torch.zeros(labels.shape)
    scored = labels[:, 1:] != -100
    ref_lp[:, 1:] = logp[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0] * scored
    ref_ent[:, 1:] = -(logp.exp() * logp).sum(-1)[:, :-1] * scored
    gw = torch.autograd.grad((ref_lp.sum() + 0.3 * ref_ent.sum()), model.get_output_embeddings().weight)[0]
    if patched:
        apply_ra3(model)
    out = token_logprobs(model, ids, mask, labels, with_entropy=True, temperature=temperature)
    assert out.logprobs.shape == labels.shape and out.mask[:, 0].logical_not().all()
    assert torch.equal(out.mask[:, 1:], scored)
    torch.testing.assert_close(out.logprobs, ref_lp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.entropy, ref_ent, rtol=1e-4, atol=1e-5)
    got_w = torch.autograd.grad(out.logprobs.sum() + 0.3 * out.entropy.sum(), model.get_output_embeddings().weight)[0]
    torch.testing.assert_close(got_w, gw, rtol=1e-4, atol=1e-5)


def test_token_logprobs_default_labels_ignore_padding():
    model = _model("llama")
    ids, mask, _ = _batch()
    out = token_logprobs(model, ids, mask)
    assert torch.equal(out.mask[:, 1:], mask[:, 1:].bool())
    assert (out.logprobs[~out.mask] == 0).all() and (out.logprobs[out.mask] < 0).all() and out.entropy is None


def test_unsupported_architecture_and_bad_input():
    config = transformers.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16)
    opt = transformers.OPTForCausalLM(config)
    with pytest.raises(ValueError, match="supported architectures are .*LlamaForCausalLM"):
        apply_ra3(opt)
    with pytest.raises(ValueError, match="supported architectures"):
        token_logprobs(opt, torch.zeros(1, 3, dtype=torch.long))
    model = _model("llama")
    with pytest.raises(ValueError, match="input_ids"):
        token_logprobs(model, torch.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(model, torch.zeros(1, 3, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, torch.zeros(1, 3, dtype=torch.long), temperature=0.0)
    with pytest.raises(TypeError, match="backend"):
        apply_ra3(model, backend=3)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_bfloat16_and_autocast(name):
    """bf16 weights: close to the unpatched bf16 loss; under CPU bf16 autocast the head still runs in float32."""
    model = _model(name)
    ids, mask, labels = _batch()
    with torch.no_grad():
        fp32 = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        apply_ra3(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        unapply_ra3(model)
        model.to(torch.bfloat16)
        want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        apply_ra3(model)
        got = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, want.float(), rtol=2e-2, atol=0)
    torch.testing.assert_close(autocast, fp32, rtol=2e-2, atol=0)

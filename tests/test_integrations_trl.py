"""RA3GRPOTrainer against trl.GRPOTrainer: one GRPO step, same loss and gradients (float32, no autocast)."""
import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from ra3.integrations import lm_head  # noqa: E402
from ra3.integrations.trl import RA3GRPOTrainer, add_ra3_fused_lm_head  # noqa: E402
from ra3.models import load_model  # noqa: E402

PROMPTS = ["def add(a, b):", "for i in range(", "import os\n", "class Foo:"]


def _reward(completions, **kwargs):
    # Depends on the sampled text, so advantages differ across the group.
    return [float(len(set(c))) for c in completions]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("ra3-tiny", dtype="float32")
    return model.train(), tokenizer


def _trainers(tiny, tmp_path, **overrides):
    model, tokenizer = tiny
    # bf16=False: GRPOConfig defaults to bf16 autocast (on CPU too), under which TRL's own head runs in bfloat16
    # and the comparison would measure TRL's rounding rather than ra3's.
    config = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=8, max_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                  bf16=False, seed=0, disable_tqdm=True, temperature=0.9, beta=0.04, entropy_coef=0.1,
                  logging_steps=1)
    config.update(overrides)
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    make = lambda cls: cls(model=copy.deepcopy(model), reward_funcs=_reward, args=trl.GRPOConfig(**config),
                           train_dataset=ds, processing_class=tokenizer)
    return make(trl.GRPOTrainer), make(RA3GRPOTrainer)


def _assert_grads_close(got: dict, want: dict, rtol=1e-4):
    assert got.keys() == want.keys()
    for name, w in want.items():
        err = (got[name] - w).abs().max().item()
        assert err <= rtol * w.abs().max().item() + 1e-9, f"{name}: max error {err:.3e}"


def test_grpo_loss_and_gradients_match_trl(tiny, tmp_path, monkeypatch):
    calls = []
    real = lm_head.head_logprobs
    monkeypatch.setattr("ra3.integrations.transformers.head_logprobs",
                        lambda *a, **k: calls.append(k["with_entropy"]) or real(*a, **k))
    ref_trainer, ra3_trainer = _trainers(tiny, tmp_path)
    batch = next(iter(ref_trainer.get_train_dataloader()))
    torch.manual_seed(0)
    want_inputs = ref_trainer._prepare_inputs(batch)
    torch.manual_seed(0)
    got_inputs = ra3_trainer._prepare_inputs(batch)
    # Same weights and seed: the same completions; the reference model's log-probs came through ra3 here.
    assert torch.equal(got_inputs["completion_ids"], want_inputs["completion_ids"])
    assert calls == [False], "the reference model's log-probs must go through ra3"
    torch.testing.assert_close(got_inputs["ref_per_token_logps"], want_inputs["ref_per_token_logps"],
                               rtol=0, atol=1e-5)
    assert want_inputs["advantages"].abs().max() > 0.1  # a real policy-gradient term

    results = []
    for trainer in (ref_trainer, ra3_trainer):
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); compute_loss reads it
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, want_inputs)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    assert calls == [False, True], "the policy's log-probs and entropies must go through ra3"
    (want_loss, want_grads), (got_loss, got_grads) = results
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-7)
    _assert_grads_close(got_grads, want_grads)


def test_one_grpo_train_step_matches_trl(tiny, tmp_path):
    """A whole Trainer step (generation, rewards, loss, SGD update): same logged loss, same updated weights."""
    model, _ = tiny
    # Plain SGD at lr 1 without clipping, so each weight's update is its gradient.
    ref_trainer, ra3_trainer = _trainers(tiny, tmp_path, optim="sgd", learning_rate=1.0, max_grad_norm=0.0)
    for trainer in (ref_trainer, ra3_trainer):
        transformers.set_seed(0)  # the same sampled completions in both runs
        trainer.train()
    want_log, got_log = ref_trainer.state.log_history[0], ra3_trainer.state.log_history[0]
    assert got_log["reward"] == want_log["reward"]
    assert got_log["loss"] == pytest.approx(want_log["loss"], rel=1e-5, abs=1e-7)
    assert got_log["entropy"] == pytest.approx(want_log["entropy"], rel=1e-5)
    start = dict(model.named_parameters())
    want = {n: (start[n] - p).detach() for n, p in ref_trainer.model.named_parameters()}
    got = {n: (start[n] - p).detach() for n, p in ra3_trainer.model.named_parameters()}
    assert max(w.abs().max().item() for w in want.values()) > 1e-3  # the step moved the weights
    _assert_grads_close(got, want, rtol=1e-3)  # updates are differences of O(1) weights: float32 cancellation


def test_add_ra3_fused_lm_head_contract(tiny):
    model, _ = tiny
    m = add_ra3_fused_lm_head(copy.deepcopy(model), temperature=0.7, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, 1000, (2, 6))
    labels = ids.clone()
    labels[0, :3] = -100
    out = m(input_ids=ids, labels=labels, fused_lm_head=True)
    assert out.log_probs.shape == (2, 5) and out.entropy.shape == (2, 5)
    assert torch.equal(out.label_mask, labels[:, 1:] != -100)
    logp = (model(input_ids=ids).logits[:, :-1] / 0.7).log_softmax(-1)
    want = logp.gather(-1, ids[:, 1:, None])[..., 0] * out.label_mask
    torch.testing.assert_close(out.log_probs, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, -want.sum() / out.label_mask.sum(), rtol=1e-5, atol=0)
    assert m(input_ids=ids).logits.shape == (2, 6, model.config.vocab_size)  # without the flag: unchanged
    with pytest.raises(ValueError, match="outputs"):
        add_ra3_fused_lm_head(copy.deepcopy(model), outputs=("log_probs", "is_top1"))
    with pytest.raises(ValueError, match="temperature"):
        add_ra3_fused_lm_head(copy.deepcopy(model), temperature=-1.0)

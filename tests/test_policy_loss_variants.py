"""The policy-loss variants of ``ops.policy_loss`` and the batch-scaled ``ops.group_advantages``, each against its
own definition.

Every case runs every backend (torch reference, cpu, cuda, triton) and compares it, loss and gradient, with a
float64 implementation written here from the variant's source, not from ``ra3.ops.reference``:
- GSPO (Zheng et al. 2025, arXiv 2507.18071): the sequence ratio s_i = exp(mean_t (lp - old)) with the gradient
  through that mean (the paper's eq. for GSPO; TRL's and Liger-Kernel's importance_sampling_level="sequence"),
  and GSPO-token, sg(s_i) * exp(lp - sg(lp)), where advantages are per token;
- CISPO (MiniMax-M1, arXiv 2506.13585): -sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi;
- Dr. GRPO's fixed normaliser B x max_completion_length (arXiv 2503.20783) and DAPO's token sum over the global
  token count num_items_in_batch (TRL / Liger loss_type="dapo");
- TRL's scale_rewards="batch": rewards centred per group, divided by the std of the whole batch.
Where they are installed, the same cases run against Liger-Kernel's own loss function
(``LigerFusedLinearGRPOFunction.ppo_loss_fn``, per-token log-probs in, no lm_head) and TRL's own
``GRPOTrainer._compute_loss`` (on a stand-in trainer that hands it the log-probs).
"""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import ALL_BACKENDS, assert_close, require_backend

from ra3 import ops

B, T = 6, 9
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
GSPO_CLIP_LOW, GSPO_CLIP_HIGH = 3e-3, 4e-3  # GSPO clips the sequence ratio in a much narrower range
KL_COEF = 0.05


def _inputs(seed=0, per_token_adv=False, weights=False, dtype=torch.float32):
    """[B, T] log-probs with ratios on both sides of the clip ranges, a sequence without tokens (row 1), a full one
    (row 0), padding that holds NaN (never read); float mask weights when ``weights``."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.1
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if per_token_adv else \
        torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[0] = 1
    mask[1] = 0
    if weights:
        mask = mask * (0.5 + torch.rand(B, T, generator=g, dtype=torch.float64))
    # Per-token noise puts token ratios on both sides of PPO's range; each sequence's mean log-ratio is then set
    # to a small offset, so sequence ratios fall on both sides of GSPO's narrow range too.
    noise = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    noise -= (mask * noise).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1e-9)
    lp = old + noise + torch.randn(B, 1, generator=g, dtype=torch.float64) * 4e-3
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    for t in (lp, old, ref):
        t[mask == 0] = math.nan
    cast = lambda t: t.to(dtype).double()  # noqa: E731  (the definition sees the values the backends see)
    return cast(lp), cast(old), cast(adv), mask, cast(ref)


def _k3(lp, ref):
    """Schulman's k3 as TRL writes it: exp(ref - lp) - (ref - lp) - 1."""
    return torch.exp(ref - lp) - (ref - lp) - 1


def _definition(lp, old, adv, mask, ref, *, level, surrogate, aggregation, clip_low, clip_high, kl_coef=KL_COEF,
                max_completion_length=None, num_items_in_batch=None):
    """float64 loss of each variant from its source, differentiable w.r.t. lp; (loss, clip_fraction, ratio_mean,
    kl_mean). Tokens of weight 0 are dropped by indexing, per sequence: nothing of them enters the arithmetic."""
    terms, clipped, ratios, kls, seq_sums, weights = [], [], [], [], [], []
    for i in range(lp.shape[0]):
        on = mask[i] != 0
        w, x, o, r = mask[i][on], lp[i][on], old[i][on], ref[i][on]
        a = adv[i][on] if adv.dim() == 2 else adv[i].expand(int(on.sum()))
        if level == "sequence":
            s = torch.exp((w * (x - o)).sum() / w.sum()) if on.any() else x.new_ones(())
            if adv.dim() == 2:  # GSPO-token (the paper's eq. for token-level advantages)
                ratio = s.detach() * torch.exp(x - x.detach())
            else:  # GSPO: one ratio per sequence, its gradient through the mean of the log-ratios
                ratio = s.expand(x.shape)
        else:
            ratio = torch.exp(x - o)
        lo, hi = 1 - clip_low, 1 + clip_high
        clip = ratio.clamp(lo, hi)
        if surrogate == "cispo":  # MiniMax-M1 eq. (4): the clipped weight is a constant, log pi carries the gradient
            term = -clip.detach() * a * x
            is_clipped = (ratio < lo) | (ratio > hi)
        else:  # PPO / GRPO: -min(r A, clip(r) A)
            term = -torch.minimum(ratio * a, clip * a)
            is_clipped = ((ratio > hi) & (a > 0)) | ((ratio < lo) & (a < 0))
        kl = _k3(x, r)
        terms.append(w * (term + kl_coef * kl))
        clipped.append(w * is_clipped)
        ratios.append(w * ratio.detach())
        kls.append(w * kl.detach())
        seq_sums.append(terms[-1].sum())
        weights.append(w.sum())
    total = sum(t.sum() for t in terms)
    n_tokens = sum(weights)
    if aggregation == "token-mean":
        loss = total / n_tokens
    elif aggregation == "seq-mean-token-mean":
        loss = sum(s / w for s, w in zip(seq_sums, weights) if w > 0) / lp.shape[0]
    elif aggregation == "seq-mean-token-sum":
        loss = total / lp.shape[0]
    elif aggregation == "dr-grpo":
        loss = total / (lp.shape[0] * (lp.shape[1] if max_completion_length is None else max_completion_length))
    else:
        loss = total / num_items_in_batch
    stat = lambda parts: float(sum(p.sum() for p in parts) / n_tokens)  # noqa: E731
    return loss, stat(clipped), stat(ratios), stat(kls)


def _clips(level):
    return (GSPO_CLIP_LOW, GSPO_CLIP_HIGH) if level == "sequence" else (CLIP_LOW, CLIP_HIGH)


def _run(backend, lp, old, adv, mask, ref, dtype=torch.float32, **kw):
    """ra3's result on ``backend`` and the gradient of its loss w.r.t. the log-probs."""
    device = require_backend(backend, "policy_loss")
    x = lp.to(dtype).to(device).requires_grad_()
    on = lambda t: t.to(dtype).to(device)  # noqa: E731
    res = ops.policy_loss(x, on(old), on(adv), mask.to(device), ref_logprobs=on(ref), backend=backend, **kw)
    (grad,) = torch.autograd.grad(res.loss, x)
    return res, grad


def _grad_of(loss, lp):
    (g,) = torch.autograd.grad(loss, lp)
    return torch.where(torch.isnan(g), torch.zeros_like(g), g)


AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "dr-grpo", "dapo")


def _agg_kwargs(aggregation, mask):
    if aggregation == "dapo":  # the token count of a larger (global) batch than this micro-batch
        return {"num_items_in_batch": float((mask != 0).sum()) * 2.5}
    if aggregation == "dr-grpo":
        return {"max_completion_length": 16}
    return {}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("surrogate", ("ppo", "cispo"))
@pytest.mark.parametrize("level", ("token", "sequence"))
def test_variant_matches_its_definition(backend, level, surrogate, aggregation):
    lp, old, adv, mask, ref = _inputs(seed=1)
    clip_low, clip_high = _clips(level)
    kw = dict(importance_sampling_level=level, surrogate=surrogate, aggregation=aggregation, clip_low=clip_low,
              clip_high=clip_high, kl_coef=KL_COEF, **_agg_kwargs(aggregation, mask))
    res, grad = _run(backend, lp, old, adv, mask, ref, **kw)
    x = lp.clone().requires_grad_()
    loss, clip_fraction, ratio_mean, kl_mean = _definition(x, old, adv, mask, ref, level=level, surrogate=surrogate,
                                                           **{k: v for k, v in kw.items() if k not in (
                                                               "importance_sampling_level", "surrogate")})
    assert_close(res.loss, loss, torch.float32, "loss")
    assert_close(grad, _grad_of(loss, x), torch.float32, "grad")
    assert_close(res.clip_fraction, torch.tensor(clip_fraction), torch.float32, "clip_fraction")
    assert_close(res.ratio_mean, torch.tensor(ratio_mean), torch.float32, "ratio_mean")
    assert_close(res.kl_mean, torch.tensor(kl_mean), torch.float32, "kl_mean")
    assert 0 < clip_fraction < 1  # the inputs exercise both branches
    assert (grad[mask == 0] == 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("surrogate", ("ppo", "cispo"))
def test_gspo_token_with_per_token_advantages_and_weights(backend, surrogate):
    """GSPO-token: each token's term uses sg(s_i) exp(lp - sg(lp)) with its own advantage; fractional weights
    weigh the sequence's mean log-ratio too. bfloat16 inputs for the tolerance of a real run."""
    lp, old, adv, mask, ref = _inputs(seed=2, per_token_adv=True, weights=True, dtype=torch.bfloat16)
    kw = dict(importance_sampling_level="sequence", surrogate=surrogate, aggregation="seq-mean-token-mean",
              clip_low=GSPO_CLIP_LOW, clip_high=GSPO_CLIP_HIGH, kl_coef=KL_COEF)
    res, grad = _run(backend, lp, old, adv, mask, ref, dtype=torch.bfloat16, **kw)
    x = lp.clone().requires_grad_()
    loss, clip_fraction, *_ = _definition(x, old, adv, mask, ref, level="sequence", surrogate=surrogate,
                                          aggregation="seq-mean-token-mean", clip_low=GSPO_CLIP_LOW,
                                          clip_high=GSPO_CLIP_HIGH)
    assert_close(res.loss, loss, torch.float32, "loss")
    assert_close(grad, _grad_of(loss, x), torch.bfloat16, "grad")
    assert_close(res.clip_fraction, torch.tensor(clip_fraction), torch.float32, "clip_fraction")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gspo_clips_whole_sequences_and_scales_each_token_gradient_by_its_sequence_ratio(backend):
    """By hand: with one advantage per sequence, a sequence is clipped or not as a whole, and an unclipped token's
    gradient is -s_i A_i w_t / B (seq-mean-token-sum) whatever its own ratio."""
    lp, old, adv, mask, ref = _inputs(seed=7)
    res, grad = _run(backend, lp, old, adv, mask, ref, importance_sampling_level="sequence",
                     aggregation="seq-mean-token-sum", clip_low=GSPO_CLIP_LOW, clip_high=GSPO_CLIP_HIGH)
    on = mask != 0
    s = torch.exp(torch.where(on, lp - old, torch.zeros_like(lp)).sum(1) / mask.sum(1).clamp_min(1))
    clipped = ((s > 1 + GSPO_CLIP_HIGH) & (adv > 0)) | ((s < 1 - GSPO_CLIP_LOW) & (adv < 0))
    assert 0 < int(clipped[on.any(1)].sum()) < int(on.any(1).sum())  # some sequences clipped, some not
    want = torch.where(on & ~clipped[:, None], -(s * adv)[:, None] * mask / B, torch.zeros_like(lp))
    assert_close(grad, want, torch.float32, "grad")
    tokens_clipped = (mask * clipped[:, None]).sum() / mask.sum()
    assert_close(res.clip_fraction, tokens_clipped, torch.float32, "clip fraction")
    assert_close(res.ratio_mean, (mask * s[:, None]).sum() / mask.sum(), torch.float32, "ratio mean")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_cispo_passes_a_gradient_through_every_token(backend):
    """CISPO clips the weight, not the update: tokens far outside the range still get -clip(r) A / N."""
    lp, old, adv, mask, ref = _inputs(seed=4)
    n = float(mask.sum())
    res, grad = _run(backend, lp, old, adv, mask, ref, surrogate="cispo", clip_low=1.0, clip_high=0.1,
                     aggregation="dapo", num_items_in_batch=n)
    on = mask != 0
    ratio = torch.exp(torch.where(on, lp - old, torch.zeros_like(lp)))
    assert bool((on & (ratio > 1.1)).any())
    want = torch.where(on, -ratio.clamp(max=1.1) * adv[:, None] / n, torch.zeros_like(lp))
    assert_close(grad, want, torch.float32, "grad")
    assert (grad[on & (adv[:, None] != 0)] != 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dapo_micro_batches_sum_to_the_batch_token_mean(backend):
    """num_items_in_batch makes micro-batch losses add up: two halves, each over the whole batch's token count,
    give the token-mean loss and gradient of the whole batch (what gradient accumulation and DDP need)."""
    lp, old, adv, mask, ref = _inputs(seed=5)
    full, g_full = _run(backend, lp, old, adv, mask, ref, aggregation="token-mean", kl_coef=KL_COEF)
    n = mask.sum()  # a tensor, as TRL passes it
    halves = [_run(backend, lp[rows], old[rows], adv[rows], mask[rows], ref[rows], aggregation="dapo",
                   num_items_in_batch=n, kl_coef=KL_COEF) for rows in (slice(0, 2), slice(2, B))]
    assert_close(halves[0][0].loss + halves[1][0].loss, full.loss.double(), torch.float32, "loss")
    assert_close(torch.cat([halves[0][1], halves[1][1]]), g_full, torch.float32, "grad")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fixed_normalisers_edges(backend):
    """Dr. GRPO with the default length is seq-mean-token-sum / T; a global count of 0 (no token anywhere) gives 0."""
    lp, old, adv, mask, ref = _inputs(seed=6)
    dr, _ = _run(backend, lp, old, adv, mask, ref, aggregation="dr-grpo")
    per_seq, _ = _run(backend, lp, old, adv, mask, ref, aggregation="seq-mean-token-sum")
    assert_close(dr.loss, per_seq.loss.double() / T, torch.float32, "dr-grpo")
    none, g = _run(backend, lp, old, adv, torch.zeros_like(mask), ref, aggregation="dapo", num_items_in_batch=0)
    assert float(none.loss.detach()) == 0 and (g == 0).all()
    empty, g = _run(backend, lp[:0], old[:0], adv[:0], mask[:0], ref[:0], aggregation="dr-grpo")
    assert float(empty.loss.detach()) == 0 and g.shape == (0, T)


# --- against Liger-Kernel's and TRL's own code ------------------------------------------------------------------

# ra3 aggregation -> the loss_type of TRL and Liger-Kernel that normalises the same way
LOSS_TYPE = {"token-mean": "bnpo", "seq-mean-token-mean": "grpo", "dr-grpo": "dr_grpo", "dapo": "dapo"}


def _library_cases():
    for aggregation in LOSS_TYPE:
        for level in ("token", "sequence"):
            yield "ppo", aggregation, level
    yield "cispo", "dapo", "token"


def _ra3_kwargs(surrogate, aggregation, level, mask):
    clip_low, clip_high = _clips(level)
    if surrogate == "cispo":  # TRL and Liger: clamp(r, max=epsilon_high), no lower bound
        clip_low, clip_high = 1.0, 0.3
    return dict(importance_sampling_level=level, surrogate=surrogate, aggregation=aggregation, clip_low=clip_low,
                clip_high=clip_high, kl_coef=KL_COEF, **_agg_kwargs(aggregation, mask))


def _library_args(kw):
    """epsilon_low / epsilon_high, max_completion_length, num_items_in_batch as TRL and Liger take them."""
    cispo = kw["surrogate"] == "cispo"
    return dict(epsilon_low=0.0 if cispo else kw["clip_low"],
                epsilon_high=1 + kw["clip_high"] if cispo else kw["clip_high"],
                loss_type="cispo" if cispo else LOSS_TYPE[kw["aggregation"]],
                max_completion_length=kw.get("max_completion_length"),
                num_items_in_batch=kw.get("num_items_in_batch"))


def _padded(lp, old, mask, ref):
    """The libraries multiply padding by mask 0 (NaN * 0 = NaN): give them finite padding."""
    fill = lambda t: torch.where(mask != 0, t, torch.full_like(t, -1.0))  # noqa: E731
    return fill(lp), fill(old), fill(ref)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("surrogate,aggregation,level", list(_library_cases()))
def test_matches_liger_kernel(backend, surrogate, aggregation, level):
    grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    lp, old, adv, mask, ref = _inputs(seed=7)
    kw = _ra3_kwargs(surrogate, aggregation, level, mask)
    res, grad = _run(backend, lp, old, adv, mask, ref, **kw)
    lib = _library_args(kw)
    lp_f, old_f, ref_f = _padded(lp, old, mask, ref)
    x = lp_f.clone().requires_grad_()
    loss, metrics = grpo.LigerFusedLinearGRPOFunction.ppo_loss_fn(
        x, mask, adv, mask, ref_per_token_logps=ref_f, old_per_token_logps=old_f, beta=KL_COEF,
        importance_sampling_level=level, **lib)
    assert_close(res.loss, loss, torch.float32, "loss")
    assert_close(grad, _grad_of(loss, x) * (mask != 0), torch.float32, "grad")
    assert_close(res.kl_mean, metrics[0], torch.float32, "kl_mean")
    if surrogate == "ppo":  # Liger counts cispo's upper clips only where A > 0
        assert_close(res.clip_fraction, metrics[-1], torch.float32, "clip_fraction")


def _trl_compute_loss(lp, old, adv, mask, ref, *, level, epsilon_low, epsilon_high, loss_type,
                      max_completion_length, num_items_in_batch):
    """TRL's ``GRPOTrainer._compute_loss`` on a stand-in trainer (one process, no accumulation, no vLLM, no
    entropy terms) whose model returns ``lp`` as the per-token log-probs."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    stand_in = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=KL_COEF,
        loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
        max_completion_length=max_completion_length, use_vllm=False, vllm_importance_sampling_correction=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t))
    n = lp.shape[0]
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1),
              "completion_ids": torch.zeros(lp.shape, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(num_items_in_batch if num_items_in_batch is not None else 1.0)}
    loss = trl_grpo.GRPOTrainer._compute_loss(stand_in, None, inputs)
    return loss, stand_in._metrics["train"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("surrogate,aggregation,level", list(_library_cases()))
def test_matches_trl(backend, surrogate, aggregation, level):
    lp, old, adv, mask, ref = _inputs(seed=8)
    kw = _ra3_kwargs(surrogate, aggregation, level, mask)
    lib = _library_args(kw)
    lp_f, old_f, ref_f = _padded(lp, old, mask, ref)
    x = lp_f.clone().requires_grad_()
    loss, metrics = _trl_compute_loss(x, old_f, adv, mask, ref_f, level=level, **lib)
    res, grad = _run(backend, lp, old, adv, mask, ref, **kw)
    assert_close(res.loss, loss, torch.float32, "loss")
    assert_close(grad, _grad_of(loss, x) * (mask != 0), torch.float32, "grad")
    assert_close(res.kl_mean, torch.tensor(metrics["kl"][0], dtype=torch.float64), torch.float32, "kl_mean")
    if surrogate == "ppo" and level == "token":  # TRL's sequence-level metric weighs sequences, not tokens
        assert_close(res.clip_fraction, torch.tensor(metrics["clip_ratio/region_mean"][0], dtype=torch.float64),
                     torch.float32, "clip_fraction")


# --- group advantages scaled by the batch's std -----------------------------------------------------------------


def _trl_batch_scaled(rewards, group_ids, eps):
    """TRL's scale_rewards="batch" (GRPOTrainer._generate_and_score_completions), float64: each reward minus its
    group's mean, over the unbiased std of every reward of the batch (trl.trainer.utils.nanstd) plus eps."""
    n = rewards.numel()
    group_mean = torch.stack([rewards[group_ids == k].mean() for k in group_ids.tolist()])
    if n > 1:
        centred = rewards - rewards.mean()
        std = torch.sqrt((centred * centred).mean() * n / (n - 1))
    else:
        std = torch.zeros(())
    return (rewards - group_mean) / (std + eps)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("grouping", ("group_size", "group_ids"))
def test_batch_std_advantages_match_trl(backend, grouping):
    device = require_backend(backend, "group_advantages")
    g = torch.Generator().manual_seed(9)
    rewards = torch.randn(12, generator=g, dtype=torch.float64) + torch.arange(12) // 4  # groups at different levels
    rewards[4:8] = 0.5  # a constant group: advantages 0, but the batch's std is not
    if grouping == "group_size":
        ids, kw = torch.arange(12) // 4, {"group_size": 4}
    else:
        ids = torch.tensor([2, 0, 2, 1, 1, 1, 1, 5, 0, 2, 5, 3])  # unequal groups, one of one sample, sparse ids
        kw = {"group_ids": ids.to(device)}
    x = rewards.float().to(device).requires_grad_()
    out = ops.group_advantages(x, normalize="batch-std", eps=1e-4, backend=backend, **kw)
    r64 = rewards.float().double().requires_grad_()
    want = _trl_batch_scaled(r64, ids, 1e-4)
    assert_close(out, want, torch.float32, "advantages")
    up = torch.randn(12, generator=g, dtype=torch.float64)
    (got,) = torch.autograd.grad((out.double() * up.to(device)).sum(), x)
    (exp,) = torch.autograd.grad((want * up).sum(), r64)
    assert_close(got, exp, torch.float32, "grad")
    std_scaled = ops.group_advantages(x, normalize="std", eps=1e-4, backend=backend, **kw)
    assert not torch.allclose(out, std_scaled)  # the batch's std, not each group's


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_batch_std_edges(backend):
    """A batch of one, or a constant batch, has std 0: advantages 0; one group is GRPO's 'std'."""
    device = require_backend(backend, "group_advantages")
    for rewards in (torch.tensor([3.0]), torch.full((4,), 2.0)):
        out = ops.group_advantages(rewards.to(device), group_size=1, normalize="batch-std", backend=backend)
        assert (out == 0).all()
    r = torch.randn(6, generator=torch.Generator().manual_seed(10)).to(device)
    assert_close(ops.group_advantages(r, normalize="batch-std", backend=backend),
                 ops.group_advantages(r.double(), normalize="std", backend="torch"), torch.float32)


def test_batch_std_gradcheck():
    for backend in ("torch", "cpu"):
        device = require_backend(backend, "group_advantages")
        r = torch.randn(9, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x: ops.group_advantages(x, group_size=3, normalize="batch-std", backend=backend), (r,))


# --- arguments --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ("torch", "cpu"))
def test_variant_arguments_are_validated_by_name(backend):
    device = require_backend(backend, "policy_loss")
    lp = torch.zeros(2, 3, device=device)
    args = (lp, lp, torch.ones(2, device=device), torch.ones(2, 3, device=device))
    bad = [
        (dict(importance_sampling_level="seq"), ValueError, "importance_sampling_level"),
        (dict(surrogate="gspo"), ValueError, "surrogate"),
        (dict(aggregation="dr_grpo"), ValueError, "aggregation"),
        (dict(aggregation="dapo"), ValueError, "num_items_in_batch"),
        (dict(aggregation="dapo", num_items_in_batch=-1), ValueError, "num_items_in_batch"),
        (dict(aggregation="dapo", num_items_in_batch=float("nan")), ValueError, "num_items_in_batch"),
        (dict(aggregation="dapo", num_items_in_batch=torch.ones(2)), TypeError, "num_items_in_batch"),
        (dict(aggregation="dapo", num_items_in_batch="4"), TypeError, "num_items_in_batch"),
        (dict(num_items_in_batch=4), ValueError, "num_items_in_batch"),
        (dict(aggregation="dr-grpo", max_completion_length=0), ValueError, "max_completion_length"),
        (dict(aggregation="dr-grpo", max_completion_length=2.5), TypeError, "max_completion_length"),
        (dict(max_completion_length=8), ValueError, "max_completion_length"),
        (dict(clip_low=1.0), ValueError, "clip_low"),
        (dict(surrogate="cispo", clip_low=1.5), ValueError, "clip_low"),
    ]
    for kw, error, name in bad:
        with pytest.raises(error, match=name):
            ops.policy_loss(*args, backend=backend, **kw)
    ok = ops.policy_loss(*args, surrogate="cispo", clip_low=1.0, aggregation="dapo",
                         num_items_in_batch=torch.tensor(6), backend=backend)
    assert torch.isfinite(ok.loss)
    with pytest.raises(ValueError, match="normalize"):
        ops.group_advantages(torch.randn(4), normalize="batch", backend=backend)
    with pytest.raises(ValueError, match="eps"):
        ops.group_advantages(torch.ones(4), normalize="batch-std", eps=0, backend=backend)

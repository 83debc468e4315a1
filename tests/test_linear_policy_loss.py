"""ops.linear_policy_loss (the policy loss fused with the lm_head, gradients formed in the forward pass): every
backend against the float64 reference (logits materialised), the reference against closed forms written here,
the fused op against the unfused ``policy_loss(linear_logprobs(...))`` and against Liger-Kernel's fused linear GRPO
loss where it is installed."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import ALL_BACKENDS, assert_close, assert_within_eager, eager_in, require_backend
from ra3 import ops
from ra3.ops import reference, vocab_softmax_walk
from ra3.ops.linear_policy_loss import linear_policy_loss_op

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "dr-grpo", "dapo")
B, T, H, V = 3, 5, 8, 23  # N = 15 rows: four row chunks of 4 under ``small_rows`` (the last one ragged)


@pytest.fixture
def small_rows(monkeypatch):
    """Row chunks of 4 tokens, so the walk's chunk loop (and a ragged last chunk) runs on tiny shapes."""
    monkeypatch.setattr(vocab_softmax_walk, "CE_MIN_ROWS", 4)
    monkeypatch.setattr(vocab_softmax_walk, "CE_TILE_ELEMENTS", {"cpu": 1, "cuda": 1})
    monkeypatch.setattr(vocab_softmax_walk, "POLICY_MIN_ROWS", 4)
    monkeypatch.setattr(vocab_softmax_walk, "POLICY_TILE_ELEMENTS", {"cpu": 1})


def _case(device, *, dtype=torch.float32, bias=True, fractional=True, token_adv=False, seed=0, b=B, t=T):
    """Inputs whose old and reference log-probs sit near the policy's, so some ratios clip and some do not; one
    sequence without weight, inf at a padded token of old_logprobs, ignored targets at a live and a padded token."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(b, t, H, generator=g)).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    bias_t = (0.5 * torch.randn(V, generator=g)).to(dtype) if bias else None
    targets = torch.randint(0, V, (b, t), generator=g)
    with torch.no_grad():
        lp = reference.linear_logprobs(hidden.double().reshape(-1, H), weight.double(), targets.reshape(-1),
                                       bias=None if bias_t is None else bias_t.double()).reshape(b, t)
    old = lp + 0.25 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref = lp + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) * 0.8 + 0.2 if fractional else torch.ones(b, t)
    mask[torch.rand(b, t, generator=g) < 0.2] = 0
    if b > 1:
        mask[1] = 0  # a sequence without weight: ratio 1, contributes nothing
    adv = torch.randn(b, t, generator=g) if token_adv else torch.randn(b, generator=g)
    if b and t > 2:
        mask[0, 1], mask[0, 2] = 0, 0.7
        old[0, 1] = float("inf")  # padding: never reaches anything
        targets[0, 2] = -100  # a live token with an ignored target: log-prob 0, no gradient through it
        old[0, 2], ref[0, 2] = 0.05, -0.1  # near its log-prob 0
        targets[0, 1] = -100
    mask = mask if fractional else mask > 0

    def move(x, grad=False):
        return None if x is None else x.to(device).requires_grad_(grad)
    return dict(hidden=move(hidden, True), weight=move(weight, True), bias=move(bias_t, bias),
                targets=targets.to(device), old=move(old.float()), adv=move(adv), mask=move(mask),
                ref=move(ref.float()))


def _kw(aggregation, level="token", surrogate="ppo", kl_coef=0.05, estimator="k3", entropy_coef=0.01):
    kw = dict(aggregation=aggregation, importance_sampling_level=level, surrogate=surrogate, kl_coef=kl_coef,
              kl_estimator=estimator, entropy_coef=entropy_coef, clip_low=0.1, clip_high=0.15, temperature=0.9)
    if aggregation == "dr-grpo":
        kw["max_completion_length"] = 7
    if aggregation == "dapo":
        kw["num_items_in_batch"] = 11.5
    if surrogate == "cispo":
        kw["clip_low"], kw["clip_high"] = 1.0, 0.05  # no lower bound, as TRL's and Liger's cispo
    return kw


def _leaves(c):
    return [x for x in (c["hidden"], c["weight"], c["bias"]) if x is not None]


def _run(c, backend, **kw):
    out = ops.linear_policy_loss(c["hidden"], c["weight"], c["targets"], c["old"], c["adv"], c["mask"],
                                 bias=c["bias"], ref_logprobs=c["ref"], backend=backend, **kw)
    grads = torch.autograd.grad(out.loss, _leaves(c))
    return out._replace(loss=out.loss.detach()), grads


def _ref64(c, **kw):
    """The float64 reference on CPU copies: (results, gradients)."""
    d = {k: (None if v is None else v.detach().cpu()) for k, v in c.items()}
    leaves = [None if d[k] is None else d[k].double().requires_grad_() for k in ("hidden", "weight", "bias")]
    out = reference.linear_policy_loss(leaves[0], leaves[1], d["targets"], d["old"].double(), d["adv"].double(),
                                       d["mask"], bias=leaves[2], ref_logprobs=d["ref"].double(), **kw)
    return out, torch.autograd.grad(out[0], [x for x in leaves if x is not None])


def _compare(got, got_grads, want, want_grads, dtype=torch.float32):
    for name, a, e in zip(("loss", "clip_fraction", "kl_mean", "ratio_mean", "entropy_mean"), got, want):
        assert_close(a.reshape(()), e, dtype, name)
    for name, a, e in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        assert_close(a, e, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("level", ("token", "sequence"))
@pytest.mark.parametrize("surrogate", ("ppo", "cispo"))
def test_matches_reference(backend, aggregation, level, surrogate, small_rows):
    device = require_backend(backend, "linear_policy_loss")
    c = _case(device, token_adv=surrogate == "cispo")
    kw = _kw(aggregation, level, surrogate)
    out, grads = _run(c, backend, **kw)
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    want, want_grads = _ref64(c, **kw)
    _compare(out, grads, want, want_grads)
    assert 0 < float(out.clip_fraction) < 1  # the case clips some tokens and not others
    assert grads[0][0, 1].abs().max() == 0  # padding


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("estimator", ("k1", "k2", "k3", None))
@pytest.mark.parametrize("entropy_coef", (0.0, 0.3))
def test_kl_estimators_and_entropy(backend, estimator, entropy_coef, small_rows):
    device = require_backend(backend, "linear_policy_loss")
    c = _case(device, bias=False, fractional=False, seed=1)
    kw = _kw("seq-mean-token-mean", entropy_coef=entropy_coef, kl_coef=0.0 if estimator is None else 0.2,
             estimator=estimator or "k3")
    out, grads = _run(c, backend, **kw)
    want, want_grads = _ref64(c, **kw)
    _compare(out, grads, want, want_grads)
    if estimator is None:
        assert float(out.kl_mean) == 0
    if entropy_coef == 0:  # a live token whose target is ignored: log-prob 0, and no gradient without entropy
        assert grads[0][0, 2].abs().max() == 0
    assert float(out.entropy_mean) > 0  # logged whatever entropy_coef is


def _closed_form(h, w, bias, targets, old, adv, mask, ref, *, beta, ent_coef, temperature, clip_low, clip_high,
                 sequence):
    """GRPO as its papers write it, in float64 with materialised logits: per sequence, the mean over its tokens of
    max(-r A, -clip(r) A) + beta * k3 - ent_coef * H, then the mean over sequences. ``sequence``: GSPO's objective,
    max(-s A, -clip(s) A) per sequence with s = exp(mean_t (lp - old)), differentiated through s."""
    logits = (h.reshape(-1, h.shape[-1]) @ w.T + bias) / temperature
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(1, targets.reshape(-1, 1)).reshape(targets.shape)
    ent = -(logp.exp() * logp).sum(-1).reshape(targets.shape)
    m = mask.double()
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    if sequence:
        s = torch.exp((m * (lp - old)).sum(1) / m.sum(1))
        surrogate = torch.maximum(-s * adv, -s.clamp(1 - clip_low, 1 + clip_high) * adv)
        rest = (m * (beta * k3 - ent_coef * ent)).sum(1) / m.sum(1)
        return (surrogate + rest).mean()
    r = torch.exp(lp - old)
    per = torch.maximum(-r * adv[:, None], -r.clamp(1 - clip_low, 1 + clip_high) * adv[:, None])
    per = per + beta * k3 - ent_coef * ent
    return ((m * per).sum(1) / m.sum(1)).mean()


@pytest.mark.parametrize("backend", ("torch", "cpu"))
@pytest.mark.parametrize("sequence", (False, True))
def test_grpo_and_gspo_closed_forms(backend, sequence, small_rows):
    """Checks the composition itself (reference included) against the loss written out by hand."""
    device = require_backend(backend, "linear_policy_loss")
    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, 6, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (4, 6), generator=g)
    old = -3 + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    ref = old + 0.2 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) > 0.3
    mask[:, 0] = True
    kw = dict(beta=0.1, ent_coef=0.05, temperature=1.1, clip_low=0.2, clip_high=0.28, sequence=sequence)
    leaves = [x.clone().requires_grad_() for x in (h, w, bias)]
    want = _closed_form(*leaves, targets, old, adv, mask, ref, **kw)
    want_grads = torch.autograd.grad(want, leaves)
    leaves = [x.clone().to(device).requires_grad_() for x in (h, w, bias)]
    out = ops.linear_policy_loss(leaves[0], leaves[1], targets.to(device), old.to(device), adv.to(device),
                                 mask.to(device), bias=leaves[2], ref_logprobs=ref.to(device), kl_coef=0.1,
                                 entropy_coef=0.05, temperature=1.1, clip_low=0.2, clip_high=0.28,
                                 aggregation="seq-mean-token-mean",
                                 importance_sampling_level="sequence" if sequence else "token", backend=backend)
    got_grads = torch.autograd.grad(out.loss, leaves)
    assert out.loss.dtype == torch.float64
    assert_close(out.loss, want, torch.float64, "loss")
    for name, a, e in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        assert_close(a, e, torch.float64, f"grad {name}")


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("level", ("token", "sequence"))
def test_equals_the_unfused_path_on_cpu(aggregation, level, small_rows):
    """Without an entropy term the fused op is policy_loss(linear_logprobs(...)): loss, statistics, gradients."""
    device = require_backend("cpu", "linear_policy_loss")
    c = _case(device, seed=4)
    kw = _kw(aggregation, level, entropy_coef=0.0)
    kw.pop("entropy_coef")
    temperature = kw.pop("temperature")
    out, grads = _run(c, "cpu", temperature=temperature, **kw)
    lp = ops.linear_logprobs(c["hidden"].reshape(-1, H), c["weight"], c["targets"].reshape(-1), bias=c["bias"],
                             temperature=temperature, backend="cpu").reshape(B, T)
    unfused = ops.policy_loss(lp, c["old"], c["adv"], c["mask"], ref_logprobs=c["ref"], backend="cpu", **kw)
    unfused_grads = torch.autograd.grad(unfused.loss, _leaves(c))
    for name, a, e in zip(("loss", "clip_fraction", "kl_mean", "ratio_mean"), out, unfused):
        assert_close(a, e, torch.float32, name)
    for name, a, e in zip(("hidden", "weight", "bias"), grads, unfused_grads):
        assert_close(a, e, torch.float32, f"grad {name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bf16_within_torch_eager_s_error(backend, small_rows):
    device = require_backend(backend, "linear_policy_loss")
    c = _case(device, dtype=torch.bfloat16, seed=5)
    kw = _kw("token-mean")
    out, grads = _run(c, backend, **kw)
    assert [gr.dtype for gr in grads] == [torch.bfloat16] * 3
    want, want_grads = _ref64(c, **kw)
    d = {k: (None if v is None else v.detach().cpu()) for k, v in c.items()}
    leaves = [d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    with eager_in(torch.bfloat16):  # torch eager on the bf16 model: its own error is the yardstick
        eager = reference.linear_policy_loss(leaves[0], leaves[1], d["targets"], d["old"], d["adv"], d["mask"],
                                             bias=leaves[2], ref_logprobs=d["ref"], **kw)
        eager_grads = torch.autograd.grad(eager[0], leaves)
    assert_within_eager(out.loss, want[0], eager[0], "loss")
    for name, a, e, g in zip(("hidden", "weight", "bias"), grads, want_grads, eager_grads):
        assert_within_eager(a, e, g, f"grad {name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("b, t", ((0, 5), (3, 0)))
def test_empty_batch(backend, b, t):
    device = require_backend(backend, "linear_policy_loss")
    c = _case(device, b=b, t=t)
    for aggregation in ("token-mean", "seq-mean-token-mean"):
        out, grads = _run(c, backend, **_kw(aggregation))
        assert all(float(s) == 0 for s in out)
        assert [tuple(gr.shape) for gr in grads] == [(b, t, H), (V, H), (V,)]
        assert all(float(gr.abs().sum()) == 0 for gr in grads)


@pytest.mark.parametrize("backend", ("torch", "cpu"))
def test_flat_hidden_upstream_scale_and_no_grad(backend, small_rows):
    """hidden [B * T, H] gives what [B, T, H] gives; the backward scales the saved gradients by the upstream one;
    without gradients (the 1-GEMM path) the loss and statistics are unchanged."""
    device = require_backend(backend, "linear_policy_loss")
    c = _case(device, seed=6)
    kw = _kw("dapo", "sequence")
    out, grads = _run(c, backend, **kw)
    flat = dict(c, hidden=c["hidden"].detach().reshape(B * T, H).requires_grad_())
    out2 = ops.linear_policy_loss(flat["hidden"], c["weight"], c["targets"], c["old"], c["adv"], c["mask"],
                                  bias=c["bias"], ref_logprobs=c["ref"], backend=backend, **kw)
    g2 = torch.autograd.grad(3.0 * out2.loss, [flat["hidden"], c["weight"], c["bias"]])
    assert_close(out2.loss, out.loss, torch.float32, "loss")
    assert_close(g2[0].reshape(B, T, H), 3 * grads[0], torch.float32, "grad hidden")
    assert_close(g2[1], 3 * grads[1], torch.float32, "grad weight")
    with torch.no_grad():
        out3 = ops.linear_policy_loss(c["hidden"], c["weight"], c["targets"], c["old"], c["adv"], c["mask"],
                                      bias=c["bias"], ref_logprobs=c["ref"], backend=backend, **kw)
    for a, e in zip(out3, out):
        assert_close(a, e, torch.float32, "no-grad result")


@pytest.mark.parametrize("backend", ("torch", "cpu"))
def test_softcap_and_scale(backend, small_rows):
    device = require_backend(backend, "linear_policy_loss")
    c = _case(device, seed=7)
    kw = dict(_kw("token-mean"), softcap=2.0, scale=1.5)
    out, grads = _run(c, backend, **kw)
    want, want_grads = _ref64(c, **kw)
    _compare(out, grads, want, want_grads)


def test_custom_op_passes_opcheck():
    require_backend("cpu", "linear_policy_loss")
    c = _case("cpu", seed=8)
    args = ("cpu", c["hidden"].detach().reshape(-1, H).requires_grad_(), c["weight"], c["bias"], c["targets"],
            c["old"], c["adv"], c["mask"].float(), c["ref"], 1.0, 1.0, 0.0, 0.2, 0.2, 0.1, 3, 0.01, 2, 0.0, 0, 0,
            True, True)
    torch.library.opcheck(linear_policy_loss_op, args)
    frozen_head = args[:2] + (c["weight"].detach(), None) + args[4:-1] + (False,)
    torch.library.opcheck(linear_policy_loss_op, frozen_head)


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_frozen_head_gets_no_gradient(backend, small_rows):
    """A head that needs no gradient (LoRA, a frozen lm_head) skips the grad_weight GEMM; hidden's gradient is
    unchanged."""
    device = require_backend(backend, "linear_policy_loss")
    c = _case(device, seed=10)
    kw = _kw("seq-mean-token-mean", entropy_coef=0.1)
    _out, grads = _run(c, backend, **kw)
    frozen = dict(c, weight=c["weight"].detach(), bias=c["bias"].detach())
    out = ops.linear_policy_loss(frozen["hidden"], frozen["weight"], c["targets"], c["old"], c["adv"], c["mask"],
                                 bias=frozen["bias"], ref_logprobs=c["ref"], backend=backend, **kw)
    (gh,) = torch.autograd.grad(out.loss, [c["hidden"]])
    assert_close(gh, grads[0], torch.float32, "grad hidden")


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
@pytest.mark.parametrize("loss_type, aggregation, level", (
    ("grpo", "seq-mean-token-mean", "token"), ("bnpo", "token-mean", "token"), ("dr_grpo", "dr-grpo", "token"),
    ("dapo", "dapo", "token"), ("grpo", "seq-mean-token-mean", "sequence"), ("cispo", "dapo", "token")))
def test_agrees_with_liger_s_fused_linear_grpo_loss(loss_type, aggregation, level):
    """Liger-Kernel's LigerFusedLinearGRPOLoss (plain torch, runs on CPU) on the same inputs: loss, gradients, and
    the statistics both report (clip fraction, KL mean)."""
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

    device = require_backend("cpu", "linear_policy_loss")
    c = _case(device, fractional=False, seed=9)
    c["old"] = torch.where(c["mask"], c["old"], torch.zeros_like(c["old"]))  # Liger multiplies padding by 0
    c["targets"] = c["targets"].clamp_min(0)
    c["mask"][1, 0] = True  # Liger averages with clamp(mask.sum, min=1): every sequence has a token here
    high = 1.5 if loss_type == "cispo" else 0.28
    liger = LigerFusedLinearGRPOLoss(beta=0.1, compiled=False, epsilon_low=0.2, epsilon_high=high,
                                     loss_type=loss_type, max_completion_length=7, importance_sampling_level=level,
                                     temperature=0.9)
    leaves = [x.detach().clone().requires_grad_() for x in _leaves(c)]
    num_items = 9.0
    loss, metrics = liger(leaves[0], leaves[1], c["targets"], c["mask"], c["adv"], bias=leaves[2],
                          ref_per_token_logps=c["ref"], old_per_token_logps=c["old"],
                          num_items_in_batch=torch.tensor(num_items) if loss_type in ("dapo", "cispo") else None)
    want_grads = torch.autograd.grad(loss, leaves)
    kw = dict(aggregation=aggregation, importance_sampling_level=level, kl_coef=0.1, temperature=0.9,
              clip_low=0.2, clip_high=high - 1 if loss_type == "cispo" else high)
    if loss_type == "cispo":
        kw.update(surrogate="cispo", clip_low=1.0)
    if aggregation == "dr-grpo":
        kw["max_completion_length"] = 7
    if aggregation == "dapo":
        kw["num_items_in_batch"] = num_items
    out, grads = _run(c, "cpu", **kw)
    assert_close(out.loss, loss, torch.float32, "loss")
    assert_close(out.kl_mean, metrics[0], torch.float32, "kl_mean")
    for name, a, e in zip(("hidden", "weight", "bias"), grads, want_grads):
        assert_close(a, e, torch.float32, f"grad {name}")


@pytest.mark.parametrize("change, error, match", (
    (dict(targets=torch.zeros(6, dtype=torch.long)), ValueError, "targets"),
    (dict(targets=torch.zeros(2, 3)), TypeError, "targets"),
    (dict(targets=torch.full((2, 3), 50)), ValueError, "targets"),
    (dict(hidden=torch.zeros(2, 4, 4)), ValueError, "hidden"),
    (dict(hidden=torch.zeros(2, 3, 4, dtype=torch.long)), TypeError, "hidden"),
    (dict(weight=torch.zeros(10, 5)), ValueError, "weight"),
    (dict(bias=torch.zeros(9)), ValueError, "bias"),
    (dict(old=torch.zeros(3, 2)), ValueError, "old_logprobs"),
    (dict(adv=torch.zeros(3)), ValueError, "advantages"),
    (dict(adv=torch.tensor([0.0, float("nan")])), ValueError, "advantages"),
    (dict(mask=torch.ones(2, 2)), ValueError, "mask"),
    (dict(entropy_coef=-0.1), ValueError, "entropy_coef"),
    (dict(entropy_coef=True), TypeError, "entropy_coef"),
    (dict(kl_coef=0.1, ref=None), ValueError, "ref_logprobs"),
    (dict(aggregation="mean"), ValueError, "aggregation"),
    (dict(aggregation="dapo"), ValueError, "num_items_in_batch"),
    (dict(max_completion_length=4), ValueError, "max_completion_length"),
    (dict(importance_sampling_level="seq"), ValueError, "importance_sampling_level"),
    (dict(clip_low=1.0), ValueError, "clip_low"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(backend="gpu"), ValueError, "backend"),
))
def test_validation_names_the_argument(change, error, match):
    args = dict(hidden=torch.zeros(2, 3, 4), weight=torch.zeros(10, 4), targets=torch.zeros(2, 3, dtype=torch.long),
                old=torch.zeros(2, 3), adv=torch.zeros(2), mask=torch.ones(2, 3), bias=None, ref=None)
    args.update(change)
    kw = {k: args.pop(k) for k in list(args) if k not in ("hidden", "weight", "targets", "old", "adv", "mask",
                                                          "bias", "ref")}
    with pytest.raises(error, match=match):
        ops.linear_policy_loss(args["hidden"], args["weight"], args["targets"], args["old"], args["adv"],
                               args["mask"], bias=args["bias"], ref_logprobs=args["ref"], **kw)

"""ra3's drop-in for verl's FusedLinearForPPO: outputs and gradients against verl's math (and verl, if installed)."""
import pytest
import torch

from ra3.integrations.verl import RA3FusedLinearForPPO, fused_linear_for_ppo, patch_verl


def _verl_math(hidden, weight, labels, temperature):
    """verl 0.9.1 _fused_linear_for_ppo_fwd, restated in float64: log_softmax(h @ W.T / T)[label], entropy."""
    logits = (hidden.double() @ weight.double().T) / temperature
    logp = logits.log_softmax(-1)
    return logp.gather(-1, labels[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


def _inputs(shape, h=16, v=300, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, shape, generator=g)
    return hidden, weight, labels


@pytest.mark.parametrize("shape", [(3, 7), (11,)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_matches_verl_math_forward_and_backward(shape, temperature):
    hidden, weight, labels = _inputs(shape)
    lp, ent = fused_linear_for_ppo(hidden, weight, labels, temperature)
    assert lp.shape == shape and ent.shape == shape and lp.dtype == torch.float32 and ent.dtype == torch.float32
    want_lp, want_ent = _verl_math(hidden, weight, labels, temperature)
    torch.testing.assert_close(lp.double(), want_lp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-4, atol=1e-5)
    a, b = torch.randn(shape), torch.randn(shape)
    got = torch.autograd.grad((lp * a).sum() + (ent * b).sum(), (hidden, weight))
    want = torch.autograd.grad((want_lp * a.double()).sum() + (want_ent * b.double()).sum(), (hidden, weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5)


def test_module_dtype_contract_and_ignore_index():
    hidden, weight, labels = _inputs((2, 5), dtype=torch.bfloat16)
    lp, ent = RA3FusedLinearForPPO(chunk_size=64, impl_backend="torch")(hidden, weight, labels, 0.8)
    assert lp.dtype == torch.float32 and ent.dtype == torch.bfloat16  # as verl: fp32 log-probs, entropy in h's dtype
    want_lp, want_ent = _verl_math(hidden, weight, labels, 0.8)
    torch.testing.assert_close(lp.double(), want_lp, rtol=2e-2, atol=2e-2)
    labels[0, 1] = -100
    lp, _ = fused_linear_for_ppo(hidden.float(), weight.float(), labels)
    assert lp[0, 1] == 0 and (lp[labels != -100] < 0).all()


def test_bad_input():
    hidden, weight, labels = _inputs((2, 5))
    with pytest.raises(ValueError, match="input_ids"):
        fused_linear_for_ppo(hidden, weight, labels[:, :4])
    with pytest.raises(ValueError, match="hidden_states"):
        fused_linear_for_ppo(hidden[0, 0], weight, labels)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_for_ppo(hidden, weight, labels, 0)


def test_against_installed_verl():
    torch_functional = pytest.importorskip(
        "verl.utils.experimental.torch_functional",
        reason="verl is not installed here (verl 0.9.1 pins transformers 5.10.4 and pulls ray; see the report)")
    hidden, weight, labels = _inputs((3, 7))
    theirs = torch_functional.FusedLinearForPPO(impl_backend="torch")(hidden, weight, labels, 0.7)
    ours = fused_linear_for_ppo(hidden, weight, labels, 0.7)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    original = patch_verl()
    try:
        assert torch_functional.FusedLinearForPPO is RA3FusedLinearForPPO and original is not RA3FusedLinearForPPO
    finally:
        torch_functional.FusedLinearForPPO = original

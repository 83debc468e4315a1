"""ra3 as verl's fused log-prob/entropy kernel (verl 0.9: ``use_fused_kernels=True``, backend "torch").

verl's actor, with ``actor_rollout_ref.model.use_fused_kernels=True`` and ``fused_kernel_options.impl_backend=
torch``, replaces the model's forward by ``verl.models.transformers.dense_common.forward_with_torch_backend``,
which runs the backbone and then, on every call, does::

    from verl.utils.experimental.torch_functional import FusedLinearForPPO
    fused = FusedLinearForPPO(impl_backend=getattr(self, "_verl_fused_kernels_backend", "torch"))
    log_probs, entropy = fused.forward(hidden_states=hidden_states, vocab_weights=self.lm_head.weight,
                                       input_ids=rolled_labels, temperature=temperature)

The signature this module plugs into (verl 0.9.1, ``verl/utils/experimental/torch_functional.py``)::

    class FusedLinearForPPO(torch.nn.Module):
        def __init__(self, chunk_size: int = 512, impl_backend: str = "torch")
        def forward(self, hidden_states: FloatTensor,   # [B, T, H] or [T, H]
                    vocab_weights: FloatTensor,         # [V, H], the lm_head weight
                    input_ids: LongTensor,              # [B, T] or [T]: labels rolled left by one
                    temperature: float = 1.0) -> tuple[FloatTensor, FloatTensor]
            # -> (log_probs [B, T] | [T] float32, entropy [B, T] | [T] in hidden_states.dtype)
            # log_probs = log_softmax(hidden @ W.T / temperature)[label]; entropy of that distribution

``patch_verl()`` replaces that class (looked up at call time, so patching the module attribute suffices) by
``RA3FusedLinearForPPO``, whose forward computes the same two tensors with ``ra3.ops.linear_logprobs`` and
``ra3.ops.linear_entropy``. ``fused_linear_for_ppo`` is the same computation as a plain function.

The adapter replaces the log-prob / entropy kernel only; verl's actor keeps its own policy loss. A verl-style
trainer that computes the loss with ``ra3.ops.policy_loss`` (or ``ra3.ops.linear_policy_loss``, fused with the
lm_head, entropy bonus included) maps verl's actor config as follows:

    verl (actor_rollout_ref.actor.*)            ra3
    loss_agg_mode="token-mean"                  aggregation="token-mean"
    loss_agg_mode="seq-mean-token-sum"          aggregation="seq-mean-token-sum"
    loss_agg_mode="seq-mean-token-mean"         aggregation="seq-mean-token-mean"
    loss_agg_mode="seq-mean-token-sum-norm"     aggregation="dapo", num_items_in_batch=<verl's divisor: the
                                                response length T, or loss_scale_factor where verl has it>
                                                (verl divides the token sum by T alone, not by B x T as
                                                aggregation="dr-grpo" and TRL's dr_grpo do)
    policy_loss.loss_mode="vanilla"             surrogate="ppo", importance_sampling_level="token"
    policy_loss.loss_mode="gspo"                importance_sampling_level="sequence" (aggregated by
                                                loss_agg_mode: the GSPO paper's is "seq-mean-token-mean")
    clip_ratio_low, clip_ratio_high             clip_low, clip_high
    use_kl_loss, kl_loss_coef, kl_loss_type     kl_coef (0 without use_kl_loss), kl_estimator: "kl"/"k1" -> "k1",
                                                "mse"/"k2" -> "k2", "low_var_kl"/"k3" -> "k3" (verl clamps
                                                low_var_kl to [-10, 10]; ra3 does not); "abs", "full": none
    entropy_coeff                               entropy_coef (linear_policy_loss): verl subtracts
                                                entropy_coeff * agg_loss(entropy, mask, loss_agg_mode), the
                                                entropy aggregated as the policy term, as ra3 does
    clip_ratio_c (dual-clip of negative advantages), other loss_modes (gpg, clip_cov, kl_cov, geo_mean):
                                                no ra3 argument; with verl's default clip_ratio_c=3 the losses
                                                differ only at tokens with A < 0 and ratio > 3.
"""
from __future__ import annotations

import torch
from torch import Tensor

VERL_TARGET = "verl.utils.experimental.torch_functional.FusedLinearForPPO"


def fused_linear_for_ppo(hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor,
                         temperature: float = 1.0, *, ignore_index: int = -100,
                         backend: str = "auto") -> tuple[Tensor, Tensor]:
    """verl's (log_probs, entropy) of ``softmax(hidden_states @ vocab_weights.T / temperature)``, no logits.

    hidden_states: [B, T, H] or [T, H] fp32|bf16|fp16|fp64; vocab_weights: [V, H]; input_ids: [B, T] or [T]
    int (the next-token labels; ``ignore_index`` positions get log-prob 0, which verl's own kernel does not
    offer). Returns log_probs float32 (float64 for float64 input) and entropy in hidden_states.dtype, both
    shaped like input_ids, as verl's FusedLinearForPPO does. Differentiable w.r.t. hidden_states and
    vocab_weights.
    """
    from ra3 import ops

    if not torch.is_tensor(hidden_states) or hidden_states.ndim not in (2, 3):
        raise ValueError(f"hidden_states must be [B, T, H] or [T, H], got "
                         f"{getattr(hidden_states, 'shape', type(hidden_states).__name__)}")
    if not torch.is_tensor(input_ids) or tuple(input_ids.shape) != tuple(hidden_states.shape[:-1]):
        raise ValueError(f"input_ids must have shape {tuple(hidden_states.shape[:-1])} (hidden_states without H), "
                         f"got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    shape = input_ids.shape
    h = hidden_states.reshape(-1, hidden_states.shape[-1])
    t = input_ids.reshape(-1).long()
    with torch.autocast(h.device.type, enabled=False):  # ra3 computes the head in float32 itself
        log_probs = ops.linear_logprobs(h, vocab_weights, t, temperature=float(temperature),
                                        ignore_index=ignore_index, backend=backend)
        entropy = ops.linear_entropy(h, vocab_weights, temperature=float(temperature), backend=backend)
    return log_probs.view(shape), entropy.to(hidden_states.dtype).view(shape)


class RA3FusedLinearForPPO(torch.nn.Module):
    """Drop-in for verl's ``FusedLinearForPPO``: same constructor and forward, computed by ra3.

    ``chunk_size`` and ``impl_backend`` are accepted for compatibility and not used: ra3 picks its own
    vocabulary chunks and kernel backend (``ra3_backend``, default 'auto').
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch", ra3_backend: str = "auto"):
        super().__init__()
        self.chunk_size, self.impl_backend, self.ra3_backend = chunk_size, impl_backend, ra3_backend

    def forward(self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor,
                temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        return fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature, backend=self.ra3_backend)


def patch_verl():
    """Make verl's fused-kernel forward (backend 'torch') use ra3. Returns verl's original class.

    Call once in each verl worker process before the actor's first forward. Raises ImportError when verl
    is not installed.
    """
    from verl.utils.experimental import torch_functional

    original = torch_functional.FusedLinearForPPO
    if original is not RA3FusedLinearForPPO:
        torch_functional.FusedLinearForPPO = RA3FusedLinearForPPO
        torch_functional._ra3_original_FusedLinearForPPO = original
    return getattr(torch_functional, "_ra3_original_FusedLinearForPPO", original)


__all__ = ["fused_linear_for_ppo", "RA3FusedLinearForPPO", "patch_verl", "VERL_TARGET"]

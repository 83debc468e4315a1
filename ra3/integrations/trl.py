"""ra3 inside TRL: GRPO's per-token log-probs and entropies through ``ra3.ops``, no logits.

    from ra3.integrations.trl import RA3GRPOTrainer
    trainer = RA3GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds,
                             processing_class=tokenizer)          # same arguments as trl.GRPOTrainer
    trainer.train()

How it plugs in (TRL >= 1.16): ``GRPOTrainer`` scores completions with
``model(input_ids, attention_mask, labels=labels, fused_lm_head=True)`` and reads ``.log_probs`` and
``.entropy`` ([B, T-1], zero where the label is -100) from the returned ``FusedCausalLMOutput``; TRL installs
that ``fused_lm_head`` mode with ``trl.trainer.utils.add_fused_lm_head``. ``add_ra3_fused_lm_head`` installs the
same mode with the same output contract, computed by ``ra3.ops.linear_logprobs`` / ``linear_entropy`` (and
ra3's soft-capped head for Gemma 2/3); ``RA3GRPOTrainer`` calls it on the policy and the reference model after
TRL's constructor, so every loss type, KL term, entropy mask and entropy bonus of GRPO is unchanged and only
the log-prob kernel differs. Text-only models among ``ra3.integrations.transformers.SUPPORTED_ARCHITECTURES``.

Install: ``pip install "ra3[trl]"`` (trl >= 1.16, which pulls accelerate, datasets, pandas, pyarrow).

The trainer keeps TRL's own loss. A trainer that computes GRPO's loss itself with ``ra3.ops.policy_loss`` (or
``ra3.ops.linear_policy_loss``, fused with the lm_head) gets TRL's ``GRPOConfig`` variants (the same names as
Liger-Kernel's ``LigerFusedLinearGRPOLoss``) from these arguments:

    TRL / Liger                          ra3
    loss_type="grpo"                     aggregation="seq-mean-token-mean"
    loss_type="bnpo"                     aggregation="token-mean"
    loss_type="dr_grpo"                  aggregation="dr-grpo", max_completion_length=<max_completion_length>
    loss_type="dapo"                     aggregation="dapo", num_items_in_batch=<TRL's num_items_in_batch / processes>
    loss_type="cispo"                    surrogate="cispo", aggregation="dapo", clip_low=1,
                                         clip_high=epsilon_high - 1 (TRL's bound is epsilon_high itself)
    importance_sampling_level            importance_sampling_level ("token" | "sequence": GSPO)
    epsilon, epsilon_high                clip_low, clip_high
    beta                                 kl_coef, kl_estimator="k3" (with the reference model's ref_logprobs)
    scale_rewards="group"|"batch"|"none" ops.group_advantages(normalize="std"|"batch-std"|"mean")
    loss_type "sapo" / "luspo" / "vespo", delta (two-sided clip), vllm_is_ratio: no ra3 argument.

(``tests/test_linear_policy_loss.py`` checks the grpo, bnpo, dr_grpo, dapo, cispo and sequence-level rows against
Liger's implementation: loss, gradients, KL statistic.)
"""
from __future__ import annotations

import functools
import inspect
import types

from trl import GRPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from ra3.integrations.transformers import bind_arguments, fused_forward, head_spec

_OUTPUTS = ("log_probs", "entropy")


def add_ra3_fused_lm_head(model, *, temperature: float = 1.0, outputs: tuple[str, ...] = ("log_probs",),
                          backend: str = "auto"):
    """Give ``model`` TRL's ``fused_lm_head=True`` forward mode, computed by ra3. Returns ``model``.

    model: a supported Hugging Face causal LM (not PEFT-wrapped: pass ``get_base_model()``);
    temperature > 0: the logits are divided by it (after the model's own scaling/soft-capping);
    outputs: a subset of ('log_probs', 'entropy'); log_probs (and so the loss) are always computed.
    With ``fused_lm_head=True`` the forward returns ``trl.trainer.utils.FusedCausalLMOutput(loss, log_probs,
    entropy, label_mask)``: log_probs/entropy [B, T-1] float32 for labels[:, 1:] (or [B, T] for pre-shifted
    ``shift_labels``), 0 where the label is -100; loss = -sum(log_probs) / (num_items_in_batch or #labels).
    Without it the previous forward runs unchanged (generation included).
    """
    head_spec(model)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    unknown = set(outputs) - set(_OUTPUTS)
    if unknown:
        raise ValueError(f"outputs must be among {_OUTPUTS}, got {sorted(unknown)}: ra3 does not compute "
                         f"TRL's log_sum_sq_probs / mean_logits / is_top1")
    with_entropy = "entropy" in outputs
    previous = model.forward
    sig = inspect.signature(type(model).forward)
    sig = sig.replace(parameters=list(sig.parameters.values())[1:])

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, fused_lm_head: bool = False, **kwargs):
        if not fused_lm_head:
            return previous(*args, **kwargs)
        named = bind_arguments(sig, args, kwargs)
        named["use_cache"] = False
        out = fused_forward(self, named, backend=backend, token_outputs=True, with_entropy=with_entropy,
                             temperature=float(temperature))
        shifted = named.get("shift_labels") is None  # ra3 aligns with labels; TRL drops the unscored column 0
        cut = (lambda x: x[:, 1:]) if shifted else (lambda x: x)
        return FusedCausalLMOutput(loss=out.loss, log_probs=cut(out.token_logprobs),
                                   entropy=cut(out.entropy) if with_entropy else None, label_mask=cut(out.mask))

    model.forward = types.MethodType(forward, model)
    return model


class RA3GRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose policy and reference log-probs and entropies are computed by ra3.

    Takes every argument of ``GRPOTrainer`` plus ``ra3_backend`` ('auto' | 'torch' | 'cpu' | 'cuda' |
    'triton'). Vision-language models and ``cast_lm_head_to_fp32`` need nothing here: ra3 always computes the
    head in float32 (float64 for float64 models).
    """

    def __init__(self, *args, ra3_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        from accelerate.utils import is_peft_model

        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_ra3_fused_lm_head(policy, temperature=self.temperature, outputs=_OUTPUTS, backend=ra3_backend)
        if self.ref_model is not None:
            add_ra3_fused_lm_head(self.ref_model, temperature=self.temperature, backend=ra3_backend)


__all__ = ["RA3GRPOTrainer", "add_ra3_fused_lm_head"]

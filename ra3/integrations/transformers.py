"""Make a Hugging Face causal LM's loss (and RL log-probs) skip the [B, T, V] logits, as Liger-Kernel does.

    from ra3.integrations.transformers import apply_ra3, token_logprobs
    apply_ra3(model)                                  # or ra3.integrations.transformers.patch(model)
    loss = model(input_ids, labels=labels).loss       # in train mode: no logits, same loss and gradients
    out = token_logprobs(model, input_ids, attention_mask, labels, with_entropy=True)
    out.logprobs, out.entropy, out.mask               # [B, T] each, aligned with labels

The patched forward runs the model's backbone exactly as the original forward does, then hands the final
hidden states and the lm_head weight to ``ra3.ops.linear_logprobs`` (``ra3.integrations.lm_head`` for
soft-capped heads). It reproduces transformers 5.x ``ForCausalLMLoss``: labels are shifted left by one and
padded with ``ignore_index`` (default -100), or ``shift_labels`` are used as given; the loss is the mean NLL
over non-ignored tokens, or their sum divided by ``num_items_in_batch`` when the Trainer passes it. Logit
scaling (Cohere ``logit_scale``, Granite ``logits_scaling``) and Gemma 2/3 ``final_logit_softcapping`` are
applied as the original forwards apply them; tied embeddings need nothing special since ``lm_head.weight`` is
the embedding matrix, so its gradient accumulates both uses.

When the fused path runs: a forward with ``labels`` while ``model.training`` (as Liger's default; in eval mode
the original forward runs so metrics still get logits), or always with ``skip_logits=True``. The fused output
has ``logits=None``.
"""
from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from ra3.integrations.lm_head import head_logprobs

_PATCH_ATTR = "_ra3_original_forward"


@dataclass(frozen=True)
class HeadSpec:
    """How one architecture turns its final hidden states into logits."""
    backbone: str  # attribute holding the decoder stack, whose output's last_hidden_state feeds lm_head
    scale: Callable = lambda config: 1.0  # multiplier on lm_head(h) before soft-capping
    softcap: Callable = lambda config: None  # final_logit_softcapping, None for none


def _gemma_softcap(config):
    return getattr(config, "final_logit_softcapping", None)


# The ForCausalLM classes whose transformers 5.24 forward is "backbone -> slice_logits_to_keep -> lm_head
# -> [scale] -> [soft-cap] -> ForCausalLMLoss": the patched forward reproduces exactly that.
SUPPORTED_ARCHITECTURES: dict[str, HeadSpec] = {
    "LlamaForCausalLM": HeadSpec("model"),
    "MistralForCausalLM": HeadSpec("model"),
    "Qwen2ForCausalLM": HeadSpec("model"),
    "Qwen3ForCausalLM": HeadSpec("model"),
    "GemmaForCausalLM": HeadSpec("model"),
    "Gemma2ForCausalLM": HeadSpec("model", softcap=_gemma_softcap),
    "Gemma3ForCausalLM": HeadSpec("model", softcap=_gemma_softcap),
    "GPT2LMHeadModel": HeadSpec("transformer"),
    "CohereForCausalLM": HeadSpec("model", scale=lambda c: c.logit_scale),
    "GraniteForCausalLM": HeadSpec("model", scale=lambda c: 1.0 / c.logits_scaling),
}


@dataclass
class RA3CausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast with ``logits=None`` plus ra3's per-token outputs, [B, T] aligned with labels."""
    token_logprobs: Optional[Tensor] = None
    entropy: Optional[Tensor] = None
    mask: Optional[Tensor] = None


class TokenLogProbs(NamedTuple):
    logprobs: Tensor  # [B, T] float32: log p(labels[b, t] | tokens < t), 0 where masked (and at t = 0)
    entropy: Optional[Tensor]  # [B, T] float32 entropy of the distribution that predicts labels[b, t], or None
    mask: Tensor  # [B, T] bool: labels[b, t] is scored (not ignore_index, t > 0)


def head_spec(model) -> HeadSpec:
    """The HeadSpec of a supported model instance or class; ValueError listing the supported ones otherwise."""
    cls = model if isinstance(model, type) else type(model)
    for klass in cls.__mro__:  # the MRO also finds the class under FSDP2's dynamic FSDP<Name> subclass
        if klass.__name__ in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[klass.__name__]
    raise ValueError(f"ra3 cannot patch {cls.__name__}: supported architectures are "
                     f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")


def is_patched(model) -> bool:
    """True when ``apply_ra3`` patched this instance or its class."""
    return hasattr(model, _PATCH_ATTR)


def apply_ra3(model, *, backend: str = "auto"):
    """Patch a supported causal LM instance (or class, for every instance) so its loss skips the logits.

    model: an instance or a class among ``SUPPORTED_ARCHITECTURES`` (e.g. LlamaForCausalLM); backend: the
    ``ra3.ops`` backend ('auto' | 'torch' | 'cpu' | 'cuda' | 'triton'). Idempotent; returns ``model``.
    Patch before wrapping with DDP/FSDP, and before PEFT. ``unapply_ra3`` restores the original forward.
    Raises ValueError for an unsupported architecture.
    """
    head_spec(model)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if isinstance(model, type):
        if _PATCH_ATTR in model.__dict__:
            return model
        original = model.forward
        setattr(model, _PATCH_ATTR, original)
        model.forward = _make_forward(original, bound=False, backend=backend)
        return model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a model class, got {type(model).__name__}")
    if _PATCH_ATTR in model.__dict__:
        return model
    original = model.forward  # bound; keeps an instance-level forward another library installed
    model.__dict__[_PATCH_ATTR] = original
    model.forward = types.MethodType(_make_forward(original, bound=True, backend=backend), model)
    return model


patch = apply_ra3  # short alias


def unapply_ra3(model):
    """Undo ``apply_ra3`` on this instance or class; returns ``model``."""
    if isinstance(model, type):
        if _PATCH_ATTR in model.__dict__:
            model.forward = model.__dict__[_PATCH_ATTR]
            delattr(model, _PATCH_ATTR)
        return model
    if _PATCH_ATTR in model.__dict__:
        original = model.__dict__.pop(_PATCH_ATTR)
        if getattr(original, "__self__", None) is model and original.__func__ is type(model).forward:
            del model.__dict__["forward"]  # it was the class's own method: drop the instance override
        else:
            model.forward = original
    return model


def bind_arguments(sig: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """Named arguments of a forward call, positional ones resolved by the original signature, **kwargs flat."""
    bound = sig.bind_partial(*args, **kwargs)
    named = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def _make_forward(original, *, bound: bool, backend: str):
    sig = inspect.signature(original)
    if not bound:  # drop `self` from an unbound function's signature
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])

    # Wrap the plain function, so inspect.signature(model.forward) (which generate() validates kwargs against)
    # shows the original parameters minus self.
    @functools.wraps(original.__func__ if bound else original)
    def forward(self, *args, skip_logits: Optional[bool] = None, ra3_token_logprobs: bool = False,
                ra3_entropy: bool = False, ra3_temperature: float = 1.0, **kwargs):
        named = bind_arguments(sig, args, kwargs)
        fuse_loss = named.get("labels") is not None and (self.training if skip_logits is None else skip_logits)
        if not (fuse_loss or ra3_token_logprobs):
            return original(*args, **kwargs) if bound else original(self, *args, **kwargs)
        return fused_forward(self, named, backend=backend, token_outputs=ra3_token_logprobs,
                              with_entropy=ra3_entropy, temperature=ra3_temperature)

    return forward


def _head_weight(model):
    """lm_head (weight, bias), gathered to full tensors if FSDP2 left them sharded (DTensor)."""
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return weight, bias
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    if isinstance(bias, DTensor):
        bias = bias.full_tensor()
    return weight, bias


def fused_forward(model, named: dict, *, backend: str, token_outputs: bool, with_entropy: bool,
                  temperature: float):
    """The patched forward of a causal LM (shared with the TRL adapter): the backbone on ``named`` (from
    ``bind_arguments``), then the loss or the token log-probs from the head through ``ra3.ops``, logits never
    materialised."""
    spec = head_spec(model)
    labels = named.pop("labels", None)
    logits_to_keep = named.pop("logits_to_keep", 0)
    # As the original forwards: every other argument (num_items_in_batch, shift_labels, ignore_index included)
    # goes to the backbone, and the loss reads its own keys from the same kwargs.
    outputs = getattr(model, spec.backbone)(**named)
    hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    ignore_index = named.get("ignore_index", -100)
    shift_labels = named.get("shift_labels")
    if shift_labels is None:
        if labels is None:
            raise ValueError("labels (or shift_labels) must be given to compute token log-probs")
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"labels must be [B, T] = {tuple(hidden.shape[:-1])} (after logits_to_keep), got "
                             f"{tuple(labels.shape)}")
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    elif shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(f"shift_labels must be [B, T] = {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(shift_labels.shape)}")
    weight, bias = _head_weight(model)
    shift_labels = shift_labels.to(hidden.device)
    mask = shift_labels != ignore_index
    # Only scored positions go through the head: prompts and padding cost no GEMM.
    lp, ent = head_logprobs(hidden[mask], weight, shift_labels[mask], bias=bias,
                            scale=float(spec.scale(model.config)), softcap=spec.softcap(model.config),
                            temperature=temperature, with_entropy=with_entropy, backend=backend)
    num_items = named.get("num_items_in_batch")
    if num_items is None:
        loss = -lp.sum() / mask.sum()  # mean over scored tokens; NaN when none, as F.cross_entropy's mean
    else:
        loss = -lp.sum() / (num_items.to(lp.device) if torch.is_tensor(num_items) else num_items)
    out = dict(loss=loss, logits=None, cache=getattr(outputs, "cache", None),
               hidden_states=getattr(outputs, "hidden_states", None), attentions=getattr(outputs, "attentions", None))
    if token_outputs:
        # Positions shifted back by one, so token_logprobs[b, t] scores labels[b, t] (t = 0 is never scored).
        tok_lp = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
        tok_ent = ent.new_zeros(mask.shape).masked_scatter(mask, ent) if ent is not None else None
        if named.get("shift_labels") is None:
            tok_lp = torch.nn.functional.pad(tok_lp[..., :-1], (1, 0))
            tok_ent = torch.nn.functional.pad(tok_ent[..., :-1], (1, 0)) if tok_ent is not None else None
            mask = torch.nn.functional.pad(mask[..., :-1], (1, 0), value=False)
        out.update(token_logprobs=tok_lp, entropy=tok_ent, mask=mask)
    return RA3CausalLMOutput(**out)


def token_logprobs(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                   labels: Optional[Tensor] = None, *, with_entropy: bool = False, temperature: float = 1.0,
                   ignore_index: int = -100, backend: str = "auto", **model_kwargs) -> TokenLogProbs:
    """Per-token log-probs (and entropy) of ``labels`` under a supported causal LM, without logits.

    input_ids: [B, T] int64; attention_mask: [B, T] 0/1 or None; labels: [B, T] int64 with ``ignore_index``
    where not scored (default: input_ids with padding, attention_mask == 0, ignored). The distribution is
    ``softmax(head_logits / temperature)`` with the model's own scaling and soft-capping. Returns
    ``TokenLogProbs(logprobs [B, T] float32, entropy [B, T] float32 | None, mask [B, T] bool)`` aligned with
    labels: ``logprobs[b, t] = log p(labels[b, t] | input_ids[b, :t])``; column 0 is never scored.
    Differentiable. A model patched by ``apply_ra3`` (also under a DDP/FSDP wrapper, which is then called
    through its own forward so gradient sync happens) or an unpatched supported model both work.
    """
    if not torch.is_tensor(input_ids) or input_ids.ndim != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer [B, T] tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be [B, T] = {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    elif labels.shape != input_ids.shape:
        raise ValueError(f"labels must be [B, T] = {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    head_spec(inner)
    kwargs = dict(model_kwargs, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    if ignore_index != -100:
        kwargs["ignore_index"] = ignore_index
    if is_patched(inner):
        out = model(**kwargs, ra3_token_logprobs=True, ra3_entropy=with_entropy, ra3_temperature=temperature)
    else:
        sig = inspect.signature(type(inner).forward)
        named = bind_arguments(sig.replace(parameters=list(sig.parameters.values())[1:]), (), kwargs)
        out = fused_forward(inner, named, backend=backend, token_outputs=True, with_entropy=with_entropy,
                             temperature=float(temperature))
    return TokenLogProbs(out.token_logprobs, out.entropy, out.mask)


__all__ = ["apply_ra3", "patch", "unapply_ra3", "is_patched", "token_logprobs", "TokenLogProbs",
           "RA3CausalLMOutput", "SUPPORTED_ARCHITECTURES", "HeadSpec", "head_spec"]

"""The pure-PyTorch reference of every op: the spec every backend is tested against, and the ``torch`` backend.

Plain eager PyTorch, differentiable by autograd, no chunking: the linear ops materialise the [N, V] logits.
Arithmetic runs in float32 (float64 when any input is float64), whatever the input dtype. Inputs are assumed
validated by the public wrappers in ``ra3.ops``.
"""
from __future__ import annotations

import torch

from ra3.ops._validate import compute_dtype

KL_ESTIMATORS = ("k1", "k2", "k3")
NORMALIZE_MODES = ("none", "mean", "std", "rloo")
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def linear_logits(hidden, weight, bias=None, temperature: float = 1.0) -> torch.Tensor:
    """[N, H] x [V, H] (+ [V]) -> [N, V] logits / temperature in the compute dtype."""
    dt = compute_dtype(hidden, weight, bias)
    logits = hidden.to(dt) @ weight.to(dt).T
    if bias is not None:
        logits = logits + bias.to(dt)
    return logits / temperature


def logprobs(logits, targets, *, temperature: float = 1.0, ignore_index: int = -100) -> torch.Tensor:
    """[N, V] logits, [N] targets -> [N] log softmax(logits / T)[i, targets[i]], 0 where ignored."""
    dt = compute_dtype(logits)
    logp = torch.log_softmax(logits.to(dt) / temperature, dim=-1)
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets)).long()
    picked = logp.gather(1, safe[:, None])[:, 0] if logits.shape[0] else logp.new_zeros(0)
    return torch.where(keep, picked, torch.zeros_like(picked))


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature: float = 1.0, ignore_index: int = -100):
    return logprobs(linear_logits(hidden, weight, bias), targets, temperature=temperature, ignore_index=ignore_index)


def entropy(logits, *, temperature: float = 1.0) -> torch.Tensor:
    """[N, V] -> [N] entropy of softmax(logits / T) in nats."""
    logp = torch.log_softmax(logits.to(compute_dtype(logits)) / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def linear_entropy(hidden, weight, *, bias=None, temperature: float = 1.0):
    return entropy(linear_logits(hidden, weight, bias), temperature=temperature)


def exact_kl(logits, ref_logits, *, temperature: float = 1.0) -> torch.Tensor:
    """[N, V], [N, V] -> [N] KL(pi || pi_ref) over the whole vocabulary; the reference side gets no gradient."""
    dt = compute_dtype(logits, ref_logits)
    logp = torch.log_softmax(logits.to(dt) / temperature, dim=-1)
    logq = torch.log_softmax(ref_logits.detach().to(dt) / temperature, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def linear_exact_kl(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None, temperature: float = 1.0):
    with torch.no_grad():
        ref_logits = linear_logits(ref_hidden, ref_weight, ref_bias)
    return exact_kl(linear_logits(hidden, weight, bias), ref_logits, temperature=temperature)


def kl(logprobs, ref_logprobs, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimators from sampled-token log-probs (Schulman's k1/k2/k3), elementwise, any shape."""
    dt = compute_dtype(logprobs, ref_logprobs)
    d = logprobs.to(dt) - ref_logprobs.to(dt)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.exp(-d) - 1 + d


def segment_sum(values, segment_ids, num_segments: int) -> torch.Tensor:
    """[N] values, [N] ids -> [num_segments] sums; negative ids belong to no segment, empty segments are 0."""
    dt = compute_dtype(values)
    keep = segment_ids >= 0
    out = torch.zeros(num_segments, dtype=dt, device=values.device)
    return out.index_add(0, segment_ids[keep].long(), values.to(dt)[keep])


def group_advantages(rewards, group_ids, num_groups: int, normalize: str = "std", eps: float = 1e-6):
    """[B] rewards, [B] group ids in [0, num_groups) -> [B] group-relative advantages.

    std: (r - mean) / (unbiased std + eps) (GRPO); mean: r - mean (Dr. GRPO); rloo: r - mean of the others;
    none: r. A group of one sample has std 0 and an rloo advantage of 0.
    """
    dt = compute_dtype(rewards)
    r = rewards.to(dt)
    if normalize == "none":
        return r.clone()
    ids = group_ids.long()
    count = torch.zeros(num_groups, dtype=dt, device=r.device).index_add(0, ids, torch.ones_like(r))
    mean = torch.zeros(num_groups, dtype=dt, device=r.device).index_add(0, ids, r) / count.clamp_min(1)
    centred = r - mean[ids]
    if normalize == "mean":
        return centred
    c = count[ids]
    if normalize == "rloo":
        return torch.where(c > 1, centred * c / (c - 1).clamp_min(1), torch.zeros_like(centred))
    sq = torch.zeros(num_groups, dtype=dt, device=r.device).index_add(0, ids, centred * centred)
    var = torch.where(count > 1, sq / (count - 1).clamp_min(1), torch.zeros_like(sq))
    # sqrt has an infinite slope at 0: where a group's rewards are all equal, the exact gradient of its std term
    # is 0 (every centred reward is 0), so take the sqrt only where var > 0.
    std = torch.where(var > 0, var.clamp_min(torch.finfo(dt).tiny).sqrt(), torch.zeros_like(var))
    return centred / (std[ids] + eps)


def policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.2,
                ref_logprobs=None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                aggregation: str = "token-mean"):
    """PPO-clipped policy-gradient loss with an optional KL penalty to a reference policy.

    logprobs, old_logprobs, mask, ref_logprobs: [B, T]; advantages: [B] (per sequence) or [B, T].
    Returns (loss: scalar, clip_fraction, kl_mean, ratio_mean), the last three as detached statistics
    over the masked tokens.
    """
    dt = compute_dtype(logprobs, old_logprobs, advantages, ref_logprobs)
    lp = logprobs.to(dt)
    m = mask.to(dt)
    adv = advantages.to(dt)
    if adv.dim() == 1:
        adv = adv[:, None]
    ratio = torch.exp(lp - old_logprobs.to(dt))
    unclipped = -ratio * adv
    clipped_term = -torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    is_clipped = clipped_term > unclipped
    per_token = torch.maximum(unclipped, clipped_term)
    if ref_logprobs is not None and kl_coef != 0.0:
        per_token_kl = kl(lp, ref_logprobs.to(dt).detach(), kl_estimator)
        per_token = per_token + kl_coef * per_token_kl
    else:
        per_token_kl = torch.zeros_like(per_token)
    B = lp.shape[0]
    total = m.sum()
    if aggregation == "token-mean":
        loss = (per_token * m).sum() / total if total > 0 else (per_token * m).sum() * 0
    elif aggregation == "seq-mean-token-sum":
        loss = (per_token * m).sum() / B
    else:
        per_seq = m.sum(1)
        loss = ((per_token * m).sum(1) / per_seq.clamp_min(torch.finfo(dt).tiny)).sum() / B
    with torch.no_grad():
        denom = total.clamp_min(1) if total > 0 else total.new_ones(())
        stats = ((is_clipped.to(dt) * m).sum() / denom, (per_token_kl * m).sum() / denom, (ratio * m).sum() / denom)
        if not total > 0:
            stats = tuple(torch.zeros_like(s) for s in stats)
    return (loss, *stats)

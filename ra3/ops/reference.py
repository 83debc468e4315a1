"""The pure-PyTorch reference of every op: the spec every backend is tested against, and the ``torch`` backend.

Plain eager PyTorch, differentiable by autograd, no chunking: the linear ops materialise the [N, V] logits.
Arithmetic runs in float32 (float64 when any input is float64), whatever the input dtype. Inputs are assumed
validated by the public wrappers in ``ra3.ops``.

Edges the native kernels share: a -inf logit (a masked vocabulary entry) has probability 0 and its entropy or
KL term counts as 0, never 0 * -inf = NaN, in the value and in every gradient; a policy-loss token of mask weight 0
(padding) never reaches the loss, the statistics or the gradients, whatever its inputs hold (inf, NaN); empty
inputs (N = 0, B = 0) give zeros that still carry autograd.
"""
from __future__ import annotations

import torch

from ra3.ops._validate import compute_dtype

KL_ESTIMATORS = ("k1", "k2", "k3")
NORMALIZE_MODES = ("none", "mean", "std", "rloo", "batch-std")
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "dr-grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SURROGATES = ("ppo", "cispo")


def linear_logits(hidden, weight, bias=None, temperature: float = 1.0, *, scale: float = 1.0,
                  softcap: float | None = None) -> torch.Tensor:
    """[N, H] x [V, H] (+ [V]) -> [N, V] softcap(scale * (hidden @ weight.T + bias)) / temperature in the compute
    dtype, with softcap(x) = cap * tanh(x / cap) (identity for None)."""
    dt = compute_dtype(hidden, weight, bias)
    logits = hidden.to(dt) @ weight.to(dt).T
    if bias is not None:
        logits = logits + bias.to(dt)
    logits = logits * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def logprobs(logits, targets, *, temperature: float = 1.0, ignore_index: int = -100) -> torch.Tensor:
    """[N, V] logits, [N] targets -> [N] log softmax(logits / T)[i, targets[i]], 0 where ignored."""
    dt = compute_dtype(logits)
    logp = torch.log_softmax(logits.to(dt) / temperature, dim=-1)
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets)).long()
    picked = logp.gather(1, safe[:, None])[:, 0]  # N = 0 included: the empty result keeps its grad_fn
    return torch.where(keep, picked, torch.zeros_like(picked))


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature: float = 1.0, ignore_index: int = -100,
                    scale: float = 1.0, softcap: float | None = None):
    return logprobs(linear_logits(hidden, weight, bias, scale=scale, softcap=softcap), targets,
                    temperature=temperature, ignore_index=ignore_index)


def _live_logp(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, live, logp with 0 where p = 0). Where p = 0 (a -inf logit, or an underflow) a term p * f(logp) is 0;
    selecting the factor, not the product, keeps -inf and NaN out of the backward pass too (0 * -inf there)."""
    p = logp.exp()
    live = p > 0
    return p, live, torch.where(live, logp, torch.zeros_like(logp))


def entropy(logits, *, temperature: float = 1.0) -> torch.Tensor:
    """[N, V] -> [N] entropy of softmax(logits / T) in nats; -inf logits (masked entries) contribute 0."""
    logp = torch.log_softmax(logits.to(compute_dtype(logits)) / temperature, dim=-1)
    p, _live, logp = _live_logp(logp)
    return -(p * logp).sum(-1)


def linear_entropy(hidden, weight, *, bias=None, temperature: float = 1.0, scale: float = 1.0,
                   softcap: float | None = None):
    return entropy(linear_logits(hidden, weight, bias, scale=scale, softcap=softcap), temperature=temperature)


def exact_kl(logits, ref_logits, *, temperature: float = 1.0) -> torch.Tensor:
    """[N, V], [N, V] -> [N] KL(pi || pi_ref) over the whole vocabulary; the reference side gets no gradient.

    Entries where pi is 0 (a -inf logit) contribute 0, whatever pi_ref holds there.
    """
    dt = compute_dtype(logits, ref_logits)
    logp = torch.log_softmax(logits.to(dt) / temperature, dim=-1)
    logq = torch.log_softmax(ref_logits.detach().to(dt) / temperature, dim=-1)
    p, live, logp = _live_logp(logp)
    return (p * (logp - torch.where(live, logq, torch.zeros_like(logq)))).sum(-1)


def linear_exact_kl(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None, temperature: float = 1.0,
                    scale: float = 1.0, softcap: float | None = None):
    with torch.no_grad():
        ref_logits = linear_logits(ref_hidden, ref_weight, ref_bias, scale=scale, softcap=softcap)
    return exact_kl(linear_logits(hidden, weight, bias, scale=scale, softcap=softcap), ref_logits,
                    temperature=temperature)


def linear_cross_entropy(hidden, weight, targets, *, bias=None, temperature: float = 1.0, ignore_index: int = -100,
                         reduction: str = "mean", scale: float = 1.0, softcap: float | None = None):
    """-sum or -mean over the kept tokens of linear_logprobs (0 when none is kept)."""
    lp = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index,
                         scale=scale, softcap=softcap)
    total = -lp.sum()
    return total / max(int((targets != ignore_index).sum()), 1) if reduction == "mean" else total


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
    batch-std: (r - mean) / (unbiased std of all B rewards + eps) (TRL's scale_rewards="batch"); none: r. A group
    of one sample has std 0 and an rloo advantage of 0; so has a batch of one for batch-std.
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
    if normalize == "batch-std":  # one std for the batch: its own mean, not the groups'
        n = r.new_full((1,), r.numel())
        batch = r - r.sum() / n.clamp_min(1)
        return centred / (_unbiased_std((batch * batch).sum()[None], n)[0] + eps)
    sq = torch.zeros(num_groups, dtype=dt, device=r.device).index_add(0, ids, centred * centred)
    return centred / (_unbiased_std(sq, count)[ids] + eps)


def _unbiased_std(sq, count):
    """sqrt(sq / (count - 1)) elementwise from summed squared deviations, 0 where count < 2."""
    var = torch.where(count > 1, sq / (count - 1).clamp_min(1), torch.zeros_like(sq))
    # sqrt has an infinite slope at 0: where a group's rewards are all equal, the exact gradient of its std term
    # is 0 (every centred reward is 0), so take the sqrt only where var > 0.
    return torch.where(var > 0, var.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), torch.zeros_like(var))


def aggregate(values, mask, aggregation: str = "token-mean", max_completion_length: int | None = None,
              num_items_in_batch: float | None = None) -> torch.Tensor:
    """[B, T] per-token values (0 where the mask weight is 0), [B, T] mask weights -> the scalar ``policy_loss``
    aggregates them to (see its docstring for the aggregations)."""
    B, T = values.shape
    m = mask.to(values.dtype)
    weighted = values * m
    norm = {"token-mean": m.sum(), "seq-mean-token-sum": max(B, 1),  # B = 0: the empty sum, 0
            "dr-grpo": B * (T if max_completion_length is None else max_completion_length),
            "dapo": num_items_in_batch}.get(aggregation)
    if norm is not None:
        return weighted.sum() / norm if norm > 0 else weighted.sum() * 0
    per_seq = m.sum(1)
    return (weighted.sum(1) / per_seq.clamp_min(torch.finfo(values.dtype).tiny)).sum() / max(B, 1)


def policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.2,
                ref_logprobs=None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                aggregation: str = "token-mean", importance_sampling_level: str = "token", surrogate: str = "ppo",
                max_completion_length: int | None = None, num_items_in_batch: float | None = None):
    """Clipped policy-gradient loss (PPO or CISPO) with an optional KL penalty to a reference policy.

    logprobs, old_logprobs, mask, ref_logprobs: [B, T]; advantages: [B] (per sequence) or [B, T].
    importance_sampling_level: 'token' r = exp(lp - old); 'sequence' (GSPO-token) r = sg(s) exp(lp - sg(lp)) with
    s = exp(mask-weighted mean of lp - old over the sequence), 1 for a sequence without weight.
    surrogate: 'ppo' max(-r A, -clip(r) A); 'cispo' -sg(clip(r)) A lp, clip(r) = clamp(r, 1 - clip_low,
    1 + clip_high). aggregation of the per-token terms l (mask weights w): 'token-mean' sum w l / sum w;
    'seq-mean-token-sum' sum w l / B; 'seq-mean-token-mean' mean over sequences of sum_t w l / sum_t w;
    'dr-grpo' sum w l / (B * max_completion_length, default T); 'dapo' sum w l / num_items_in_batch (0 for 0).
    Returns (loss: scalar, clip_fraction, kl_mean, ratio_mean), the last three as detached statistics
    over the masked tokens. Only ``loss`` carries a gradient, and only to ``logprobs``: old_logprobs, advantages,
    mask and ref_logprobs are constants. Tokens of mask weight 0 contribute exactly 0 to every result and
    gradient, even where their inputs are inf or NaN (padding): they are replaced by 0 before any arithmetic.
    With B = 0 (or no masked token) the loss is 0.
    """
    dt = compute_dtype(logprobs, old_logprobs, advantages, ref_logprobs)
    m = mask.detach().to(dt)
    live = m != 0

    def alive(t):  # t where the token counts, 0 elsewhere: padding never enters the arithmetic
        return torch.where(live, t, torch.zeros_like(t))

    lp = alive(logprobs.to(dt))
    adv = advantages.detach().to(dt)
    adv = alive(adv[:, None].expand_as(m) if adv.dim() == 1 else adv)
    log_ratio = lp - alive(old_logprobs.detach().to(dt))
    if importance_sampling_level == "sequence":
        with torch.no_grad():
            seq_weight = m.sum(1)
            has_weight = seq_weight != 0
            seq_log_ratio = (m * log_ratio).sum(1) / torch.where(has_weight, seq_weight, torch.ones_like(seq_weight))
            seq_ratio = torch.where(has_weight, seq_log_ratio.exp(), torch.ones_like(seq_log_ratio))
        ratio = seq_ratio[:, None] * torch.exp(lp - lp.detach())
    else:
        ratio = torch.exp(log_ratio)
    clamped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    if surrogate == "cispo":
        is_clipped = (ratio < 1 - clip_low) | (ratio > 1 + clip_high)  # the weight was clipped
        per_token = -clamped.detach() * adv * lp
    else:
        unclipped = -ratio * adv
        clipped_term = -clamped * adv
        is_clipped = clipped_term > unclipped
        per_token = torch.maximum(unclipped, clipped_term)
    if ref_logprobs is not None and kl_coef != 0.0:
        per_token_kl = kl(lp, alive(ref_logprobs.detach().to(dt)), kl_estimator)
        per_token = per_token + kl_coef * per_token_kl
    else:
        per_token_kl = torch.zeros_like(per_token)
    total = m.sum()
    loss = aggregate(per_token, m, aggregation, max_completion_length, num_items_in_batch)
    with torch.no_grad():
        denom = total if total > 0 else total.new_ones(())
        stats = ((is_clipped.to(dt) * m).sum() / denom, (per_token_kl * m).sum() / denom, (ratio * m).sum() / denom)
        if not total > 0:
            stats = tuple(torch.zeros_like(s) for s in stats)
    return (loss, *stats)


def linear_policy_loss(hidden, weight, targets, old_logprobs, advantages, mask, *, bias=None,
                       temperature: float = 1.0, ignore_index: int = -100, scale: float = 1.0,
                       softcap: float | None = None, entropy_coef: float = 0.0, **policy_kw):
    """The policy loss of the lm_head's log-probs with an entropy bonus, from materialised [B * T, V] logits:
    ``policy_loss(linear_logprobs(...), ...)[0] - entropy_coef * aggregate(entropy, mask, aggregation)``, the
    entropy aggregated as the policy term is (``policy_kw``: policy_loss's keywords).

    hidden: [B, T, H] or [B * T, H]; targets, old_logprobs, mask: [B, T]. Returns (loss, clip_fraction, kl_mean,
    ratio_mean, entropy_mean), the last four detached statistics over the masked tokens (entropy_mean: the mask-
    weighted mean of the per-token entropy, 0 without a masked token).
    """
    B, T = targets.shape
    h = hidden.reshape(B * T, hidden.shape[-1])
    logits = linear_logits(h, weight, bias, scale=scale, softcap=softcap)
    lp = logprobs(logits, targets.reshape(-1), temperature=temperature, ignore_index=ignore_index).reshape(B, T)
    loss, *stats = policy_loss(lp, old_logprobs, advantages, mask, **policy_kw)
    ent = entropy(logits, temperature=temperature).reshape(B, T)
    m = mask.detach().to(ent.dtype)
    ent = torch.where(m != 0, ent, torch.zeros_like(ent))  # padding rows never count, whatever they hold
    if entropy_coef != 0.0:
        agg = {k: policy_kw.get(k) for k in ("aggregation", "max_completion_length", "num_items_in_batch")}
        loss = loss - entropy_coef * aggregate(ent, m, **{k: v for k, v in agg.items() if v is not None})
    with torch.no_grad():
        total = m.sum()
        entropy_mean = (ent * m).sum() / total if total > 0 else ent.new_zeros(())
    return (loss, *stats, entropy_mean)

"""E-step: RL over latents. Sample G rollouts per document, reward each line with its expert log-likelihood minus
the latent's cost, take group-relative advantages and a PPO-clipped policy-gradient step on the decision and
comment tokens only (``ops.group_advantages`` + ``ops.policy_loss``). Also: annotate documents with the
current q and measure the ELBO on them.

Under ddp / fsdp each rank updates on its own documents (the loop hands it its share) and the gradients are
averaged over ranks as for one token-mean over all of them; the metrics returned describe every rank's rollouts.
"""
from __future__ import annotations

import time

import torch

from ra3 import distributed as ranks
from ra3 import ops
from ra3.data.sequences import Comment, CommentVocab, Document, build_sequences
from ra3.midtrain.batch import pack
from ra3.midtrain.config import MidtrainConfig
from ra3.midtrain.elbo import elbo, line_rewards, returns
from ra3.midtrain.scoring import PolicyHead, hidden_states, output_head, policy_logprobs, score_rollouts
from ra3.train.update import PER_TOKEN_METRICS, PolicyTokens, UpdateConfig, policy_gradient_update


def advantages(rewards: torch.Tensor, valid: torch.Tensor, boundary: torch.Tensor, mask: torch.Tensor, *,
               group_size: int, advantage: str, normalize: str, discount: float,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token advantages of the policy tokens and the rollouts' returns.

    rewards, valid: [B, A] per-boundary rewards (nats) and which boundaries exist; rollouts b = g * G .. g * G +
    G - 1 are the G rollouts of document g. boundary, mask: [B, P] each policy token's global boundary b * A + t
    and whether the slot holds one (``policy_logprobs``). advantage: 'returns-to-go' (a token of boundary t gets
    the return from line t on, centred against boundary t of the document's other rollouts) or 'return' (the
    whole rollout's return, centred in its group). Returns (advantages [B, P] float32, 0 off the mask; returns
    [B])."""
    ret, rtg = returns(rewards, valid, discount)
    if advantage == "return":
        adv = ops.group_advantages(ret, group_size=group_size, normalize=normalize, backend=backend)
        return adv[:, None] * mask, ret
    B, A = rtg.shape
    groups = (torch.arange(B, device=rtg.device) // group_size)[:, None] * A + torch.arange(A, device=rtg.device)
    _, group_ids = torch.unique(groups[valid], return_inverse=True)
    adv_bt = torch.zeros_like(rtg)
    adv_bt[valid] = ops.group_advantages(rtg[valid], group_ids=group_ids, normalize=normalize, backend=backend)
    return adv_bt.reshape(-1)[boundary.clamp(min=0)] * mask, ret


def informative_rollouts(comments: list[dict[int, Comment]], group_size: int) -> torch.Tensor:
    """[B] bool: False for the rollouts of a document whose G rollouts are all the same (no signal: they are left
    out of the loss and its normaliser)."""
    out = []
    for g in range(0, len(comments), group_size):
        group = comments[g:g + group_size]
        out += [any(c != group[0] for c in group[1:])] * len(group)
    return torch.tensor(out, dtype=torch.bool)


def update_config(cfg: MidtrainConfig) -> UpdateConfig:
    """The E-step's policy-gradient coefficients: the whole batch per optimizer step, a token-mean loss."""
    return UpdateConfig(epochs=cfg.ppo_epochs, clip_low=cfg.clip_low, clip_high=cfg.clip_high, kl_coef=cfg.kl_coef,
                        kl_estimator=cfg.kl_estimator, aggregation="token-mean", grad_clip=cfg.grad_clip,
                        backend=cfg.backend)


def e_step(policy, ref, optimizer, docs: list[Document], generator, head: PolicyHead, vocab: CommentVocab,
           cfg: MidtrainConfig, *, seed: int) -> dict:
    """One E-step update on ``docs`` (G rollouts each; under ddp / fsdp this rank's share of the step's documents).
    Returns the step's metrics (floats), over all ranks' rollouts."""
    t0 = time.perf_counter()
    expanded = [d for d in docs for _ in range(cfg.group_size)]
    kw = {"temperature": cfg.rollout_temperature, "backend": cfg.backend}
    policy.eval()
    # sampling and scoring need the whole weights at once (gathered under fsdp), and no gradients
    with ranks.full_params(policy) as q, ranks.full_params(ref) as q_ref:
        device = output_head(q)[0].device
        generator.sync_weights(q)
        comments = generator.rollout(expanded, seed=ranks.rank_seed(seed))
        t_rollout = time.perf_counter() - t0
        batch = pack(build_sequences(expanded, vocab, comments), vocab.pad_id, device)
        weight, bias = output_head(q)
        h = hidden_states(q, batch)
        scores = score_rollouts(q, batch, head, hidden=h, **kw)
        old_lp, mask, boundary = policy_logprobs(h, weight, bias, batch, head, **kw)
        ref_lp = None
        if cfg.kl_coef > 0:
            ref_w, ref_b = output_head(q_ref)
            ref_lp = policy_logprobs(hidden_states(q_ref, batch), ref_w, ref_b, batch, head, **kw)[0]
    rewards = line_rewards(scores, kl_form=cfg.kl_form, think_cost=cfg.think_cost, alpha=cfg.alpha,
                           comment_vocab_size=head.comment_vocab_size, format_penalty=cfg.format_penalty)
    adv, ret = advantages(rewards, scores.valid, boundary, mask, group_size=cfg.group_size,
                          advantage=cfg.advantage, normalize=cfg.advantage_normalize, discount=cfg.discount,
                          backend=cfg.backend)
    keep = informative_rollouts(comments, cfg.group_size).to(mask.device)
    weights = mask.float() * keep[:, None]

    def logprobs(model, index):  # the current policy's log-probs of the rollouts ``index``' policy tokens
        w, b = output_head(model)
        return policy_logprobs(hidden_states(model, batch), w, b, batch, head, **kw)[0][index]

    stats = policy_gradient_update(policy, optimizer, PolicyTokens(logprobs, old_lp, adv, weights, ref_lp),
                                   update_config(cfg))
    n_policy_tokens = float(weights.sum())
    elapsed = time.perf_counter() - t0
    parts = elbo(scores, think_cost=cfg.think_cost, alpha=cfg.alpha, comment_vocab_size=head.comment_vocab_size)
    n_lines = float(scores.valid.sum())
    n_thinks = float(parts["thinks"].sum())
    n_adv = float(mask.sum())
    metrics = {
        "return_mean": float(ret.mean()), "return_std": float(ret.std()) if len(ret) > 1 else 0.0,
        "advantage_abs_mean": float(adv.abs().sum() / mask.sum().clamp(min=1)),
        "think_rate": n_thinks / max(float(scores.decision_valid.sum()), 1.0),
        "think_q_mean": float((scores.think_logq.exp() * scores.decision_valid).sum()
                              / scores.decision_valid.sum().clamp(min=1)),
        "informative_groups": float(keep.float().mean()),
        "expert_loglik": float(parts["expert_loglik"].mean()), "elbo": float(parts[f"elbo_{cfg.kl_form}"].mean()),
        "thinks_per_100_lines": 100.0 * n_thinks / max(n_lines, 1.0),
        "rationale_len_mean": float(scores.comment_len.sum()) / max(n_thinks, 1.0),
        **stats,
        "tokens": batch.num_tokens, "tokens_per_s": batch.num_tokens / max(elapsed, 1e-9),
        "rollout_s": t_rollout, "time_s": elapsed,
    }
    return _over_ranks(metrics, ret, n_lines=n_lines, n_thinks=n_thinks, n_adv=n_adv, n_tokens=n_policy_tokens)


def _over_ranks(m: dict, ret: torch.Tensor, *, n_lines, n_thinks, n_adv, n_tokens) -> dict:
    """The E-step metrics of every rank's rollouts, each mean weighted by what it averages over (``m`` as it is
    in a single process)."""
    if not ranks.get_info().distributed:
        return m
    n = len(ret)
    weights = {"return_mean": n, "expert_loglik": n, "elbo": n, "advantage_abs_mean": n_adv, "think_rate": n,
               "think_q_mean": n, "informative_groups": n, "thinks_per_100_lines": n_lines,
               "rationale_len_mean": n_thinks, **{k: n_tokens for k in PER_TOKEN_METRICS}}
    g = ranks.reduce_metrics(m, weights=weights, sums=("tokens",), maxes=("rollout_s", "time_s"),
                             stds={"return_std": ret})
    g["tokens_per_s"] = g["tokens"] / max(g["time_s"], 1e-9)
    return g


@torch.no_grad()
def annotate(model, generator, docs: list[Document], head: PolicyHead, vocab: CommentVocab, cfg: MidtrainConfig,
             *, seed: int) -> tuple[list[dict[int, Comment]], dict[str, torch.Tensor], float]:
    """One rollout per document with the current q: (comments per document, ELBO parts per document [N],
    tokens/s of the pass). Under ddp / fsdp each rank annotates its share of ``docs`` and every rank gets all."""
    t0 = time.perf_counter()
    mine = ranks.shard(docs)
    parts: dict[str, list[torch.Tensor]] = {}
    n_tokens = 0
    with ranks.full_params(model) as q:
        device = output_head(q)[0].device
        q.eval()
        generator.sync_weights(q)
        comments = generator.rollout(mine, seed=ranks.rank_seed(seed))
        for start in range(0, len(mine), cfg.eval_batch_size):
            chunk = range(start, min(start + cfg.eval_batch_size, len(mine)))
            batch = pack(build_sequences([mine[i] for i in chunk], vocab, [comments[i] for i in chunk]),
                         vocab.pad_id, device)
            n_tokens += batch.num_tokens
            scores = score_rollouts(q, batch, head, temperature=cfg.rollout_temperature, backend=cfg.backend)
            for k, v in elbo(scores, think_cost=cfg.think_cost, alpha=cfg.alpha,
                             comment_vocab_size=head.comment_vocab_size).items():
                parts.setdefault(k, []).append(v)
            parts.setdefault("num_lines", []).append(scores.valid.sum(1).float())
            parts.setdefault("rationale_tokens", []).append(scores.comment_len.sum(1).float())
            parts.setdefault("code_tokens", []).append(
                torch.bincount(batch.code_rows // (batch.input_ids.shape[1] - 1), minlength=batch.size).float())
            parts.setdefault("decision_points", []).append(batch.decision_valid.sum(1).float())
            parts.setdefault("tokens", []).append(batch.attention_mask.sum(1).float())
    parts = {k: ranks.gather_shards(torch.cat(v)) for k, v in parts.items()}
    speed = ranks.reduce_metrics({"tokens": n_tokens, "s": max(time.perf_counter() - t0, 1e-9)}, sums=("tokens",),
                                maxes=("s",))
    return ranks.gather_shards(comments), parts, speed["tokens"] / speed["s"]

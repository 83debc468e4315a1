"""E-step: RL over latents. Sample G rollouts per document, reward each line with its expert log-likelihood minus
the latent's cost, take group-relative advantages and a PPO-clipped policy-gradient step on the decision and
comment tokens only (``ops.group_advantages`` + ``ops.policy_loss``). Also: annotate documents with the
current q and measure the ELBO on them.
"""
from __future__ import annotations

import time

import torch

from ra3 import ops
from ra3.data.sequences import DecisionTokens, Document, build_sequence
from ra3.midtrain.batch import pack
from ra3.midtrain.config import MidtrainConfig
from ra3.midtrain.elbo import elbo, line_rewards, returns
from ra3.midtrain.scoring import HeadRows, hidden_states, output_head, policy_logprobs, score_rollouts


def _advantages(cfg: MidtrainConfig, rewards, valid, boundary, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token advantages [B, P] or per-rollout [B], the rollouts' returns [B])."""
    ret, rtg = returns(rewards, valid, cfg.discount)
    G = cfg.group_size
    if cfg.advantage == "return":
        return ops.group_advantages(ret, group_size=G, normalize=cfg.advantage_normalize,
                                    backend=cfg.ops_backend), ret
    # returns-to-go: each boundary t is compared with the same boundary of the other rollouts of its document
    B, A = rtg.shape
    groups = (torch.arange(B, device=rtg.device) // G)[:, None] * A + torch.arange(A, device=rtg.device)
    _, group_ids = torch.unique(groups[valid], return_inverse=True)
    adv_bt = torch.zeros_like(rtg)
    adv_bt[valid] = ops.group_advantages(rtg[valid], group_ids=group_ids, normalize=cfg.advantage_normalize,
                                         backend=cfg.ops_backend)
    return adv_bt.reshape(-1)[boundary.clamp(min=0)] * mask, ret


def e_step(policy, ref, optimizer, docs: list[Document], generator, head: HeadRows, tokens: DecisionTokens,
           cfg: MidtrainConfig, *, seed: int) -> dict:
    """One E-step update on ``docs`` (G rollouts each). Returns the step's metrics (floats)."""
    t0 = time.perf_counter()
    device = output_head(policy)[0].device
    expanded = [d for d in docs for _ in range(cfg.group_size)]
    policy.eval()
    generator.sync_weights(policy)
    comments = generator.rollout(expanded, seed=seed)
    t_rollout = time.perf_counter() - t0
    batch = pack([build_sequence(d, tokens, c) for d, c in zip(expanded, comments)], tokens.pad_id,
                 cfg.max_rationale_tokens, device)
    kw = {"temperature": cfg.rollout_temperature, "backend": cfg.ops_backend}
    weight, bias = output_head(policy)
    with torch.no_grad():
        h = hidden_states(policy, batch)
        scores = score_rollouts(policy, batch, head, hidden=h, **kw)
        old_lp, mask, boundary = policy_logprobs(h, weight, bias, batch, head, **kw)
        ref_lp = None
        if cfg.kl_coef > 0:
            ref_w, ref_b = output_head(ref)
            ref_lp = policy_logprobs(hidden_states(ref, batch), ref_w, ref_b, batch, head, **kw)[0]
    rewards = line_rewards(scores, kl_form=cfg.kl_form, think_cost=cfg.think_cost, alpha=cfg.alpha,
                           comment_vocab_size=head.comment_vocab_size, format_penalty=cfg.format_penalty)
    adv, ret = _advantages(cfg, rewards, scores.valid, boundary, mask)
    policy.train()
    stats = []
    for _ in range(cfg.ppo_epochs):
        lp, _, _ = policy_logprobs(hidden_states(policy, batch), weight, bias, batch, head, **kw)
        out = ops.policy_loss(lp, old_lp, adv, mask.float(), clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                              ref_logprobs=ref_lp, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
                              aggregation="token-mean", backend=cfg.ops_backend)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        stats.append(tuple(float(x.detach()) for x in (out.loss, out.clip_fraction, out.kl_mean, out.ratio_mean,
                                                           grad_norm)))
    policy.eval()
    elapsed = time.perf_counter() - t0
    parts = elbo(scores, think_cost=cfg.think_cost, alpha=cfg.alpha, comment_vocab_size=head.comment_vocab_size)
    n_lines = float(scores.valid.sum())
    n_thinks = float(parts["thinks"].sum())
    loss, clip, kl, ratio, gnorm = (sum(s[i] for s in stats) / len(stats) for i in range(5))
    return {
        "return_mean": float(ret.mean()), "return_std": float(ret.std()) if len(ret) > 1 else 0.0,
        "advantage_abs_mean": float(adv.abs().sum() / (mask.sum() if adv.dim() == 2 else len(adv))),
        "expert_loglik": float(parts["expert_loglik"].mean()), "elbo": float(parts[f"elbo_{cfg.kl_form}"].mean()),
        "thinks_per_100_lines": 100.0 * n_thinks / max(n_lines, 1.0),
        "rationale_len_mean": float(scores.comment_len.sum()) / max(n_thinks, 1.0),
        "policy_loss": loss, "clip_fraction": clip, "ref_kl": kl, "ratio_mean": ratio, "grad_norm": gnorm,
        "tokens": batch.num_tokens, "tokens_per_s": batch.num_tokens / max(elapsed, 1e-9),
        "rollout_s": t_rollout, "time_s": elapsed,
    }


@torch.no_grad()
def annotate(model, generator, docs: list[Document], head: HeadRows, tokens: DecisionTokens, cfg: MidtrainConfig,
             *, seed: int) -> tuple[list[dict[int, list[int]]], dict[str, torch.Tensor], float]:
    """One rollout per document with the current q: (comments per document, ELBO parts per document [N],
    tokens/s of the pass)."""
    t0 = time.perf_counter()
    device = output_head(model)[0].device
    model.eval()
    generator.sync_weights(model)
    comments = generator.rollout(docs, seed=seed)
    parts: dict[str, list[torch.Tensor]] = {}
    n_tokens = 0
    for start in range(0, len(docs), cfg.eval_batch_size):
        chunk = range(start, min(start + cfg.eval_batch_size, len(docs)))
        batch = pack([build_sequence(docs[i], tokens, comments[i]) for i in chunk], tokens.pad_id,
                     cfg.max_rationale_tokens, device)
        n_tokens += batch.num_tokens
        scores = score_rollouts(model, batch, head, temperature=cfg.rollout_temperature, backend=cfg.ops_backend)
        for k, v in elbo(scores, think_cost=cfg.think_cost, alpha=cfg.alpha,
                         comment_vocab_size=head.comment_vocab_size).items():
            parts.setdefault(k, []).append(v)
        parts.setdefault("num_lines", []).append(scores.valid.sum(1).float())
        parts.setdefault("rationale_tokens", []).append(scores.comment_len.sum(1).float())
        parts.setdefault("code_tokens", []).append(torch.tensor([float(docs[i].num_code_tokens) for i in chunk]))
    return comments, {k: torch.cat(v) for k, v in parts.items()}, n_tokens / max(time.perf_counter() - t0, 1e-9)

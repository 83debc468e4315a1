"""The RA3 evidence lower bound and the E-step's per-line rewards, from a rollout's per-boundary scores.

Latent-variable model (paper; our prior over comment text): at each decision point t (a line that may carry a
comment) the latent keeps the previous one (act) with prior probability alpha, or is a new rationale (think)
with probability 1 - alpha whose comment is drawn uniformly, token by token, from the comment vocabulary C (every
token but the special and added ones; a newline forced at ``max_rationale_tokens`` costs nothing). Elsewhere the
latent is kept for certain (no decision, no KL term). With q the policy's own decisions and comments:

    log p(code) >= E_q[ sum_t log pi(a_t | s_t, z_<=t) - KL(q(z_t | .) || p(z_t | z_t-1)) ]

exact form, per rollout (the expectation of the per-sample log-ratio, with the analytic parts in closed form):
    sum_t line_t - sum_t KL_Bernoulli(q_t(think) || 1 - alpha)
                 - sum_{t think} ( -sum_k H(q(. | comment_<k)) + n_sampled_t * log|C| )
fixed-cost form (paper's default): sum_t line_t - c * #thinks.
"""
from __future__ import annotations

import math

import torch

from ra3.midtrain.scoring import RolloutScores


def bernoulli_kl(log_q_think: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL(Bernoulli(q_think) || Bernoulli(1 - alpha)) elementwise, from log q_think. Returns float32 like input."""
    q = log_q_think.exp()
    log_q_act = torch.log1p(-q.clamp(max=1 - 1e-7))
    return q * (log_q_think - math.log(1 - alpha)) + (1 - q) * (log_q_act - math.log(alpha))


def elbo(scores: RolloutScores, *, think_cost: float, alpha: float, comment_vocab_size: int) -> dict:
    """ELBO parts per rollout, each [B] float32 (nats; sums over the document's boundaries).

    expert_loglik, thinks, cost_paid (c * thinks), elbo_fixed, kl_decision, kl_comment, elbo_exact.
    """
    dt = scores.line_logprobs.dtype
    valid = scores.valid.to(dt)
    thinks = (scores.thinks & scores.valid).to(dt)
    expert = (scores.line_logprobs * valid).sum(1)
    decisions = (scores.decision_valid & scores.valid).to(dt)
    kl_decision = (bernoulli_kl(scores.think_logq, alpha) * decisions).sum(1)
    kl_comment = ((scores.comment_sampled * math.log(comment_vocab_size) - scores.comment_entropy) * thinks).sum(1)
    n_thinks = thinks.sum(1)
    return {"expert_loglik": expert, "thinks": n_thinks, "cost_paid": think_cost * n_thinks,
            "elbo_fixed": expert - think_cost * n_thinks, "kl_decision": kl_decision, "kl_comment": kl_comment,
            "elbo_exact": expert - kl_decision - kl_comment}


def line_rewards(scores: RolloutScores, *, kl_form: str, think_cost: float, alpha: float, comment_vocab_size: int,
                 format_penalty: float = 0.0) -> torch.Tensor:
    """r_t per boundary [B, A] float32 (0 past a document's end), the E-step's reward.

    fixed: r_t = log pi(a_t | .) - c [think_t]. exact: r_t = log pi(a_t | .) - log q(z_t)/p(z_t), the per-sample
    KL (its expectation is the exact KL; as a REINFORCE reward it gives the bound's gradient).
    format_penalty is subtracted per think whose comment is empty or was cut at ``max_rationale_tokens``.
    """
    dt = scores.line_logprobs.dtype
    thinks = (scores.thinks & scores.valid).to(dt)
    r = scores.line_logprobs.clone()
    if kl_form == "fixed":
        r = r - think_cost * thinks
    elif kl_form == "exact":
        log_prior = torch.where(scores.thinks, math.log(1 - alpha) - scores.comment_sampled
                                * math.log(comment_vocab_size), torch.full_like(r, math.log(alpha)))
        log_q = scores.decision_logq + thinks * scores.comment_logq
        r = r - (log_q - log_prior) * (scores.decision_valid & scores.valid).to(dt)
    else:
        raise ValueError(f"kl_form must be 'fixed' or 'exact', got {kl_form!r}")
    if format_penalty:
        malformed = thinks.bool() & (scores.empty | scores.truncated)
        r = r - format_penalty * malformed.to(dt)
    return r * scores.valid.to(dt)


def returns(rewards: torch.Tensor, valid: torch.Tensor, discount: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(return [B] = sum_t gamma^t r_t, returns-to-go [B, A] = sum_{t' >= t} gamma^(t'-t) r_t'), float32."""
    B, A = rewards.shape
    rtg = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in range(A - 1, -1, -1):
        # a boundary past the document's end contributes nothing, whatever its reward slot holds
        running = (rewards[:, t] + discount * running) * valid[:, t].to(rewards.dtype)
        rtg[:, t] = running
    return rtg[:, 0], rtg

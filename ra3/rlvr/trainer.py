"""GRPO post-training with unit-test rewards, one readable loop (``train``) over named steps.

Per step: sample ``prompts_per_step`` tasks -> ``rollout`` G completions each (Hugging Face generate on the
policy) -> ``UnitTestReward`` in the sandbox -> ``ops.group_advantages`` within each group -> per-token
log-probs of the sampled tokens from the final hidden states and the lm_head with ``ops.linear_logprobs`` (the
[tokens x vocab] logits are never built) -> ``ops.policy_loss`` (PPO clip + KL to the frozen initial model) ->
AdamW. Metrics go to ``OUT/metrics.jsonl`` (and TensorBoard when installed); checkpoints to
``OUT/checkpoints/step-N`` (a ``save_pretrained`` directory ``ra3 eval --model`` can load, plus the optimizer
state), from which ``resume`` continues.
"""
from __future__ import annotations

import copy
import json
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ra3 import ops
from ra3.eval.benchmarks import Task, load_tasks
from ra3.eval.evaluate import generate_samples
from ra3.eval.sandbox import Sandbox, SandboxConfig
from ra3.rlvr.config import RLVRConfig
from ra3.rlvr.rewards import UnitTestReward
from ra3.rlvr.toy import toy_tasks


# ---- data ---------------------------------------------------------------------------------------------------
def load_rl_tasks(cfg: RLVRConfig) -> list[Task]:
    if cfg.tasks == "toy":
        return toy_tasks(cfg.num_toy_tasks, seed=cfg.seed)
    return load_tasks(cfg.tasks, cfg.data, split=cfg.split)


def tasks_for_step(tasks: list[Task], cfg: RLVRConfig, step: int) -> list[Task]:
    """The prompts of ``step``: epochs over a seeded shuffle, so a resumed run sees the same sequence."""
    per_epoch = max(1, len(tasks) // cfg.prompts_per_step)
    epoch, offset = divmod(step, per_epoch)
    order = list(range(len(tasks)))
    random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
    start = offset * cfg.prompts_per_step
    picked = [order[(start + i) % len(order)] for i in range(cfg.prompts_per_step)]
    return [tasks[i] for i in picked]


@dataclass
class Batch:
    """Prompt + response token sequences, right-padded.

    input_ids, attention_mask: [B, L]; positions: [B, R] index of the hidden state that predicts each response
    token (its position - 1); targets: [B, R] response tokens; mask: [B, R] bool, True on real response tokens.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def select(self, index: torch.Tensor) -> "Batch":
        return Batch(*(t[index] for t in (self.input_ids, self.attention_mask, self.positions, self.targets,
                                          self.mask)))


def build_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, device) -> Batch:
    B = len(prompt_ids)
    L = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    R = max(1, max(len(r) for r in response_ids))
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    positions = torch.zeros((B, R), dtype=torch.long)
    targets = torch.zeros((B, R), dtype=torch.long)
    mask = torch.zeros((B, R), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        seq = p + r
        input_ids[b, :len(seq)] = torch.tensor(seq)
        attention_mask[b, :len(seq)] = 1
        if r:
            positions[b, :len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
            targets[b, :len(r)] = torch.tensor(r)
            mask[b, :len(r)] = True
    return Batch(*(t.to(device) for t in (input_ids, attention_mask, positions, targets, mask)))


# ---- the model's per-token log-probs ------------------------------------------------------------------------
def response_logprobs(model, batch: Batch, *, temperature: float, backend: str = "auto",
                      with_entropy: bool = False):
    """Log-probs [B, R] float32 of the response tokens (0 where masked) at sampling ``temperature``; and the
    mean entropy of the policy over response tokens when ``with_entropy``.

    Final hidden states of the base model go through the fused ``ops.linear_logprobs`` with the lm_head weight:
    only [B, L, H] activations, never [B, L, V] logits. Models that post-process logits (soft-capping, a
    logit scale) are not covered by this path.
    """
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    H = hidden.shape[-1]
    picked = hidden.gather(1, batch.positions.unsqueeze(-1).expand(-1, -1, H))[batch.mask]  # [M, H]
    head = model.get_output_embeddings()
    token_lp = ops.linear_logprobs(picked, head.weight, batch.targets[batch.mask], bias=head.bias,
                                   temperature=temperature, backend=backend)
    logprobs = torch.zeros(batch.mask.shape, dtype=token_lp.dtype, device=token_lp.device)
    logprobs[batch.mask] = token_lp
    if not with_entropy:
        return logprobs
    with torch.no_grad():
        entropy = ops.linear_entropy(picked.detach(), head.weight.detach(), bias=None if head.bias is None else
                                     head.bias.detach(), temperature=temperature, backend=backend)
    return logprobs, entropy.mean().item() if entropy.numel() else 0.0


# ---- logging and checkpoints --------------------------------------------------------------------------------
class MetricsLogger:
    """One JSON object per step in ``OUT/metrics.jsonl``; TensorBoard scalars too when it is installed."""

    def __init__(self, out: Path, start_step: int):
        self.path = out / "metrics.jsonl"
        if self.path.exists():  # resuming after `start_step` completed steps: drop rows of steps redone
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def log(self, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, metrics["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def latest_checkpoint(out: Path) -> Path | None:
    steps = [(int(m.group(1)), p) for p in (out / "checkpoints").glob("step-*")
             if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / "trainer_state.pt").exists()]
    return max(steps)[1] if steps else None


def save_checkpoint(out: Path, step: int, model, tokenizer, optimizer, cfg: RLVRConfig) -> Path:
    """``OUT/checkpoints/step-{step}``: the model (save_pretrained) + optimizer; keeps the newest few."""
    root = out / "checkpoints"
    path = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": cfg.to_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # a checkpoint is either complete or absent
    done = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if p.name.split("-")[1].isdigit())
    for _, old in done[:-cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return path


# ---- the loop -----------------------------------------------------------------------------------------------
def rollout(generator, tasks: list[Task], cfg: RLVRConfig, step: int) -> list[dict]:
    """G samples per task (task-major), with their token ids and post-processed completions."""
    return generate_samples(tasks, generator, n=cfg.group_size, temperature=cfg.temperature, top_p=1.0,
                            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 1_000_003 + step, chat=cfg.chat,
                            progress=False, keep_token_ids=True)


def train(cfg: RLVRConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Run GRPO for ``cfg.steps`` steps (continuing from the latest checkpoint when ``resume``).

    Returns the metrics of the last step run ({} when resuming a finished run).
    """
    from tqdm.auto import tqdm

    from ra3.eval.evaluate import task_prompt
    from ra3.generation import HFGenerator
    from ra3.models import load_model

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    tasks = load_rl_tasks(cfg)

    checkpoint = latest_checkpoint(out) if resume else None
    model, tokenizer = load_model(str(checkpoint) if checkpoint else cfg.model, dtype=cfg.dtype, device=device,
                                  seed=cfg.seed)
    reference = None
    if cfg.kl_coef > 0:  # the frozen initial policy
        reference = (load_model(cfg.model, dtype=cfg.dtype, device=device, seed=cfg.seed)[0] if checkpoint
                     else copy.deepcopy(model))
        reference.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_step = 0
    if checkpoint:
        state = torch.load(checkpoint / "trainer_state.pt", map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        start_step = state["step"]
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    generator = HFGenerator(model, tokenizer, batch_size=cfg.generation_batch_size)
    reward_fn = UnitTestReward(Sandbox(SandboxConfig(timeout=cfg.timeout)), partial_credit=cfg.partial_credit,
                               workers=cfg.workers)
    logger = MetricsLogger(out, start_step)
    G = cfg.group_size
    metrics: dict = {}
    try:
        for step in tqdm(range(start_step, cfg.steps), desc="rlvr", initial=start_step, total=cfg.steps,
                         disable=not progress, dynamic_ncols=True):
            t0 = time.perf_counter()
            # 1. rollout: G completions per prompt from the current policy
            step_tasks = tasks_for_step(tasks, cfg, step)
            samples = rollout(generator, step_tasks, cfg, step)
            t_gen = time.perf_counter() - t0
            # 2. verifiable reward: the unit tests, in the sandbox
            sample_tasks = [t for t in step_tasks for _ in range(G)]
            rewards, results = reward_fn(sample_tasks, [s["completion"] for s in samples])
            t_reward = time.perf_counter() - t0 - t_gen
            rewards_t = torch.tensor(rewards, dtype=torch.float32, device=device)
            # 3. group-relative advantages
            advantages = ops.group_advantages(rewards_t, group_size=G, normalize=cfg.advantage,
                                              backend=cfg.backend)
            # 4. old (behaviour) and reference log-probs of the sampled tokens
            prompt_ids = [tokenizer(task_prompt(t, generator, cfg.chat))["input_ids"] for t in sample_tasks]
            batch = build_batch(prompt_ids, [s["token_ids"] for s in samples], tokenizer.pad_token_id, device)
            model.eval()
            with torch.no_grad():
                old_logprobs, entropy = response_logprobs(model, batch, temperature=cfg.temperature,
                                                          backend=cfg.backend, with_entropy=True)
                ref_logprobs = (response_logprobs(reference, batch, temperature=cfg.temperature,
                                                  backend=cfg.backend) if reference is not None else None)
            # 5. PPO-clipped policy loss + KL, AdamW
            model.train()
            B = len(samples)
            mb = cfg.minibatch_size or B
            stats = {"loss": [], "clip_fraction": [], "kl": [], "ratio": [], "grad_norm": []}
            for _ in range(cfg.ppo_epochs):
                # one minibatch: keep the order, so a resumed run repeats an uninterrupted one exactly
                order = torch.randperm(B, device=device) if mb < B else torch.arange(B, device=device)
                for start in range(0, B, mb):
                    idx = order[start:start + mb]
                    logprobs = response_logprobs(model, batch.select(idx), temperature=cfg.temperature,
                                                 backend=cfg.backend)
                    result = ops.policy_loss(logprobs, old_logprobs[idx], advantages[idx], batch.mask[idx],
                                             clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                             ref_logprobs=None if ref_logprobs is None else ref_logprobs[idx],
                                             kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
                                             aggregation=cfg.aggregation, backend=cfg.backend)
                    optimizer.zero_grad(set_to_none=True)
                    result.loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    for key, value in (("loss", result.loss), ("clip_fraction", result.clip_fraction),
                                       ("kl", result.kl_mean), ("ratio", result.ratio_mean),
                                       ("grad_norm", grad_norm)):
                        stats[key].append(float(value.detach()) if torch.is_tensor(value) else float(value))
            model.eval()
            # 6. metrics, checkpoint
            seconds = time.perf_counter() - t0
            n_gen_tokens = sum(len(s["token_ids"]) for s in samples)
            metrics = {
                "step": step + 1,
                "reward_mean": sum(rewards) / len(rewards),
                "reward_std": float(torch.tensor(rewards).std()) if len(rewards) > 1 else 0.0,
                "pass_rate": sum(r.passed for r in results) / len(results),
                "kl": _mean(stats["kl"]),
                "entropy": entropy,
                "response_length": n_gen_tokens / len(samples),
                "clip_fraction": _mean(stats["clip_fraction"]),
                "ratio_mean": _mean(stats["ratio"]),
                "loss": _mean(stats["loss"]),
                "grad_norm": _mean(stats["grad_norm"]),
                "tokens_per_s": n_gen_tokens / max(seconds, 1e-9),  # sampled tokens per second of the step
                "generation_tokens_per_s": n_gen_tokens / max(t_gen, 1e-9),
                "seconds_generation": t_gen,
                "seconds_reward": t_reward,
                "seconds_step": seconds,
                "lr": cfg.lr,
            }
            logger.log(metrics)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                save_checkpoint(out, step + 1, model, tokenizer, optimizer, cfg)
    finally:
        logger.close()
    return metrics


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0

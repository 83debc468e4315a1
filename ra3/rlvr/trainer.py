"""GRPO post-training with unit-test rewards, one readable loop (``train``) over named steps.

Per step: sample ``prompts_per_step`` tasks -> ``rollout`` G completions each (Hugging Face generate on the
policy) -> ``UnitTestReward`` in the sandbox -> ``ops.group_advantages`` within each group -> per-token
log-probs of the sampled tokens from the final hidden states and the lm_head with ``ops.linear_logprobs`` (the
[tokens x vocab] logits are never built) -> ``policy_gradient_update`` (``ra3.train.update``, the update RA3's
E-step takes too: ``ops.policy_loss``, PPO clip + KL to the frozen initial model, minibatches) -> AdamW. The run
directory is ``ra3.train.run``'s: ``OUT/config.yaml``, ``OUT/metrics.jsonl`` (one record per step, and
TensorBoard when installed), checkpoints in ``OUT/checkpoints/step-N`` (a ``save_pretrained`` directory
``ra3 eval --model`` can load, plus ``save_checkpoint``'s optimizer, RNG and position), from which rerunning the
same command continues.

Distributed (``distributed: ddp | fsdp`` under torchrun): each rank samples, scores and trains on its share of
the step's prompt groups; gradients are averaged over ranks (DDP / FSDP2) as for one loss over the whole batch,
the metrics describe the whole batch, rank 0 alone writes files. Checkpoints then hold the sharded
``step-N/sharded`` (``ra3.distributed.save_checkpoint``: weights, optimizer, step, RNG) beside the
``save_pretrained`` model, and resume under ddp or fsdp with any number of processes.
"""
from __future__ import annotations

import copy
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ra3 import distributed as ranks
from ra3 import ops
from ra3.eval.benchmarks import Task, load_tasks
from ra3.eval.evaluate import generate_samples
from ra3.eval.sandbox import Sandbox, SandboxConfig
from ra3.rlvr.config import RLVRConfig
from ra3.rlvr.rewards import UnitTestReward
from ra3.rlvr.toy import toy_tasks
from ra3.train.run import (MetricsWriter, check_resumable, checkpoint_path, load_checkpoint, read_checkpoint,
                           save_checkpoint, write_config)
from ra3.train.update import PER_TOKEN_METRICS, HeadInputs, PolicyTokens, UpdateConfig, policy_gradient_update


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
def response_head(model, batch: Batch, *, temperature: float) -> HeadInputs:
    """The lm_head's inputs for the response tokens: hidden [B, R, H] final hidden states of the base model that
    predict targets [B, R] (-100 on padding), the head's weight and bias."""
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    picked = hidden.gather(1, batch.positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    head = model.get_output_embeddings()
    targets = torch.where(batch.mask, batch.targets, torch.full_like(batch.targets, -100))
    return HeadInputs(picked, head.weight, head.bias, targets, temperature)


def response_logprobs(model, batch: Batch, *, temperature: float, backend: str = "auto",
                      with_entropy: bool = False):
    """Log-probs [B, R] float32 of the response tokens (0 where masked) at sampling ``temperature``; and the
    mean entropy of the policy over response tokens when ``with_entropy``.

    Final hidden states of the base model go through the fused ``ops.linear_logprobs`` with the lm_head weight:
    only [B, L, H] activations, never [B, L, V] logits. Models that post-process logits (soft-capping, a
    logit scale) are not covered by this path.
    """
    h = response_head(model, batch, temperature=temperature)
    picked = h.hidden[batch.mask]  # [M, H]
    token_lp = ops.linear_logprobs(picked, h.weight, h.targets[batch.mask], bias=h.bias, temperature=temperature,
                                   backend=backend)
    logprobs = torch.zeros(batch.mask.shape, dtype=token_lp.dtype, device=token_lp.device)
    logprobs[batch.mask] = token_lp
    if not with_entropy:
        return logprobs
    with torch.no_grad():
        entropy = ops.linear_entropy(picked.detach(), h.weight.detach(), bias=None if h.bias is None else
                                     h.bias.detach(), temperature=temperature, backend=backend)
    return logprobs, entropy.mean().item() if entropy.numel() else 0.0


# ---- checkpoints ------------------------------------------------------------------------------------------
def latest_checkpoint(out) -> Path | None:
    """The newest complete ``OUT/checkpoints/step-N`` (one that holds a checkpoint), or None."""
    steps = sorted((int(m.group(1)), p) for p in (Path(out) / "checkpoints").glob("step-*")
                   if (m := re.fullmatch(r"step-(\d+)", p.name)) and checkpoint_path(p) is not None)
    return steps[-1][1] if steps else None


def save_step(out: Path, step: int, model, tokenizer, optimizer, cfg: RLVRConfig, metrics_lines: int) -> Path:
    """``OUT/checkpoints/step-{step}``: the model as a ``save_pretrained`` directory (``ra3 eval --model`` loads
    it) and ``save_checkpoint``'s state (optimizer, step, config, RNG; under ddp / fsdp the sharded weights
    too); complete or absent. Keeps the newest ``keep_checkpoints``."""
    root = out / "checkpoints"
    path, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    if ranks.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    ranks.save_pretrained(model, tmp, tokenizer)
    save_checkpoint(tmp, {"model": model if ranks.sharded() else None, "optimizer": optimizer, "step": step,
                          "config": cfg.to_dict(), "metrics_lines": metrics_lines,
                          "torch_rng": ranks.gather_objects(torch.get_rng_state())})
    if ranks.is_main():
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        done = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if p.name.split("-")[1].isdigit())
        for _, old in done[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    ranks.barrier()
    return path


def resume_state(checkpoint: Path, model, optimizer) -> dict:
    """Load ``checkpoint`` (``latest_checkpoint``) into the optimizer (and under ddp / fsdp the weights, which a
    single process loads with the model) and restore this rank's RNG state; returns its picklable entries."""
    saved = load_checkpoint(checkpoint, {"model": model if ranks.sharded() else None, "optimizer": optimizer})
    info, rng = ranks.get_info(), saved["torch_rng"]
    torch.set_rng_state(rng[info.rank] if len(rng) == info.world_size else rng[0])  # another world size: rank 0's
    return saved


# ---- the loop -----------------------------------------------------------------------------------------------
def rollout(generator, tasks: list[Task], cfg: RLVRConfig, step: int) -> list[dict]:
    """G samples per task (task-major), with their token ids and post-processed completions."""
    return generate_samples(tasks, generator, n=cfg.group_size, temperature=cfg.temperature, top_p=1.0,
                            max_new_tokens=cfg.max_new_tokens, seed=ranks.rank_seed(cfg.seed * 1_000_003 + step),
                            chat=cfg.chat, progress=False, keep_token_ids=True)


def update_config(cfg: RLVRConfig, world_size: int) -> UpdateConfig:
    """GRPO's policy-gradient coefficients (``minibatch_size`` counts the sequences of all ranks)."""
    return UpdateConfig(epochs=cfg.ppo_epochs, minibatch_size=cfg.minibatch_size // world_size,
                        clip_low=cfg.clip_low, clip_high=cfg.clip_high, kl_coef=cfg.kl_coef,
                        kl_estimator=cfg.kl_estimator, aggregation=cfg.aggregation,
                        max_completion_length=cfg.max_new_tokens, grad_clip=cfg.max_grad_norm, backend=cfg.backend)


def train(cfg: RLVRConfig, *, resume: bool | None = None, progress: bool | None = None) -> dict:
    """Run GRPO for ``cfg.steps`` steps, continuing from the latest checkpoint in ``cfg.out`` unless
    ``cfg.resume`` is false (``resume`` / ``progress``, when given, override the config's).

    Returns the metrics of the last step run ({} when resuming a finished run). With ``distributed`` ddp / fsdp,
    every process torchrun started calls it (it joins their process group).
    """
    cfg = cfg.replace(**{k: v for k, v in (("resume", resume), ("progress", progress)) if v is not None})
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with ranks.session(cfg.distributed, backend="gloo" if device == "cpu" else None):
        return _train(cfg)


def _train(cfg: RLVRConfig) -> dict:
    from tqdm.auto import tqdm

    from ra3.eval.evaluate import task_prompt
    from ra3.generation import HFGenerator
    from ra3.models import load_model

    out = Path(cfg.out)
    info = ranks.get_info()
    device = str(info.device) if info.distributed else cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    tasks = load_rl_tasks(cfg)
    ranks.check_shares({"prompts_per_step": cfg.prompts_per_step,
                        **({"minibatch_size": cfg.minibatch_size} if cfg.minibatch_size else {})}, divisible=True)

    if not cfg.resume and info.is_main:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    ranks.barrier()
    checkpoint = latest_checkpoint(out) if cfg.resume else None
    saved = read_checkpoint(checkpoint) if checkpoint else None
    if saved is not None:
        check_resumable(cfg, saved["config"])
    # a single process's checkpoint is a save_pretrained model; a sharded one loads into the base model once wrapped
    model, tokenizer = load_model(str(checkpoint) if checkpoint and not ranks.sharded() else cfg.model,
                                  dtype=cfg.dtype, device=device, seed=cfg.seed)
    reference = None
    if cfg.kl_coef > 0:  # the frozen initial policy (sharded like the policy under fsdp)
        reference = (load_model(cfg.model, dtype=cfg.dtype, device=device, seed=cfg.seed)[0] if checkpoint
                     else copy.deepcopy(model))
        reference = ranks.wrap_model(reference.eval().requires_grad_(False), cfg.distributed)
    model = ranks.wrap_model(model, cfg.distributed)  # DDP / FSDP2 under torchrun; the model itself otherwise
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_step, keep = 0, 0
    if checkpoint:
        saved = resume_state(checkpoint, model, optimizer)
        start_step, keep = saved["step"], saved.get("metrics_lines", saved["step"])
        ranks.log(f"ra3 rlvr: resuming from {checkpoint} (step {start_step})")
    write_config(out, cfg)

    generator = HFGenerator(ranks.unwrap(model), tokenizer, batch_size=cfg.generation_batch_size)
    reward_fn = UnitTestReward(Sandbox(SandboxConfig(timeout=cfg.timeout)), partial_credit=cfg.partial_credit,
                               workers=cfg.workers)
    writer = MetricsWriter(out, keep_lines=keep)
    G = cfg.group_size
    metrics: dict = {}
    try:
        for step in tqdm(range(start_step, cfg.steps), desc="rlvr", initial=start_step, total=cfg.steps,
                         disable=not (cfg.progress and info.is_main), dynamic_ncols=True):
            t0 = time.perf_counter()
            # 1. rollout: G completions per prompt from the current policy (this rank's share of the prompts)
            step_tasks = ranks.shard(tasks_for_step(tasks, cfg, step))
            with ranks.full_params(model):  # generation needs every weight at once (gathered under fsdp)
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
            with ranks.full_params(model) as policy, ranks.full_params(reference) as ref:
                old_logprobs, entropy = response_logprobs(policy, batch, temperature=cfg.temperature,
                                                          backend=cfg.backend, with_entropy=True)
                ref_logprobs = (response_logprobs(ref, batch, temperature=cfg.temperature,
                                                  backend=cfg.backend) if ref is not None else None)

            # 5. PPO-clipped policy loss + KL, AdamW, over minibatches (the update the E-step of RA3 takes too),
            # fused with the lm_head (ops.linear_policy_loss)
            def head(m, index):
                return response_head(m, batch.select(index), temperature=cfg.temperature)

            stats = policy_gradient_update(model, optimizer, PolicyTokens(None, old_logprobs, advantages, batch.mask,
                                                                          ref_logprobs, head=head),
                                           update_config(cfg, info.world_size))
            # 6. metrics (of every rank's samples), checkpoint
            seconds = time.perf_counter() - t0
            n_gen_tokens = sum(len(s["token_ids"]) for s in samples)
            metrics = {
                "kind": "step", "objective": "grpo",
                "step": step + 1,
                "reward_mean": sum(rewards) / len(rewards),
                "reward_std": float(torch.tensor(rewards).std()) if len(rewards) > 1 else 0.0,
                "pass_rate": sum(r.passed for r in results) / len(results),
                **stats,
                "entropy": entropy,
                "response_length": n_gen_tokens / len(samples),
                "tokens_per_s": n_gen_tokens / max(seconds, 1e-9),  # sampled tokens per second of the step
                "rollout_tokens_per_s": n_gen_tokens / max(t_gen, 1e-9),
                "rollout_s": t_gen,
                "reward_s": t_reward,
                "time_s": seconds,
                "lr": cfg.lr,
            }
            metrics = _over_ranks(metrics, rewards, n_tokens=int(batch.mask.sum()), n_gen_tokens=n_gen_tokens)
            writer.write(metrics)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                save_step(out, step + 1, model, tokenizer, optimizer, cfg, writer.lines)
    finally:
        writer.close()
    return metrics


def _over_ranks(m: dict, rewards: list[float], *, n_tokens: int, n_gen_tokens: int) -> dict:
    """A step's metrics of every rank's samples: per-sample means weighted by samples, per-token ones by
    response tokens, the slowest rank's seconds (``m`` as it is in a single process)."""
    if not ranks.get_info().distributed:
        return m
    n = len(rewards)
    weights = {"reward_mean": n, "pass_rate": n, "response_length": n,
               **{k: n_tokens for k in ("entropy", *PER_TOKEN_METRICS)}}
    g = ranks.reduce_metrics({**m, "gen_tokens": n_gen_tokens}, weights=weights, sums=("gen_tokens",),
                             maxes=("step", "rollout_s", "reward_s", "time_s"),
                             stds={"reward_std": rewards})
    tokens = g.pop("gen_tokens")
    g["tokens_per_s"] = tokens / max(g["time_s"], 1e-9)
    g["rollout_tokens_per_s"] = tokens / max(g["rollout_s"], 1e-9)
    return g

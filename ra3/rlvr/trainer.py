"""GRPO post-training with unit-test rewards, one readable loop (``train``) over named steps.

Per step: sample ``prompts_per_step`` tasks -> ``rollout`` G completions each (Hugging Face generate on the
policy) -> ``UnitTestReward`` in the sandbox -> ``ops.group_advantages`` within each group -> per-token
log-probs of the sampled tokens from the final hidden states and the lm_head with ``ops.linear_logprobs`` (the
[tokens x vocab] logits are never built) -> ``ops.policy_loss`` (PPO clip + KL to the frozen initial model) ->
AdamW. Metrics go to ``OUT/metrics.jsonl`` (and TensorBoard when installed); checkpoints to
``OUT/checkpoints/step-N`` (a ``save_pretrained`` directory ``ra3 eval --model`` can load, plus the optimizer
state), from which ``resume`` continues.

Distributed (``distributed: ddp | fsdp`` under torchrun): each rank samples, scores and trains on its share of
the step's prompt groups; gradients are averaged over ranks (DDP / FSDP2) as for one loss over the whole batch,
the metrics describe the whole batch, rank 0 alone writes files. Checkpoints then hold the sharded
``step-N/sharded`` (``ra3.distributed.save_checkpoint``: weights, optimizer, step, RNG) beside the
``save_pretrained`` model, and resume under ddp or fsdp with any number of processes.
"""
from __future__ import annotations

import copy
import json
import math
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ra3 import distributed as dist
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
        self.writer = None
        self.enabled = dist.is_main()  # under ddp / fsdp rank 0 writes, the others pass
        if not self.enabled:
            return
        if self.path.exists():  # resuming after `start_step` completed steps: drop rows of steps redone
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
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


TRAINER_STATE, SHARDED = "trainer_state.pt", "sharded"  # the optimizer etc.: a file (none) or a sharded dir


def _complete_checkpoints(out: Path, marker: str) -> list[tuple[int, Path]]:
    return sorted((int(m.group(1)), p) for p in (out / "checkpoints").glob("step-*")
                  if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / marker).exists())


def latest_checkpoint(out: Path, distributed: str = "none") -> Path | None:
    """The newest complete ``OUT/checkpoints/step-N`` of the format ``distributed`` writes (sharded for ddp /
    fsdp); a ValueError naming ``distributed`` when only checkpoints of the other format are there."""
    formats = {"none": TRAINER_STATE, "sharded": f"{SHARDED}/.metadata"}
    mine = "none" if distributed == "none" else "sharded"
    steps = _complete_checkpoints(out, formats[mine])
    if not steps and _complete_checkpoints(out, formats["sharded" if mine == "none" else "none"]):
        written = "a ddp / fsdp run (sharded)" if mine == "none" else "a distributed='none' run"
        hint = "--distributed ddp or fsdp" if mine == "none" else "--distributed none"
        raise ValueError(f"distributed={distributed!r} cannot resume the checkpoints in {out / 'checkpoints'}: they "
                         f"were written by {written}; resume with {hint}, or start a new --out")
    return steps[-1][1] if steps else None


def save_checkpoint(out: Path, step: int, model, tokenizer, optimizer, cfg: RLVRConfig) -> Path:
    """``OUT/checkpoints/step-{step}``: the model (save_pretrained) + optimizer; keeps the newest few.

    Under ddp / fsdp every rank calls it: rank 0 writes the (gathered) model, every rank its shards of
    ``step-{step}/sharded`` (weights, optimizer, step, each rank's RNG state)."""
    root = out / "checkpoints"
    path = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist.save_pretrained(model, tmp, tokenizer)
    if cfg.distributed == "none":
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": cfg.to_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / TRAINER_STATE)
    else:
        dist.save_checkpoint({"model": model, "optimizer": optimizer, "step": step, "config": cfg.to_dict(),
                              "torch_rng": dist.gather_objects(torch.get_rng_state())}, tmp / SHARDED)
    if dist.is_main():
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)  # a checkpoint is either complete or absent
        done = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*")
                      if p.name.split("-")[1].isdigit())
        for _, old in done[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load_checkpoint(checkpoint: Path, model, optimizer, cfg: RLVRConfig, device) -> int:
    """Resume from ``checkpoint`` (``latest_checkpoint``): the optimizer state (and under ddp / fsdp the
    weights, which the ``none`` format loads with the model) and the RNG state. Returns the steps done."""
    if cfg.distributed == "none":
        state = torch.load(checkpoint / TRAINER_STATE, map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        return state["step"]
    state = dist.load_checkpoint({"model": model, "optimizer": optimizer}, checkpoint / SHARDED)
    info, rng = dist.get_info(), state["torch_rng"]
    torch.set_rng_state(rng[info.rank] if len(rng) == info.world_size else rng[0])  # another world size: rank 0's
    return state["step"]


# ---- the loop -----------------------------------------------------------------------------------------------
def rollout(generator, tasks: list[Task], cfg: RLVRConfig, step: int) -> list[dict]:
    """G samples per task (task-major), with their token ids and post-processed completions."""
    return generate_samples(tasks, generator, n=cfg.group_size, temperature=cfg.temperature, top_p=1.0,
                            max_new_tokens=cfg.max_new_tokens, seed=dist.rank_seed(cfg.seed * 1_000_003 + step),
                            chat=cfg.chat, progress=False, keep_token_ids=True)


def train(cfg: RLVRConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Run GRPO for ``cfg.steps`` steps (continuing from the latest checkpoint when ``resume``).

    Returns the metrics of the last step run ({} when resuming a finished run). With ``distributed`` ddp / fsdp,
    every process torchrun started calls it (it joins their process group).
    """
    cfg.validate()
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with dist.session(cfg.distributed, backend="gloo" if device == "cpu" else None):
        return _train(cfg, resume=resume, progress=progress)


def _train(cfg: RLVRConfig, *, resume: bool, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from ra3.eval.evaluate import task_prompt
    from ra3.generation import HFGenerator
    from ra3.models import load_model

    out = Path(cfg.out)
    info = dist.get_info()
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    device = str(info.device) if info.distributed else cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    tasks = load_rl_tasks(cfg)
    _check_rank_shares(cfg, info.world_size)

    sharded = cfg.distributed != "none"
    checkpoint = latest_checkpoint(out, cfg.distributed) if resume else None
    # a 'none' checkpoint is a save_pretrained model; a sharded one loads into the base model once it is wrapped
    model, tokenizer = load_model(str(checkpoint) if checkpoint and not sharded else cfg.model, dtype=cfg.dtype,
                                  device=device, seed=cfg.seed)
    reference = None
    if cfg.kl_coef > 0:  # the frozen initial policy (sharded like the policy under fsdp)
        reference = (load_model(cfg.model, dtype=cfg.dtype, device=device, seed=cfg.seed)[0] if checkpoint
                     else copy.deepcopy(model))
        reference = dist.wrap_model(reference.eval().requires_grad_(False), cfg.distributed)
    model = dist.wrap_model(model, cfg.distributed)  # DDP / FSDP2 under torchrun; the model itself otherwise
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_step = load_checkpoint(checkpoint, model, optimizer, cfg, device) if checkpoint else 0
    if info.is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    generator = HFGenerator(dist.unwrap(model), tokenizer, batch_size=cfg.generation_batch_size)
    reward_fn = UnitTestReward(Sandbox(SandboxConfig(timeout=cfg.timeout)), partial_credit=cfg.partial_credit,
                               workers=cfg.workers)
    logger = MetricsLogger(out, start_step)
    G = cfg.group_size
    metrics: dict = {}
    try:
        for step in tqdm(range(start_step, cfg.steps), desc="rlvr", initial=start_step, total=cfg.steps,
                         disable=not (progress and info.is_main), dynamic_ncols=True):
            t0 = time.perf_counter()
            # 1. rollout: G completions per prompt from the current policy (this rank's share of the prompts)
            step_tasks = dist.shard(tasks_for_step(tasks, cfg, step))
            with dist.full_params(model):  # generation needs every weight at once (gathered under fsdp)
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
            with dist.full_params(model) as policy, dist.full_params(reference) as ref:
                old_logprobs, entropy = response_logprobs(policy, batch, temperature=cfg.temperature,
                                                          backend=cfg.backend, with_entropy=True)
                ref_logprobs = (response_logprobs(ref, batch, temperature=cfg.temperature,
                                                  backend=cfg.backend) if ref is not None else None)
            # 5. PPO-clipped policy loss + KL, AdamW (minibatch_size counts the sequences of all ranks)
            model.train()
            B = len(samples)
            mb = (cfg.minibatch_size // info.world_size) or B
            stats = {"loss": [], "clip_fraction": [], "kl": [], "ratio": [], "grad_norm": []}
            for _ in range(cfg.ppo_epochs):
                # one minibatch: keep the order, so a resumed run repeats an uninterrupted one exactly
                order = torch.randperm(B, device=device) if mb < B else torch.arange(B, device=device)
                for start in range(0, B, mb):
                    idx = order[start:start + mb]
                    logprobs = dist.forward(model, lambda m: response_logprobs(
                        m, batch.select(idx), temperature=cfg.temperature, backend=cfg.backend))
                    result = ops.policy_loss(logprobs, old_logprobs[idx], advantages[idx], batch.mask[idx],
                                             clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                             ref_logprobs=None if ref_logprobs is None else ref_logprobs[idx],
                                             kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
                                             aggregation=cfg.aggregation, backend=cfg.backend)
                    optimizer.zero_grad(set_to_none=True)
                    count = int(batch.mask[idx].sum()) if cfg.aggregation == "token-mean" else len(idx)
                    dist.scale_for_global_mean(result.loss, count).backward()
                    grad_norm = dist.clip_grad_norm_(model, cfg.max_grad_norm)
                    optimizer.step()
                    for key, value in (("loss", result.loss), ("clip_fraction", result.clip_fraction),
                                       ("kl", result.kl_mean), ("ratio", result.ratio_mean),
                                       ("grad_norm", grad_norm)):
                        stats[key].append(float(value.detach()) if torch.is_tensor(value) else float(value))
            model.eval()
            # 6. metrics (of every rank's samples), checkpoint
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
            metrics = _over_ranks(metrics, rewards, n_tokens=int(batch.mask.sum()), n_gen_tokens=n_gen_tokens)
            logger.log(metrics)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                save_checkpoint(out, step + 1, model, tokenizer, optimizer, cfg)
    finally:
        logger.close()
    return metrics


def _check_rank_shares(cfg: RLVRConfig, world_size: int) -> None:
    """Under ddp / fsdp every rank takes the same number of prompt groups and of optimizer steps per step."""
    for name in ("prompts_per_step", "minibatch_size"):
        if getattr(cfg, name) % world_size:
            raise ValueError(f"{name} must be a multiple of the number of ranks ({world_size}) under "
                             f"distributed={cfg.distributed!r}, got {getattr(cfg, name)}")


def _over_ranks(m: dict, rewards: list[float], *, n_tokens: int, n_gen_tokens: int) -> dict:
    """A step's metrics of every rank's samples: per-sample means weighted by samples, per-token ones by
    response tokens, the slowest rank's seconds (``m`` as it is in a single process)."""
    if not dist.get_info().distributed:
        return m
    n = len(rewards)
    weights = {"reward_mean": n, "reward_sq": n, "pass_rate": n, "response_length": n,
               **{k: n_tokens for k in ("kl", "entropy", "clip_fraction", "ratio_mean", "loss")}}
    g = dist.reduce_metrics({**m, "reward_sq": sum(r * r for r in rewards) / n, "samples": n,
                             "gen_tokens": n_gen_tokens}, weights=weights, sums=("samples", "gen_tokens"),
                            maxes=("step", "seconds_generation", "seconds_reward", "seconds_step"))
    n_all, tokens = g.pop("samples"), g.pop("gen_tokens")
    var = (g.pop("reward_sq") - g["reward_mean"] ** 2) * n_all / max(n_all - 1, 1)
    g["reward_std"] = math.sqrt(max(var, 0.0)) if n_all > 1 else 0.0
    g["tokens_per_s"] = tokens / max(g["seconds_step"], 1e-9)
    g["generation_tokens_per_s"] = tokens / max(g["seconds_generation"], 1e-9)
    return g


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0

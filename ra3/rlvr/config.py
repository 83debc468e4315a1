"""The one config of an RLVR (GRPO) run: a dataclass, loadable from YAML/JSON and overridable by CLI flags."""
from __future__ import annotations

from dataclasses import dataclass

from ra3.eval.benchmarks import BENCHMARKS
from ra3.train.config import (ADVANTAGE_NORMALIZE, BACKENDS, DISTRIBUTED, DTYPES, KL_ESTIMATORS, RESUME_FREE_FIELDS,
                              TrainConfig)
from ra3.train.update import AGGREGATIONS

TASK_SOURCES = ("toy", *BENCHMARKS)


# The demo of `ra3 rlvr --preset toy` (and of a bare `ra3 rlvr`): the shipped, pretrained ra3-tiny on the toy
# tasks (ra3/rlvr/toy.py), whole-line answers of up to 8 tokens, a KL penalty to the starting model; about 2
# minutes on a 2-core CPU, pass rate from about 0.1 to about 0.8 (benchmarks/results/rlvr_demo-*). Its learning
# rate suits only this 1.8M-parameter model; the dataclass defaults are for real models.
TOY_PRESET = dict(model="ra3-tiny", tasks="toy", num_toy_tasks=16, steps=60, prompts_per_step=8, group_size=8,
                  max_new_tokens=8, lr=2e-4, kl_coef=0.1, partial_credit=True, save_every=20)


@dataclass
class RLVRConfig(TrainConfig):
    """GRPO with unit-test rewards. Defaults suit a real code model (``--model``, ``--tasks``); the toy preset
    (``RLVRConfig.toy()``) runs the built-in toy tasks on ``ra3-tiny``."""
    # what to train, on what
    model: str = "ra3-tiny"  # policy to train: Hugging Face name, local save_pretrained directory, or ra3-tiny
    tasks: str = "toy"  # 'toy' (built-in synthetic tasks) or a benchmark of ra3.eval (with --data)
    data: str | None = None  # local task file for the benchmark (see `ra3 eval --data`)
    split: str | None = None  # MBPP split to train on (train, validation, test, prompt, all)
    num_toy_tasks: int = 16  # how many toy tasks
    out: str = "runs/rlvr"  # run directory: metrics.jsonl, config.yaml, checkpoints/, tensorboard/
    resume: bool = True  # continue from OUT's latest checkpoint when there is one (false: start over)
    progress: bool = True  # tqdm progress bars
    # rollouts
    steps: int = 200  # GRPO steps (each: rollouts, rewards, one update per minibatch and epoch)
    prompts_per_step: int = 8  # tasks sampled per step
    group_size: int = 8  # G samples per prompt
    max_new_tokens: int = 512  # longest completion sampled
    temperature: float = 1.0  # sampling temperature (the log-probs are taken at the same temperature)
    chat: bool = False  # wrap prompts in the tokenizer's chat template
    # reward
    partial_credit: bool = False  # reward = fraction of tests passed (else 1 if all pass, 0 otherwise)
    timeout: float = 5.0  # seconds per program in the sandbox
    workers: int | None = None  # parallel sandboxed programs (default: CPU count)
    # GRPO objective
    advantage: str = "std"  # group normalisation: std (GRPO), mean (Dr. GRPO), rloo, none, batch-std
    clip_low: float = 0.2  # PPO clip below the ratio 1
    clip_high: float = 0.2  # PPO clip above the ratio 1 (DAPO's clip-higher when larger)
    kl_coef: float = 0.001  # KL(pi || pi_ref) penalty; 0 drops the reference model
    kl_estimator: str = "k3"  # k1, k2 or k3 (Schulman's estimators of the KL)
    aggregation: str = "token-mean"  # token losses to one: token-mean, seq-mean-token-sum, seq-mean-token-mean, dr-grpo
    # optimisation
    lr: float = 1e-6  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    ppo_epochs: int = 1  # passes over each step's samples
    minibatch_size: int = 0  # sequences per optimizer step; 0 = the whole batch
    # runtime
    dtype: str = "float32"  # float32, bfloat16 or float16
    device: str | None = None  # default: cuda when available, else cpu
    distributed: str = "none"  # none | ddp | fsdp: data-parallel over torchrun's processes (device: each rank's)
    generation_batch_size: int = 64  # sequences per HF generate call
    backend: str = "auto"  # backend of every ra3.ops call: auto | torch | cpu | cuda | triton | ...
    seed: int = 0  # seed of task order, sampling and initialisation
    save_every: int = 50  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept

    CHOICES = {"tasks": TASK_SOURCES, "advantage": ADVANTAGE_NORMALIZE, "aggregation": AGGREGATIONS,
               "kl_estimator": KL_ESTIMATORS, "dtype": DTYPES, "backend": BACKENDS, "distributed": DISTRIBUTED}
    AT_LEAST = {**dict.fromkeys(("steps", "prompts_per_step", "max_new_tokens", "ppo_epochs",
                                 "save_every", "num_toy_tasks", "generation_batch_size", "keep_checkpoints",
                                 "workers"), 1),
                **dict.fromkeys(("minibatch_size", "clip_low", "clip_high", "kl_coef", "weight_decay", "seed"), 0),
                "group_size": 2}
    WHY = {"group_size": "advantages are relative to the group"}
    BELOW = {"clip_low": 1}
    POSITIVE = ("temperature", "timeout", "lr", "max_grad_norm")
    # extending a run (steps) or changing how often it checkpoints or how many programs run at once does not
    # change what it computes
    RESUME_FREE = (*RESUME_FREE_FIELDS, "steps", "save_every", "keep_checkpoints", "workers")

    def __post_init__(self):
        self.validate()

    @classmethod
    def toy(cls, **changes) -> "RLVRConfig":
        """The toy preset (TOY_PRESET) with ``changes`` on top."""
        return cls(**{**TOY_PRESET, **changes})

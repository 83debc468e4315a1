"""The one config of an RLVR (GRPO) run: a dataclass, loadable from YAML/JSON and overridable by CLI flags."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ra3.eval.benchmarks import BENCHMARKS

TASK_SOURCES = ("toy", *BENCHMARKS)
ADVANTAGES = ("std", "mean", "rloo", "none")
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_ESTIMATORS = ("k1", "k2", "k3")


# The demo of `ra3 rlvr --preset toy` (and of a bare `ra3 rlvr`): the shipped, pretrained ra3-tiny on the toy
# tasks (ra3/rlvr/toy.py), whole-line answers of up to 8 tokens, a KL penalty to the starting model; about 2
# minutes on a 2-core CPU, pass rate from about 0.1 to about 0.8 (benchmarks/results/rlvr_demo-*). Its learning
# rate suits only this 1.8M-parameter model; the dataclass defaults are for real models.
TOY_PRESET = dict(model="ra3-tiny", tasks="toy", num_toy_tasks=16, steps=60, prompts_per_step=8, group_size=8,
                  max_new_tokens=8, lr=2e-4, kl_coef=0.1, partial_credit=True, save_every=20)


@dataclass
class RLVRConfig:
    """GRPO with unit-test rewards. Defaults suit a real code model (``--model``, ``--tasks``); the toy preset
    (``RLVRConfig.toy()``) runs the built-in toy tasks on ``ra3-tiny``."""
    # what to train, on what
    model: str = "ra3-tiny"  # policy to train: Hugging Face name, local save_pretrained directory, or ra3-tiny
    tasks: str = "toy"  # 'toy' (built-in synthetic tasks) or a benchmark of ra3.eval (with --data)
    data: str | None = None  # local task file for the benchmark (see `ra3 eval --data`)
    split: str | None = None  # MBPP split to train on (train, validation, test, prompt, all)
    num_toy_tasks: int = 16  # how many toy tasks
    out: str = "runs/rlvr"  # run directory: metrics.jsonl, config.json, checkpoints/, tensorboard/
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
    advantage: str = "std"  # group normalisation: std (GRPO), mean (Dr. GRPO), rloo, none
    clip_low: float = 0.2  # PPO clip below the ratio 1
    clip_high: float = 0.2  # PPO clip above the ratio 1 (DAPO's clip-higher when larger)
    kl_coef: float = 0.001  # KL(pi || pi_ref) penalty; 0 drops the reference model
    kl_estimator: str = "k3"  # k1, k2 or k3 (Schulman's estimators of the KL)
    aggregation: str = "token-mean"  # how token losses average: token-mean, seq-mean-token-sum, seq-mean-token-mean
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
    backend: str = "auto"  # ra3.ops backend for the fused loss ops: auto, torch, cpu, cuda, triton
    seed: int = 0  # seed of task order, sampling and initialisation
    save_every: int = 50  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def positive_int(name, minimum=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")

        def number(name, low=None, high=None, low_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if low is not None and (v < low or (low_open and v == low)):
                raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v!r}")
            if high is not None and v > high:
                raise ValueError(f"{name} must be <= {high}, got {v!r}")

        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "ppo_epochs", "save_every",
                     "num_toy_tasks", "generation_batch_size", "keep_checkpoints"):
            positive_int(name)
        positive_int("minibatch_size", 0)
        if self.workers is not None:
            positive_int("workers")
        number("temperature", 0, low_open=True)
        number("timeout", 0, low_open=True)
        number("clip_low", 0, 1)
        if self.clip_low >= 1:
            raise ValueError(f"clip_low must be < 1, got {self.clip_low}")
        number("clip_high", 0)
        number("kl_coef", 0)
        number("lr", 0, low_open=True)
        number("weight_decay", 0)
        number("max_grad_norm", 0, low_open=True)
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        for name, choices in (("tasks", TASK_SOURCES), ("advantage", ADVANTAGES), ("aggregation", AGGREGATIONS),
                              ("kl_estimator", KL_ESTIMATORS),
                              ("dtype", ("float32", "bfloat16", "float16")),
                              ("backend", ("auto", "torch", "cpu", "cuda", "triton")),
                              ("distributed", ("none", "ddp", "fsdp"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty str, got {self.model!r}")
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out must be a non-empty path, got {self.out!r}")

    @classmethod
    def toy(cls, **changes) -> "RLVRConfig":
        """The toy preset (TOY_PRESET) with ``changes`` on top."""
        return cls(**{**TOY_PRESET, **changes})

    # ---- files --------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict) -> "RLVRConfig":
        if not isinstance(values, dict):
            raise ValueError(f"an RLVR config must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown RLVR config key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path) -> "RLVRConfig":
        """A YAML (.yaml/.yml) or JSON config file; keys are the field names, missing ones take defaults."""
        return cls.from_dict(read_config_file(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "RLVRConfig":
        return dataclasses.replace(self, **changes)


def read_config_file(path) -> dict:
    """The mapping in a YAML (.yaml/.yml) or JSON file, its keys checked against RLVRConfig's fields."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError and yaml.YAMLError's parse errors
        raise ValueError(f"config file {str(path)!r} cannot be parsed: {exc}") from None
    except Exception as exc:  # yaml.YAMLError is not a ValueError
        raise ValueError(f"config file {str(path)!r} cannot be parsed: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(RLVRConfig)})
    if unknown:
        raise ValueError(f"config file {str(path)!r}: unknown key(s) {unknown}")
    return values

"""One config for the whole RA3 mid-training loop: a dataclass, loadable from YAML/JSON, overridable per field.

The defaults are the embedded default run (``ra3-tiny`` on the embedded corpus, a few minutes on a 2-core CPU);
``ra3/configs/midtrain_default.yaml`` spells them out, and the paper's settings are one file away.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from ra3.ops import registry as ops_registry

OBJECTIVES = ("ra3", "ntp", "both")
KL_FORMS = ("fixed", "exact")
ADVANTAGES = ("return", "returns-to-go")
NORMALIZE = ("std", "mean", "rloo", "none")
MSTEP_TOKENS = ("all", "code")
ENGINES = ("hf", "vllm")
BACKENDS = ("auto", *ops_registry.BACKENDS)
DISTRIBUTED = ("none", "ddp", "fsdp")  # ra3.distributed strategies


@dataclass
class MidtrainConfig:
    """Every knob of ``ra3 midtrain``; see the field comments. Validate with ``validate()``."""
    # --- data
    corpus: str | None = None  # None: the embedded default; else .jsonl/.json/.parquet path or datasets name
    text_column: str = "content"  # the field holding the code
    split: str = "train"  # datasets split
    corpus_limit: int | None = None  # keep the first N documents
    action_unit: str = "line"  # 'line' (paper) | 'block' (blank-line separated blocks)
    max_actions: int = 16  # documents are cut to their first N actions
    max_action_tokens: int = 64  # a document is cut before an action longer than this
    heldout_fraction: float = 0.1  # share of documents kept out of training, for the held-out NTP loss
    # --- model
    model: str = "ra3-tiny"  # Hugging Face name or local path, or the embedded 'ra3-tiny'
    dtype: str = "float32"  # float32 | bfloat16 | float16 | float64
    device: str = "cpu"  # cpu | cuda | cuda:N
    ops_backend: str = "auto"  # backend of every ra3.ops call: auto | torch | cpu | cuda | triton
    cpu_threads: int = 1  # torch CPU threads during the run (tiny models run fastest on 1); 0: leave torch's
    distributed: str = "none"  # none | ddp | fsdp: data-parallel over torchrun's processes (device: each rank's)
    # --- the loop
    objective: str = "both"  # 'ra3', 'ntp' (the baseline) or 'both' (ra3, then ntp on the same budget)
    em_iterations: int = 2  # EM rounds
    seed: int = 0  # seeds the split and every sampled batch and rollout
    # --- E-step: RL over latents
    think_cost: float = 0.05  # c, paid per think in the fixed-cost form (paper default)
    kl_form: str = "fixed"  # 'fixed' (c per think) or 'exact' (Bernoulli KL against alpha + comment entropy)
    alpha: float = 0.9  # prior probability of keeping the previous latent (exact form)
    group_size: int = 4  # G rollouts per document
    max_rationale_tokens: int = 8  # comment tokens before the closing newline is forced (paper-scale: 32)
    rollout_temperature: float = 1.0  # temperature of q (decisions and comments)
    discount: float = 1.0  # gamma over lines
    advantage: str = "returns-to-go"  # 'returns-to-go' (a decision's return from its line on) or 'return' (rollout)
    advantage_normalize: str = "mean"  # centring in nats against the document's group: mean | rloo | std | none
    format_penalty: float = 0.0  # subtracted per think whose comment is empty or was cut at max_rationale_tokens
    e_steps: int = 4  # policy-gradient updates per EM round
    e_docs_per_step: int = 8  # documents per update (x group_size rollouts)
    ppo_epochs: int = 2  # gradient steps on each rollout batch (with 1 the ratio is 1 and the clip never acts)
    clip_low: float = 0.2  # PPO ratio clip below 1
    clip_high: float = 0.2  # PPO ratio clip above 1
    kl_coef: float = 0.01  # KL to the frozen reference (the policy at the start of the E-step)
    kl_estimator: str = "k3"  # k1 | k2 | k3 estimator of the reference KL
    e_lr: float = 1e-4  # E-step (policy-gradient) learning rate (3e-4 on ra3-tiny teaches it to stop commenting)
    rollout_batch_size: int = 64  # rollouts walked together by the generator
    # --- M-step: NTP on the annotated corpus
    annotate_docs: int | None = 160  # training documents annotated per round (None: all)
    m_steps: int = 40  # optimizer steps per EM round (the NTP baseline gets the same)
    m_batch_size: int = 16  # annotated documents per M-step update
    m_lr: float = 1e-4  # M-step (NTP) learning rate (ra3-tiny overfits its round at 2e-3); paper-scale ~1e-5
    mstep_tokens: str = "all"  # loss on 'all' tokens (comments and code) or on 'code' tokens only
    # --- optimisation and bookkeeping
    weight_decay: float = 0.0  # AdamW weight decay (both steps)
    grad_clip: float = 1.0  # max gradient norm (both steps)
    eval_batch_size: int = 64  # sequences per scoring / held-out forward pass
    out: str = "runs/midtrain"  # run directory (metrics.jsonl, checkpoints/, samples/, summary.md)
    checkpoint_every: int = 20  # steps between checkpoints (phase ends always checkpoint)
    resume: bool = True  # continue from DIR's checkpoint when there is one
    stop_after_steps: int | None = None  # stop (as if killed) after this many optimizer steps; resume later
    num_samples: int = 3  # annotated samples written per EM round
    engine: str = "hf"  # rollout engine: "hf" (Hugging Face, any device) | "vllm" (needs vllm and a CUDA GPU)
    progress: bool = True  # tqdm progress bars

    # --------------------------------------------------------------------------------------------- checks
    def validate(self) -> "MidtrainConfig":
        """Raise ValueError naming the first bad field; return self."""
        def bad(name, why):
            raise ValueError(f"config field {name!r}: {why}, got {getattr(self, name)!r}")

        for f in fields(self):
            value = getattr(self, f.name)
            kind = _base_type(f.type)
            if value is None:
                if not _optional(f.type):
                    bad(f.name, "must not be None")
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if kind is bool and not isinstance(value, bool):
                bad(f.name, "must be true or false")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                bad(f.name, "must be an integer")
            if kind is float and (not isinstance(value, float) or not math.isfinite(value)):
                bad(f.name, "must be a finite number")
            if kind is str and not isinstance(value, str):
                bad(f.name, "must be a string")
        for name, choices in (("objective", OBJECTIVES), ("kl_form", KL_FORMS), ("advantage", ADVANTAGES),
                              ("advantage_normalize", NORMALIZE), ("mstep_tokens", MSTEP_TOKENS),
                              ("engine", ENGINES), ("ops_backend", BACKENDS), ("action_unit", ("line", "block")),
                              ("kl_estimator", ("k1", "k2", "k3")), ("distributed", DISTRIBUTED),
                              ("dtype", ("float32", "bfloat16", "float16", "float64"))):
            if getattr(self, name) not in choices:
                bad(name, f"must be one of {choices}")
        for name in ("think_cost", "kl_coef", "weight_decay", "format_penalty", "clip_low", "clip_high"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.clip_low >= 1:
            bad("clip_low", "must be < 1")
        for name in ("em_iterations", "max_actions", "max_action_tokens", "e_docs_per_step", "ppo_epochs",
                     "rollout_batch_size", "m_batch_size", "eval_batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("e_steps", "m_steps", "max_rationale_tokens", "num_samples", "seed", "cpu_threads"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.group_size < 2:
            bad("group_size", "must be >= 2 (group-relative advantages need at least two rollouts per document)")
        for name in ("corpus_limit", "annotate_docs", "stop_after_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, "must be >= 1 or null")
        if not 0 < self.alpha < 1:
            bad("alpha", "must be in (0, 1)")
        if not 0 < self.discount <= 1:
            bad("discount", "must be in (0, 1]")
        if not 0 <= self.heldout_fraction < 1:
            bad("heldout_fraction", "must be in [0, 1)")
        for name in ("e_lr", "m_lr", "rollout_temperature", "grad_clip"):
            if getattr(self, name) <= 0:
                bad(name, "must be > 0")
        if not self.text_column:
            bad("text_column", "must be a non-empty string")
        if not self.model:
            bad("model", "must name a model")
        if not self.out:
            bad("out", "must be a directory path")
        if self.distributed != "none" and self.engine != "hf":
            bad("engine", f"must be 'hf' with distributed={self.distributed!r} (each rank samples with its own "
                          f"Hugging Face model)")
        return self

    # --------------------------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> "MidtrainConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of field names to values, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown config field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "MidtrainConfig":
        """Read a YAML (.yaml/.yml) or JSON (.json) config; fields not in the file keep their defaults."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        return cls.from_dict(data, source=str(path))

    def with_overrides(self, overrides: dict) -> "MidtrainConfig":
        """A copy with ``overrides`` (field -> value, values already typed or strings to parse) applied."""
        data = self.to_dict()
        types = {f.name: f.type for f in fields(self)}
        for key, value in overrides.items():
            name = key.replace("-", "_")
            if name not in types:
                raise ValueError(f"unknown config field {key!r}; known fields: {sorted(types)}")
            data[name] = parse_value(name, types[name], value) if isinstance(value, str) else value
        return type(self).from_dict(data)


def _optional(tp) -> bool:
    return type(None) in typing.get_args(tp) if not isinstance(tp, str) else "None" in tp


def _base_type(tp):
    if isinstance(tp, str):  # postponed annotations: "int | None"
        head = tp.split("|")[0].strip()
        return {"int": int, "float": float, "str": str, "bool": bool}.get(head, str)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def parse_value(name: str, tp, text: str):
    """Parse a command-line string for field ``name`` of type ``tp`` ('null'/'none' -> None when optional)."""
    kind = _base_type(tp)
    if _optional(tp) and text.strip().lower() in ("none", "null", ""):
        return None
    try:
        if kind is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ValueError(f"config field {name!r}: cannot parse {text!r} as {kind.__name__}") from None
    return text


def field_help() -> dict[str, str]:
    """field name -> its comment in this file (for --help)."""
    from ra3.cli import dataclass_help

    return dataclass_help(MidtrainConfig)


__all__ = ["MidtrainConfig", "parse_value", "field_help", "OBJECTIVES", "KL_FORMS"]

"""One config for the whole RA3 mid-training loop: a dataclass, loadable from YAML/JSON, overridable per field.

The defaults are the embedded default run (``ra3-tiny`` on the embedded corpus, a few minutes on a 2-core CPU);
``ra3/configs/midtrain_default.yaml`` spells them out, and the paper's settings are one file away.
"""
from __future__ import annotations

from dataclasses import dataclass

from ra3.train.config import ADVANTAGE_NORMALIZE, BACKENDS, DISTRIBUTED, DTYPES, KL_ESTIMATORS, TrainConfig

OBJECTIVES = ("ra3", "ntp", "both")
KL_FORMS = ("fixed", "exact")
ADVANTAGES = ("return", "returns-to-go")
MSTEP_TOKENS = ("all", "code")
ENGINES = ("hf", "vllm")


@dataclass
class MidtrainConfig(TrainConfig):
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
    backend: str = "auto"  # backend of every ra3.ops call: auto | torch | cpu | cuda | triton | ...
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
    advantage_normalize: str = "mean"  # centring in nats against the document's group: mean | rloo | std | none | ...
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
    resume: bool = True  # continue from OUT's checkpoint when there is one (false: start over)
    stop_after_steps: int | None = None  # stop (as if killed) after this many optimizer steps; resume later
    num_samples: int = 3  # annotated samples written per EM round
    engine: str = "hf"  # rollout engine: "hf" (Hugging Face, any device) | "vllm" (needs vllm and a CUDA GPU)
    progress: bool = True  # tqdm progress bars

    CHOICES = {"objective": OBJECTIVES, "kl_form": KL_FORMS, "advantage": ADVANTAGES,
               "advantage_normalize": ADVANTAGE_NORMALIZE, "mstep_tokens": MSTEP_TOKENS, "engine": ENGINES,
               "backend": BACKENDS, "action_unit": ("line", "block"), "kl_estimator": KL_ESTIMATORS,
               "distributed": DISTRIBUTED, "dtype": DTYPES}
    AT_LEAST = {**dict.fromkeys(("think_cost", "kl_coef", "weight_decay", "format_penalty", "clip_low", "clip_high",
                                 "e_steps", "m_steps", "max_rationale_tokens", "num_samples", "seed", "cpu_threads"),
                                0),
                **dict.fromkeys(("em_iterations", "max_actions", "max_action_tokens", "e_docs_per_step", "ppo_epochs",
                                 "rollout_batch_size", "m_batch_size", "eval_batch_size", "checkpoint_every",
                                 "corpus_limit", "annotate_docs", "stop_after_steps"), 1),
                "group_size": 2}
    WHY = {"group_size": "group-relative advantages need at least two rollouts per document"}
    BELOW = {"clip_low": 1}
    POSITIVE = ("e_lr", "m_lr", "rollout_temperature", "grad_clip")
    RESUME_FREE = ("out", "resume", "stop_after_steps", "progress", "checkpoint_every", "num_samples", "distributed")

    @classmethod
    def renamed(cls) -> dict:
        return {"ops_backend": "backend"}  # the field's name before the trainers shared their flags

    def check(self) -> None:
        if not 0 < self.alpha < 1:
            self.bad("alpha", "must be in (0, 1)")
        if not 0 < self.discount <= 1:
            self.bad("discount", "must be in (0, 1]")
        if not 0 <= self.heldout_fraction < 1:
            self.bad("heldout_fraction", "must be in [0, 1)")
        if not self.text_column:
            self.bad("text_column", "must be a non-empty string")
        if self.distributed != "none" and self.engine != "hf":
            self.bad("engine", f"must be 'hf' with distributed={self.distributed!r} (each rank samples with its "
                               f"own Hugging Face model)")


def field_help() -> dict[str, str]:
    """field name -> its comment in this file (for --help)."""
    return MidtrainConfig.field_help()


__all__ = ["MidtrainConfig", "field_help", "OBJECTIVES", "KL_FORMS"]

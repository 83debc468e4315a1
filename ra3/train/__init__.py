"""What ``ra3 midtrain`` and ``ra3 rlvr`` stand on, so each trainer reads as its algorithm:

- ``update``: the policy-gradient update (old log-probs, PPO ratio and clip, KL to a frozen reference,
  minibatches, gradient clipping) that RA3's E-step and GRPO both take;
- ``run``: the run directory (config.yaml, metrics.jsonl + TensorBoard, samples, checkpoints with one
  ``save_checkpoint(directory, state)`` / ``load_checkpoint(directory, state)``) and resuming by rerunning;
- ``config``: the config base (dataclass, YAML/JSON, CLI overrides, validation naming the field) and the shared
  choices, taken from the ops and ``ra3.distributed``;
- ``cli``: one flag per config field, spelled alike in both commands, and how a training command runs and stops.
"""

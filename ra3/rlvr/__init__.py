"""RLVR: GRPO post-training of causal LMs with unit-test rewards, on the fused ``ra3.ops`` losses.

``train`` (``ra3.rlvr.trainer``) loads the trainer's dependencies when called.
"""
from ra3.rlvr.config import RLVRConfig
from ra3.rlvr.rewards import UnitTestReward
from ra3.rlvr.toy import toy_tasks


def train(cfg, *, resume: bool | None = None, progress: bool | None = None):
    """Run GRPO; see ``ra3.rlvr.trainer.train``."""
    from ra3.rlvr.trainer import train as _train

    return _train(cfg, resume=resume, progress=progress)


__all__ = ["RLVRConfig", "UnitTestReward", "toy_tasks", "train"]

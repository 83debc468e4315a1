"""RLVR: GRPO post-training of causal LMs with unit-test rewards, on the fused ``ra3.ops`` losses.

``RLVRConfig`` and ``toy_tasks`` load without torch; ``train`` (``ra3.rlvr.trainer``) imports it.
"""
from ra3.rlvr.config import RLVRConfig
from ra3.rlvr.rewards import UnitTestReward
from ra3.rlvr.toy import toy_tasks


def train(cfg, *, resume: bool = False, progress: bool = True):
    """Run GRPO; see ``ra3.rlvr.trainer.train``."""
    from ra3.rlvr.trainer import train as _train

    return _train(cfg, resume=resume, progress=progress)


__all__ = ["RLVRConfig", "UnitTestReward", "toy_tasks", "train"]

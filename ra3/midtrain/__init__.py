"""RA3 mid-training: EM over rationales (E-step RL over latents, M-step NTP on the annotated code), and the NTP
baseline, with the ELBO and every coefficient in one config.

    from ra3.midtrain import MidtrainConfig, run_midtrain
    run_midtrain(MidtrainConfig(out="runs/x", em_iterations=2))
"""
from ra3.midtrain.config import MidtrainConfig
from ra3.midtrain.loop import run_midtrain

__all__ = ["MidtrainConfig", "run_midtrain"]

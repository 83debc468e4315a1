"""Drop-in ra3 fast-loss backends for other people's trainers.

Each submodule imports its framework on first use, so ``import ra3.integrations`` stays lean:

- ``ra3.integrations.transformers``: ``apply_ra3(model)`` makes a Hugging Face causal LM's training loss skip
  the logits; ``token_logprobs(model, ...)`` gives per-token log-probs (and entropy) for RL.
- ``ra3.integrations.trl``: ``RA3GRPOTrainer``, a ``trl.GRPOTrainer`` whose log-probs go through ra3.
- ``ra3.integrations.verl``: a drop-in for verl's ``FusedLinearForPPO`` (log-probs and entropy from hidden states).
- ``ra3.integrations.lm_head``: the framework-free head math they share (soft-capping, logit scaling).
"""

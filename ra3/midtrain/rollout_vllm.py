"""The vLLM rollout engine for the E-step: the same latent walk as ``rollout.HFGenerator``, on vLLM.

Each line boundary re-submits every document's growing prefix as token ids; with ``enable_prefix_caching`` vLLM
reuses the KV blocks of the prefix it has already seen, so a step costs the new tokens only. Per boundary:

1. the decision: one token, ``allowed_token_ids=[act, think]`` (vLLM masks every other logit before the
   temperature, so this is the two-way softmax over the act/think logits that ``scoring`` scores);
2. on think, the comment: ``allowed_token_ids`` = the comment vocabulary (its last id is the newline act token),
   ``stop_token_ids=[act]``, at most ``max_rationale_tokens`` tokens; a comment that did not stop gets the
   closing newline forced, as the HF engine does;
3. the expert line is appended to the prefix as forced tokens (never sampled).

``sync_weights`` loads the trainer's weights into the vLLM model in place and resets the prefix cache (its KV
blocks were computed with the old weights). That reaches into vLLM's engine, which needs the engine core in
this process (vLLM V1: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here before vLLM is imported) and one GPU
(tensor parallel size 1). Requires the ``vllm`` package and a CUDA GPU.
"""
from __future__ import annotations

import os
import tempfile

from ra3.data.sequences import DecisionTokens, Document

# attribute paths from ``llm.llm_engine`` to the torch model, newest vLLM first
_MODEL_PATHS = (
    "model_executor.driver_worker.worker.model_runner.model",
    "model_executor.driver_worker.model_runner.model",
)


def _vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm  # noqa: PLC0415
    except ImportError as exc:
        raise ValueError("config field 'engine': 'vllm' needs the vllm package (pip install vllm) and a CUDA "
                         "GPU; use engine 'hf'") from exc
    return vllm


class VLLMGenerator:
    """Rollouts on a vLLM ``LLM`` built from the trainer's model (saved once to a temporary directory)."""

    def __init__(self, model, tokenizer, tokens: DecisionTokens, *, max_rationale_tokens: int,
                 temperature: float = 1.0, seed: int = 0, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.3, llm=None):
        vllm = _vllm()
        self.tokens = tokens
        self.max_rationale_tokens = max_rationale_tokens
        self.temperature = temperature
        self.tokens_processed = 0  # prompt + sampled tokens submitted, for tokens/s (cached ones included)
        self._SamplingParams = vllm.SamplingParams
        if llm is None:
            # vLLM loads from a directory; the trainer's model may exist only in memory (ra3-tiny, added tokens)
            self._dir = tempfile.TemporaryDirectory(prefix="ra3-vllm-")
            model.save_pretrained(self._dir.name)
            tokenizer.save_pretrained(self._dir.name)
            llm = vllm.LLM(model=self._dir.name, dtype=dtype, seed=seed, enable_prefix_caching=True,
                           gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=1)
        self.llm = llm

    def sync_weights(self, model) -> None:
        target = self.llm.llm_engine
        for path in _MODEL_PATHS:
            obj = target
            for name in path.split("."):
                obj = getattr(obj, name, None)
                if obj is None:
                    break
            if obj is not None and hasattr(obj, "load_weights"):
                obj.load_weights(weights=((k, v.detach()) for k, v in model.state_dict().items()))
                self.llm.reset_prefix_cache()
                return
        raise RuntimeError("cannot reach vLLM's model to load the trainer's weights: run vLLM with its engine "
                           "in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and tensor_parallel_size=1")

    def _sample(self, prompts: list[list[int]], seeds: list[int], **params) -> list[list[int]]:
        if not prompts:
            return []
        sampling = [self._SamplingParams(n=1, temperature=self.temperature, seed=s, **params) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
        result = [list(o.outputs[0].token_ids) for o in outs]
        self.tokens_processed += sum(len(p) for p in prompts) + sum(len(r) for r in result)
        return result

    def rollout(self, docs: list[Document], *, seed: int) -> list[dict[int, list[int]]]:
        tk = self.tokens
        prefix = [[tk.bos_id] for _ in docs]
        comments: list[dict[int, list[int]]] = [{} for _ in docs]
        for t in range(max((d.num_actions for d in docs), default=0)):
            active = [b for b, d in enumerate(docs) if d.num_actions > t]
            # one seed per (rollout seed, document slot, boundary, phase): reproducible, independent draws
            decided = self._sample([prefix[b] for b in active], [_seed(seed, b, t, 0) for b in active],
                                   max_tokens=1, allowed_token_ids=[tk.act_id, tk.think_id])
            thinking = [b for b, out in zip(active, decided) if out and out[0] == tk.think_id]
            for b in active:
                prefix[b].append(tk.think_id if b in thinking else tk.act_id)
            written = self._sample([prefix[b] for b in thinking], [_seed(seed, b, t, 1) for b in thinking],
                                   max_tokens=self.max_rationale_tokens, allowed_token_ids=list(tk.comment_ids),
                                   stop_token_ids=[tk.act_id])
            for b, out in zip(thinking, written):
                text = [i for i in out if i != tk.act_id][:self.max_rationale_tokens] + [tk.act_id]
                comments[b][t] = text
                prefix[b].extend(text)
            for b in active:
                prefix[b].extend(docs[b].action_ids[t])
        return comments


def _seed(seed: int, slot: int, boundary: int, phase: int) -> int:
    return (int(seed) * 1_000_003 + slot * 7919 + boundary * 31 + phase) & 0x7FFFFFFF


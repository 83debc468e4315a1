"""One ``Generator`` interface for sampling from a model, with two engines: Hugging Face ``generate`` and vLLM.
Eval and RLVR sample completions with ``generate``; RA3's E-step walks documents on the same engines
(``ra3.midtrain.rollout``: ``HFRollout`` / ``VLLMRollout``), and a trainer hands an engine its updated weights
with ``sync_weights``.

    gen = make_generator("ra3-tiny")                       # 'auto': vLLM when installed and a GPU is present
    outs = gen.generate(["def add(a, b):\\n"], n=4, temperature=0.8, max_new_tokens=64, stop=["\\ndef"])
    outs[0][0].text, outs[0][0].token_ids, outs[0][0].finish_reason

Both engines take the same prompts and return the same thing: per prompt, ``n`` ``Completion``s whose
``text`` is the decoded continuation (special tokens dropped), ``token_ids`` the sampled tokens (an EOS the
model emitted included, padding excluded) and ``finish_reason`` 'eos' | 'stop' | 'length'. Text is not cut at
the stop sequence by the HF engine (vLLM cuts it); callers post-process with ``ra3.eval.prompts``.
"""
from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

ENGINES = ("auto", "hf", "vllm")


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # 'eos' | 'stop' | 'length'


def _check_sampling(prompts, n, temperature, top_p, max_new_tokens, stop) -> tuple[list[str], list[str]]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a sequence of str, got {type(prompts).__name__}")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a sequence of str")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(stop, str):
        stop = [stop]
    stop = [s for s in (stop or ()) if s]
    if not all(isinstance(s, str) for s in stop):
        raise TypeError("stop must be a sequence of str")
    return list(prompts), stop


class Generator(ABC):
    """Samples ``n`` completions per prompt. ``tokenizer`` is the engine's (a Hugging Face tokenizer)."""

    engine: str
    tokenizer: object

    @abstractmethod
    def generate(self, prompts: Sequence[str], *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int = 256, stop: Sequence[str] = (), seed: int | None = None,
                 progress: bool = True) -> list[list[Completion]]:
        """[len(prompts)][n] completions. temperature 0 is greedy (the n samples are then identical)."""

    @abstractmethod
    def sync_weights(self, model) -> None:
        """Sample from ``model``'s current weights from now on (a trainer calls it after its updates)."""

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The prompt text of a chat conversation, ready for the assistant's answer."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("the model's tokenizer has no chat template; drop --chat for a base model")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _finish_reason(text: str, hit_eos: bool, stop: Sequence[str]) -> str:
    if hit_eos:
        return "eos"
    return "stop" if any(s in text for s in stop) else "length"


class HFGenerator(Generator):
    """Batched Hugging Face ``model.generate`` (CPU or GPU), left padding, stop strings, optional seed.

    batch_size: sequences per ``generate`` call (prompts per call = max(1, batch_size // n)).
    """

    engine = "hf"

    def __init__(self, model, tokenizer, *, batch_size: int = 16):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
            tokenizer.pad_token = tokenizer.eos_token
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: str = "float32", device: str = "cpu",
                        batch_size: int = 16, seed: int = 0) -> "HFGenerator":
        from ra3.models import load_model

        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device, seed=seed)
        return cls(model, tokenizer, batch_size=batch_size)

    def sync_weights(self, model) -> None:
        self.model = model  # the engine samples from the trainer's own model object

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        return {int(i) for i in ids}

    def generate(self, prompts, *, n=1, temperature=0.0, top_p=1.0, max_new_tokens=256, stop=(), seed=None,
                 progress=True):
        import torch
        from tqdm.auto import tqdm

        prompts, stop = _check_sampling(prompts, n, temperature, top_p, max_new_tokens, stop)
        if not prompts:
            return []
        greedy = temperature == 0
        per_prompt = 1 if greedy else n  # greedy samples are identical: generate once, repeat
        chunk = max(1, self.batch_size // per_prompt)
        # longest prompts first: batches of similar length waste less padding
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        eos_ids = self._eos_ids()
        pad_id = self.tokenizer.pad_token_id
        results: list[list[Completion] | None] = [None] * len(prompts)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=not greedy, num_return_sequences=per_prompt,
                      pad_token_id=pad_id, eos_token_id=sorted(eos_ids) or None)
        if not greedy:
            kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=self.tokenizer)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                batches = range(0, len(order), chunk)
                for start in tqdm(batches, desc="generating", disable=not progress or len(batches) < 2,
                                  dynamic_ncols=True):
                    idx = order[start:start + chunk]
                    enc = self.tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                         padding_side="left").to(device)
                    with torch.no_grad():
                        out = self.model.generate(**enc, **kwargs)
                    new = out[:, enc["input_ids"].shape[1]:].tolist()
                    for j, i in enumerate(idx):
                        rows = [self._completion(new[j * per_prompt + r], eos_ids, pad_id, stop)
                                for r in range(per_prompt)]
                        results[i] = rows * n if greedy else rows
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def _completion(self, ids: list[int], eos_ids: set[int], pad_id: int, stop) -> Completion:
        cut, hit_eos = len(ids), False
        for k, t in enumerate(ids):
            if t in eos_ids:
                cut, hit_eos = k + 1, True  # the EOS is an action the policy took: keep it
                break
        ids = ids[:cut]
        if not hit_eos:
            while ids and ids[-1] == pad_id:  # rows that finished on a stop string are padded
                ids.pop()
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(text, tuple(ids), _finish_reason(text, hit_eos, stop))


# attribute paths from ``llm.llm_engine`` to the torch model (for sync_weights), newest vLLM first
_MODEL_PATHS = (
    "model_executor.driver_worker.worker.model_runner.model",
    "model_executor.driver_worker.model_runner.model",
)


def require_vllm(*, in_process: bool = False):
    """The vllm module, or a ValueError naming the engine. ``in_process``: keep vLLM's engine core in this
    process (vLLM V1: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set before vLLM is imported), which ``sync_weights``
    needs to reach the model."""
    if in_process:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm  # noqa: PLC0415
    except ImportError as exc:
        raise ValueError("config field 'engine': 'vllm' needs the vllm package (pip install vllm) and a CUDA "
                         "GPU; use engine 'hf'") from exc
    return vllm


class VLLMGenerator(Generator):
    """vLLM offline engine (GPU), prefix caching on; same prompts and results as ``HFGenerator``.

    model: a name or path; or a trainer's torch model (saved once, with ``tokenizer``, to a temporary directory
    vLLM loads; the engine core then runs in this process with tensor parallel size 1, so ``sync_weights`` can
    load the trainer's weights in place). llm: an existing ``vllm.LLM`` to use instead of building one.
    """

    engine = "vllm"

    def __init__(self, model, *, tokenizer=None, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, llm=None):
        in_memory = not isinstance(model, (str, os.PathLike))
        vllm = require_vllm(in_process=in_memory)
        self.SamplingParams = vllm.SamplingParams
        if llm is None:
            if in_memory:  # vLLM loads from a directory; the trainer's model may exist only in memory
                self._dir = tempfile.TemporaryDirectory(prefix="ra3-vllm-")
                model.save_pretrained(self._dir.name)
                tokenizer.save_pretrained(self._dir.name)
                model, tensor_parallel_size = self._dir.name, 1
            kwargs = dict(model=str(model), dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                          tensor_parallel_size=tensor_parallel_size, enable_prefix_caching=True)
            if max_model_len is not None:
                kwargs["max_model_len"] = max_model_len
            llm = vllm.LLM(**kwargs)
        self.llm = llm
        self.tokenizer = tokenizer if tokenizer is not None else self.llm.get_tokenizer()

    def sync_weights(self, model) -> None:
        """Load ``model``'s weights into the vLLM model in place and reset the prefix cache (its KV blocks were
        computed with the old weights)."""
        for path in _MODEL_PATHS:
            obj = self.llm.llm_engine
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

    def generate(self, prompts, *, n=1, temperature=0.0, top_p=1.0, max_new_tokens=256, stop=(), seed=None,
                 progress=True):
        from vllm import SamplingParams

        prompts, stop = _check_sampling(prompts, n, temperature, top_p, max_new_tokens, stop)
        if not prompts:
            return []
        greedy = temperature == 0
        params = SamplingParams(n=1 if greedy else n, temperature=float(temperature),
                                top_p=1.0 if greedy else float(top_p), max_tokens=max_new_tokens,
                                stop=stop or None, seed=seed)
        outputs = self.llm.generate(prompts, params, use_tqdm=progress)
        results = []
        for request in outputs:
            rows = []
            for o in request.outputs:
                if o.finish_reason == "length":
                    reason = "length"
                else:  # 'stop': a stop string (stop_reason is the str) or EOS / a stop token id
                    reason = "stop" if isinstance(o.stop_reason, str) else "eos"
                rows.append(Completion(o.text, tuple(o.token_ids), reason))
            results.append(rows * n if greedy else rows)
        return results


def vllm_available() -> bool:
    """vLLM is installed and a CUDA GPU is visible (checked without initialising CUDA in this process)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def make_generator(model: str, *, engine: str = "auto", dtype: str = "float32", device: str | None = None,
                   batch_size: int = 16, seed: int = 0, **vllm_kwargs) -> Generator:
    """A generator for ``model`` (a name, a path or 'ra3-tiny').

    engine: 'auto' (vLLM when installed and a GPU is present, else Hugging Face), 'hf' or 'vllm'.
    device: for the HF engine (default 'cuda' when available, else 'cpu').
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "auto":
        engine = "vllm" if vllm_available() else "hf"
    if engine == "vllm":
        if not vllm_available():
            raise ValueError("engine 'vllm' needs the vllm package and a CUDA GPU; use engine='hf'")
        from ra3.models import TINY_NAME, build_tiny

        path = str(build_tiny(seed)) if str(model) == TINY_NAME else str(model)
        return VLLMGenerator(path, dtype="auto" if dtype == "float32" else dtype, seed=seed, **vllm_kwargs)
    if vllm_kwargs:
        raise ValueError(f"options {sorted(vllm_kwargs)} apply to engine 'vllm' only")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return HFGenerator.from_pretrained(model, dtype=dtype, device=device, batch_size=batch_size, seed=seed)

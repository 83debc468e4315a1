"""The E-step's walk on the vLLM engine (``ra3.generation.VLLMGenerator``): ``rollout.HFRollout``'s latent walk
on vLLM's public API.

A rollout walks its documents in rounds. A round builds the sequence of every open document as annotated so far
(``build_sequences``: the tokenizer's own ids) and submits, for every decision point after the document's cursor,
one request: ``prompt_token_ids = ids[:p]`` (p: the position where the comment and the expert paths part ways),
``max_tokens=1``, the model's full distribution, a seed of its own. The decision is a think iff the sampled token
is in the decision's set (``CommentVocab.sets``). That is exactly the policy ``scoring`` scores: a draw from the
full distribution lands in the set with probability q(think) (the set's summed probability), and given that it
lands there it is distributed as HFGenerator's first comment token (the distribution restricted to the set), so
it is kept as the comment's first token. A document thinks at its first think in action order; the round's later
draws of that document are dropped (they are independent of the earlier ones, so dropping them biases nothing).

For a think a second request continues from ``ids[:p] + [that token]`` (+ the rest of "<indent>#", forced, when
the token was whitespace only) with ``allowed_token_ids`` = every comment-usable id (special and added tokens
masked out, as scored), ``stop_token_ids`` = every token holding a newline and ``max_tokens =
max_rationale_tokens``. The comment is the text after the first "#" up to the newline; without a newline within
``max_rationale_tokens`` tokens it is truncated (the closing newline is then forced, as in HFGenerator). The
document is annotated with it and the next round re-submits the grown prefix: with ``enable_prefix_caching``
vLLM reuses the KV blocks it has computed already, so a request costs little more than its new tokens.

``sync_weights`` (the engine's) loads the trainer's weights into the vLLM model in place and resets the prefix
cache (its KV blocks were computed with the old weights). That reaches into vLLM's engine, which needs the engine
core in this process and one GPU (tensor parallel size 1). Requires the ``vllm`` package and a CUDA GPU.
"""
from __future__ import annotations

import hashlib

from ra3.data.sequences import Comment, CommentVocab, Decision, Document, Sequence, build_sequences
from ra3.generation import VLLMGenerator, require_vllm

_DECIDE, _WRITE = 0, 1  # request phases, part of each request's seed
__all__ = ["VLLMRollout", "require_vllm"]


class VLLMRollout:
    """Rollouts on the vLLM engine, built from the trainer's model (or on ``llm`` when given). Same contract as
    ``rollout.HFRollout``: ``rollout(docs, seed=...)`` returns, per document, action index -> Comment for every
    think; deterministic for a seed and the same weights."""

    def __init__(self, model, tokenizer, vocab: CommentVocab, *, max_rationale_tokens: int,
                 temperature: float = 1.0, seed: int = 0, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.3, llm=None):
        self.engine = VLLMGenerator(model, tokenizer=tokenizer, dtype=dtype, seed=seed,
                                    gpu_memory_utilization=gpu_memory_utilization, llm=llm)
        self.llm = self.engine.llm
        self.vocab = vocab
        self.max_rationale_tokens = max_rationale_tokens
        self.temperature = temperature
        self.tokens_processed = 0  # prompt + sampled tokens submitted, for tokens/s (cached ones included)
        # what a comment token may be (the masked vocabulary scoring uses) and what ends a comment line
        self._comment_ids = [i for i in range(vocab.vocab_size) if i not in vocab.excluded]
        self._newline_ids = sorted(vocab.newline)
        self._sets: dict[int, frozenset[int]] = {}

    def sync_weights(self, model) -> None:
        self.engine.sync_weights(model)

    def rollout(self, docs: list[Document], *, seed: int) -> list[dict[int, Comment]]:
        comments: list[dict[int, Comment]] = [{} for _ in docs]
        cursor = [0] * len(docs)
        open_rows = [b for b, d in enumerate(docs) if d.num_actions]
        rnd = 0
        while open_rows:
            seqs = build_sequences([docs[b] for b in open_rows], self.vocab, [comments[b] for b in open_rows])
            # one single-token draw at every decision point after each document's cursor (decisions ascend)
            pending = [(b, s, d) for b, s in zip(open_rows, seqs) for d in s.decisions if d.action >= cursor[b]]
            drawn = self._generate([s.input_ids[:d.position] for _, s, d in pending],
                                   [_seed(seed, b, rnd, d.action, _DECIDE) for b, _, d in pending], max_tokens=1)
            thinking: dict[int, tuple[Sequence, Decision, int]] = {}
            for (b, s, d), (out, _) in zip(pending, drawn):
                if b not in thinking and out and out[0] in self._decision_set(d.set_id):
                    thinking[b] = (s, d, out[0])
            for b in open_rows:
                if b not in thinking:
                    cursor[b] = docs[b].num_actions
            for b, comment in self._write(thinking, seed, rnd).items():
                action = thinking[b][1].action
                comments[b][action] = comment
                cursor[b] = action + 1
            open_rows = [b for b in open_rows if cursor[b] < docs[b].num_actions]
            rnd += 1
        return comments

    def _decision_set(self, set_id: int) -> frozenset[int]:
        if set_id not in self._sets:
            self._sets[set_id] = frozenset(self.vocab.sets[set_id])
        return self._sets[set_id]

    def _write(self, thinking: dict[int, tuple[Sequence, Decision, int]], seed: int, rnd: int) -> dict[int, Comment]:
        """The comment of every thinking document (b -> Comment), one request each."""
        vocab = self.vocab
        done: dict[int, Comment] = {}
        rows, openings, prompts, seeds = [], [], [], []
        for b, (s, d, first) in thinking.items():
            opening = self.vocab.opening(d.set_id, first)
            closed = next((j for j, t in enumerate(opening) if t in vocab.newline), None)
            if closed is not None:  # the opening tokens closed the line themselves
                done[b] = vocab.comment(opening[:closed + 1], truncated=False)
            elif self.max_rationale_tokens < 1:
                done[b] = vocab.comment(opening, truncated=True)
            else:
                rows.append(b)
                openings.append(opening)
                prompts.append(s.input_ids[:d.position] + opening)
                seeds.append(_seed(seed, b, rnd, d.action, _WRITE))
        written = self._generate(prompts, seeds, max_tokens=self.max_rationale_tokens,
                                 allowed_token_ids=self._comment_ids, stop_token_ids=self._newline_ids)
        for b, opening, (out, finish) in zip(rows, openings, written):
            end = next((j for j, t in enumerate(out) if t in vocab.newline), None)
            if end is not None:  # the newline is in the output (vLLM keeps a stop token in token_ids)
                done[b] = vocab.comment(opening + out[:end + 1], truncated=False)
            elif finish == "stop":  # stopped on a newline that the output left out
                done[b] = vocab.comment(opening + out, truncated=False)
            else:  # no newline within max_rationale_tokens: the line is closed by force
                done[b] = vocab.comment(opening + out[:self.max_rationale_tokens], truncated=True)
        return done

    def _generate(self, prompts: list[list[int]], seeds: list[int], **params) -> list[tuple[list[int], str | None]]:
        """(sampled token ids, finish reason) per prompt."""
        if not prompts:
            return []
        sampling = [self.engine.SamplingParams(n=1, temperature=self.temperature, seed=s, **params) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
        result = [(list(o.outputs[0].token_ids), getattr(o.outputs[0], "finish_reason", None)) for o in outs]
        self.tokens_processed += sum(len(p) for p in prompts) + sum(len(r) for r, _ in result)
        return result


def _seed(seed: int, slot: int, rnd: int, action: int, phase: int) -> int:
    """A request's seed: a 63-bit hash of (rollout seed, document slot, round, action, phase), so no two requests
    of a rollout share their draws (a linear mix of the parts collides) and a rollout seed repeats them all."""
    digest = hashlib.blake2b(f"{int(seed)}/{slot}/{rnd}/{action}/{phase}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF

"""Rollouts over latents: walk each document, decide act/think at every decision point with the model's own
probability of starting a comment line there, write the comment on think; the expert lines are never sampled.

``LatentWalk`` is what the E-step needs of an engine; ``HFRollout`` walks on the Hugging Face engine of
``ra3.generation`` (``VLLMRollout`` in ``rollout_vllm`` on its vLLM engine). ``HFRollout`` walks a batch of documents
in rounds. A round runs one forward pass over every open document as annotated so far (the comments written,
the expert text after them): with no new comment, that one pass gives q(think) at every later decision point,
so the decisions are drawn in order up to the first think. There the comment is generated, continuing from the
round's KV cache at the position where the comment and expert paths part ways (each row attends to its own
prefix only; positions after it are masked), token by token from the model's distribution with special and
added tokens masked out, until a token holding a newline ends the line or ``max_rationale_tokens`` content
tokens are written (the line is then closed by force). The document is annotated with that comment and the next
round continues after it. Rounds per batch = the most thinks of any row + 1.

The distributions are the ones ``scoring`` scores: q(think) is the decision set's summed probability, the first
comment token is drawn from the decision set, the rest from the masked vocabulary.
"""
from __future__ import annotations

import inspect
from typing import Protocol

import torch

from ra3.data.sequences import Comment, CommentVocab, Document, build_sequences
from ra3.generation import HFGenerator
from ra3.midtrain.batch import pack
from ra3.midtrain.scoring import PolicyHead, output_head


class LatentWalk(Protocol):
    """Samples the latents (act/think and comments) of documents under the current policy."""

    def rollout(self, docs: list[Document], *, seed: int) -> list[dict[int, Comment]]:
        """One rollout per document (repeat a document for several): action index -> Comment for every think;
        deterministic for a seed and the same weights."""
        ...

    def sync_weights(self, model) -> None:
        """Take the trainer's current weights (the engine's ``sync_weights``)."""
        ...


class HFRollout:
    """Batched rollouts on the Hugging Face engine (``ra3.generation.HFGenerator``: the trainer's own causal LM)
    with its KV cache (the default)."""

    def __init__(self, model, vocab: CommentVocab, *, max_rationale_tokens: int, temperature: float = 1.0,
                 batch_size: int = 64, progress: bool = False, backend: str = "auto"):
        self.engine = HFGenerator(model, vocab.tokenizer, batch_size=batch_size)
        self.vocab = vocab
        self.max_rationale_tokens = max_rationale_tokens
        self.temperature = temperature
        self.batch_size = batch_size
        self.progress = progress
        self.backend = backend
        self.tokens_processed = 0  # tokens fed (round passes and comment steps), for tokens/s
        self._head = None

    @property
    def model(self):
        return self.engine.model

    def sync_weights(self, model) -> None:
        self.engine.sync_weights(model)

    def rollout(self, docs: list[Document], *, seed: int) -> list[dict[int, Comment]]:
        out = []
        starts = range(0, len(docs), self.batch_size)
        if self.progress and len(starts) > 1:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="rollouts", unit="batch", leave=False)
        for i, start in enumerate(starts):
            gen = torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + i)
            out.extend(self._walk(docs[start:start + self.batch_size], gen))
        return out

    @torch.no_grad()
    def _walk(self, docs: list[Document], gen: torch.Generator) -> list[dict[int, Comment]]:
        weight, bias = output_head(self.model)
        if self._head is None or self._head.device != weight.device:
            self._head = PolicyHead(self.vocab, weight.device)
        comments: list[dict[int, Comment]] = [{} for _ in docs]
        cursor = [0] * len(docs)
        open_rows = list(range(len(docs)))
        while open_rows:
            seqs = build_sequences([docs[b] for b in open_rows], self.vocab, [comments[b] for b in open_rows])
            batch = pack(seqs, self.vocab.pad_id, weight.device)
            hidden, cache = self._forward(batch)
            # q(think) at every decision point after each row's cursor, drawn in order up to the first think
            pending = [(i, d) for i, (b, s) in enumerate(zip(open_rows, seqs)) for d in s.decisions
                       if d.action >= cursor[b]]
            thinking = {}
            if pending:
                rows = torch.tensor([i for i, _ in pending], device=weight.device)
                pos = torch.tensor([d.position for _, d in pending], device=weight.device)
                h = hidden[rows, pos - 1]
                targets = batch.input_ids[rows, pos]
                sets = torch.tensor([d.set_id for _, d in pending], device=weight.device)
                q = self._head.think_logq(h, weight, bias, targets, sets, temperature=self.temperature,
                                          backend=self.backend).exp().cpu()
                draws = torch.rand(len(pending), generator=gen)
                for j, (i, d) in sorted(enumerate(pending), key=lambda x: (x[1][0], x[1][1].action)):
                    if i not in thinking and bool(draws[j] < q[j]):
                        thinking[i] = (d, h[j])
            for i, b in enumerate(open_rows):
                if i not in thinking:
                    cursor[b] = docs[b].num_actions
            written = self._write(thinking, hidden, cache, batch, weight, bias, gen) if thinking else {}
            for i, comment in written.items():
                b = open_rows[i]
                comments[b][thinking[i][0].action] = comment
                cursor[b] = thinking[i][0].action + 1
            open_rows = [b for b in open_rows if cursor[b] < docs[b].num_actions]
        return comments

    def _forward(self, batch):
        from transformers import DynamicCache

        decoder = self.model.get_decoder()
        cache = DynamicCache()
        # transformers >= 5.2x names the KV-cache argument `cache`; older versions `past_key_values`
        cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        self._cache_arg = cache_arg
        h = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=True,
                    **{cache_arg: cache}).last_hidden_state
        self.tokens_processed += batch.num_tokens
        return h, cache

    def _write(self, thinking: dict, hidden, cache, batch, weight, bias, gen) -> dict[int, Comment]:
        """Generate the comment of every thinking row from the round's cache; returns row -> Comment."""
        vocab, head, T = self.vocab, self._head, self.temperature
        n, width = batch.input_ids.shape
        device = weight.device
        decoder = self.model.get_decoder()
        comment_bias = head.comment_bias(weight, bias)
        # each thinking row attends to its tokens before the decision position only
        mask = torch.zeros(n, width, dtype=torch.long, device=device)
        mask[:, 0] = 1
        queue: dict[int, list[int]] = {}
        fed: dict[int, list[int]] = {}
        starts = torch.zeros(n, dtype=torch.long, device=device)
        for i, (d, h) in thinking.items():
            mask[i, :d.position] = 1
            starts[i] = d.position
            ids = head.set_ids(d.set_id)
            z = h @ weight[ids].T
            if bias is not None:
                z = z + bias[ids]
            first = int(ids[torch.multinomial(torch.softmax(z.float().cpu() / T, -1), 1, generator=gen)])
            queue[i] = vocab.opening(d.set_id, first)
            fed[i] = []
        sampled = {i: 0 for i in thinking}
        done: dict[int, Comment] = {}
        logits = None
        for step in range(self.max_rationale_tokens + 64):
            writing = [i for i in thinking if i not in done]
            if not writing:
                break
            nxt = torch.full((n,), vocab.pad_id, dtype=torch.long)
            # the rows that sample this step, their logits moved to the host in one transfer (sampling stays on the
            # CPU generator, so a run draws the same tokens on any device)
            sampling = [i for i in writing if not queue[i] and sampled[i] < self.max_rationale_tokens]
            host = dict(zip(sampling, logits[sampling].float().cpu())) if sampling else {}
            for i in writing:
                if queue[i]:
                    nxt[i] = queue[i].pop(0)
                    continue
                if sampled[i] >= self.max_rationale_tokens:
                    done[i] = vocab.comment(fed[i], truncated=True)
                    continue
                probs = torch.softmax(host[i] / T, -1)
                tok = int(torch.multinomial(probs, 1, generator=gen))
                sampled[i] += 1
                if tok in vocab.newline:
                    done[i] = vocab.comment(fed[i] + [tok], truncated=False)
                    continue
                nxt[i] = tok
            active = torch.zeros(n, dtype=torch.bool)
            for i in writing:
                if i not in done:
                    fed[i].append(int(nxt[i]))
                    active[i] = True
                    if int(nxt[i]) in vocab.newline:  # the decision token or a forced one closed the line
                        done[i] = vocab.comment(fed[i], truncated=False)
            if not bool(active.any()):
                continue
            active = active.to(device)
            mask = torch.cat([mask, active.long()[:, None]], 1)
            position = (starts + step)[:, None]
            out = decoder(input_ids=nxt.to(device)[:, None], attention_mask=mask, position_ids=position,
                          use_cache=True, **{self._cache_arg: cache}).last_hidden_state[:, -1]
            self.tokens_processed += int(active.sum())
            logits = out @ weight.T + comment_bias
        for i in thinking:
            if i not in done:
                done[i] = vocab.comment(fed[i], truncated=True)
        return done


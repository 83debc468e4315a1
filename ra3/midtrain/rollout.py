"""Rollouts over latents: walk each document line by line, sample act/think at every boundary, write a comment
on think, then append the expert line as forced tokens (never sampled).

``Generator`` is the engine interface; ``HFGenerator`` is the Hugging Face engine: it walks a batch of documents
in lock-step with one KV cache kept across forced and sampled spans. Rows whose span is shorter than the
batch's are padded with masked slots, and every row keeps its own position ids, so the cache holds holes but
each row sees exactly its own tokens.

The sampled distributions are the ones ``scoring`` scores: the decision is a two-way softmax over the "\\n"
(act) and "\\n#" (think) logits; a comment token is drawn from the comment vocabulary (no newline inside, the
closing "\\n" ends it), and after ``max_rationale_tokens`` content tokens the closing newline is forced.
"""
from __future__ import annotations

import inspect
from typing import Protocol

import torch

from ra3.data.sequences import DecisionTokens, Document


class Generator(Protocol):
    """Samples the latents (act/think and comments) of documents under the current policy."""

    def rollout(self, docs: list[Document], *, seed: int) -> list[dict[int, list[int]]]:
        """One rollout per document (repeat a document for several): action index -> comment token ids
        (ending with the newline token) for every think; deterministic for a seed and the same weights."""
        ...

    def sync_weights(self, model) -> None:
        """Take the trainer's current weights (a no-op for engines that share the model object)."""
        ...


class HFGenerator:
    """Batched rollouts with a Hugging Face causal LM and its KV cache (the default engine)."""

    def __init__(self, model, tokens: DecisionTokens, *, max_rationale_tokens: int, temperature: float = 1.0,
                 batch_size: int = 64, progress: bool = False):
        self.model = model
        self.tokens = tokens
        self.max_rationale_tokens = max_rationale_tokens
        self.temperature = temperature
        self.batch_size = batch_size
        self.progress = progress
        self.tokens_processed = 0  # forced + sampled tokens fed, for tokens/s

    def sync_weights(self, model) -> None:
        self.model = model

    def rollout(self, docs: list[Document], *, seed: int) -> list[dict[int, list[int]]]:
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
    def _walk(self, docs: list[Document], gen: torch.Generator) -> list[dict[int, list[int]]]:
        from transformers import DynamicCache

        model, tk = self.model, self.tokens
        device = model.get_output_embeddings().weight.device
        weight = model.get_output_embeddings().weight
        bias = getattr(model.get_output_embeddings(), "bias", None)
        decoder = model.get_decoder()
        # transformers >= 5.2x names the KV-cache argument `cache`; older versions `past_key_values`
        cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        dec_w = weight[[tk.act_id, tk.think_id]]
        dec_b = None if bias is None else bias[[tk.act_id, tk.think_id]]
        com_ids = torch.tensor(tk.comment_ids, device=device)
        com_w = weight[com_ids]
        com_b = None if bias is None else bias[com_ids]
        B = len(docs)
        cache = DynamicCache()
        state = {"mask": torch.zeros(B, 0, dtype=torch.long, device=device),
                 "pos": torch.zeros(B, dtype=torch.long, device=device),
                 "last": None}

        def feed(ids: torch.Tensor, valid: torch.Tensor) -> None:
            """Append ids [B, k] (valid [B, k] bool, a prefix per row) to every row; keep each row's last hidden."""
            valid = valid.to(device)
            state["mask"] = torch.cat([state["mask"], valid.long()], 1)
            position_ids = (state["pos"][:, None] + torch.cumsum(valid.long(), 1) - 1).clamp(min=0)
            h = decoder(input_ids=ids.to(device), attention_mask=state["mask"], position_ids=position_ids,
                        use_cache=True, **{cache_arg: cache}).last_hidden_state
            counts = valid.long().sum(1)
            state["pos"] = state["pos"] + counts
            self.tokens_processed += int(counts.sum())
            last = h[torch.arange(B, device=device), (counts - 1).clamp(min=0)]
            if state["last"] is None:
                state["last"] = last
            else:
                state["last"] = torch.where((counts > 0)[:, None], last, state["last"])

        def sample(logits: torch.Tensor) -> torch.Tensor:
            probs = torch.softmax(logits.float() / self.temperature, dim=-1)
            return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(device)

        def linear(h, w, b):
            out = h @ w.T
            return out if b is None else out + b

        comments: list[dict[int, list[int]]] = [{} for _ in docs]
        n_actions = torch.tensor([d.num_actions for d in docs], device=device)
        feed(torch.full((B, 1), tk.bos_id), torch.ones(B, 1, dtype=torch.bool))
        for t in range(int(n_actions.max())):
            active = n_actions > t
            think = (sample(linear(state["last"], dec_w, dec_b)) == 1) & active
            sep = torch.where(think, tk.think_id, tk.act_id)
            line = [docs[b].action_ids[t] if t < docs[b].num_actions else [] for b in range(B)]
            if not bool(think.any()):
                # no comment anywhere: feed the newline and the expert line in one forced span
                self._feed_ragged(feed, [([tk.act_id] + line[b]) if active[b] else [] for b in range(B)],
                                  tk.pad_id)
                continue
            feed(sep[:, None], active[:, None])
            writing = think.clone()
            for j in range(self.max_rationale_tokens + 1):
                if j == self.max_rationale_tokens:  # the closing newline is forced
                    nxt = torch.full((B,), tk.act_id, device=device)
                else:
                    nxt = com_ids[sample(linear(state["last"], com_w, com_b))]
                for b in writing.nonzero().flatten().tolist():
                    comments[b].setdefault(t, []).append(int(nxt[b]))
                feed(torch.where(writing, nxt, tk.pad_id)[:, None], writing[:, None])
                writing = writing & (nxt != tk.act_id)
                if not bool(writing.any()):
                    break
            self._feed_ragged(feed, [line[b] if active[b] else [] for b in range(B)], tk.pad_id)
        return comments

    @staticmethod
    def _feed_ragged(feed, rows: list[list[int]], pad_id: int) -> None:
        width = max(len(r) for r in rows)
        if width == 0:
            return
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        valid = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            valid[b, :len(r)] = True
        feed(ids, valid)

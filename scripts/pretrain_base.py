"""Pretrain ra3's embedded base model, ``ra3-tiny``, on Python from the standard library (CPU, deterministic).

1. A byte-level BPE tokenizer (``train_code_tokenizer``, qwen2 style, ``--vocab-size`` entries) trained on the
   pretraining set ``ra3/data/pretrain_corpus.jsonl.gz`` (see ``scripts/make_corpus.py``).
2. A Llama of ``TinyConfig``'s shape trained from scratch by next-token prediction on that set: every document is
   ``[bos] + tokenizer(text) + [eos]`` (cut to ``--max-len``), batches of about ``--batch-tokens`` padded tokens
   from documents of similar length, AdamW, linear warm-up then cosine decay to ``--min-lr-ratio`` x the peak.
   Fixed seeds, documents in file order then shuffled per epoch by a seeded generator, ``--threads`` (1) CPU
   threads: the same command gives the same weights on the same machine and library versions.
3. Held-out loss on the mid-training default corpus ``ra3/data/default_corpus.jsonl`` (module-disjoint from the
   pretraining set), and how often the model starts a comment line there: at each line boundary, the probability
   of the tokens that begin "<indentation>#" (the line's own indentation) against the share of lines that are
   comments; plus samples after ``def add(a, b):`` and after an indented code line.
4. ``--out`` (default ``ra3/models/ra3-tiny``): a ``save_pretrained`` directory (config.json, model.safetensors,
   tokenizer files) with ``PRETRAIN.md``: the command, date, steps, tokens seen, losses, the comment measures.

    python scripts/pretrain_base.py                                   # the shipped model (see its PRETRAIN.md)
    python scripts/pretrain_base.py --steps 50 --out /tmp/tiny-check  # a quick run
"""
from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer's thread pool, too, stays on one core

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from ra3.data.corpus import DEFAULT_CORPUS_PATH, PRETRAIN_CORPUS_PATH, comment_shares, load_code_corpus  # noqa: E402
from ra3.data.tokenizer import train_code_tokenizer  # noqa: E402
from ra3.models.tiny import TINY_DIR, TinyConfig  # noqa: E402

COMMENT_PROMPTS = ("def add(a, b):\n",
                   "def parse_header(self, line):\n    name, _, value = line.partition(':')\n",
                   "def read_config(path):\n    with open(path) as f:\n        data = f.read()\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=TINY_DIR)
    p.add_argument("--steps", type=int, default=880)
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per batch (about)")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per document, bos and eos included")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=TinyConfig.vocab_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-docs", type=int, default=256, help="held-out documents in the periodic evaluations")
    p.add_argument("--comment-lines", type=int, default=200, help="held-out line boundaries in the comment measure")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data and batches
def encode(tokenizer, texts, max_len):
    eos = tokenizer.eos_token_id
    return [(ids + [eos])[:max_len] for ids in tokenizer(texts)["input_ids"]]  # the tokenizer puts bos in front


def batches(seqs, batch_tokens, seed):
    """Endless batches of sequence indices: per epoch a seeded shuffle, windows of 64 batches' worth of documents
    sorted by length and cut into batches of at most ``batch_tokens`` padded tokens, the batches shuffled."""
    rng = random.Random(seed)
    order = list(range(len(seqs)))
    mean_len = sum(map(len, seqs)) / len(seqs)
    window = max(64, int(64 * batch_tokens / mean_len))
    while True:
        rng.shuffle(order)
        epoch = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w:w + window], key=lambda i: len(seqs[i]))
            batch, longest = [], 0
            for i in chunk:
                n = len(seqs[i])
                if batch and max(longest, n) * (len(batch) + 1) > batch_tokens:
                    epoch.append(batch)
                    batch, longest = [], 0
                batch.append(i)
                longest = max(longest, n)
            if batch:
                epoch.append(batch)
        rng.shuffle(epoch)
        yield from epoch


def collate(seqs, idx, pad_id):
    longest = max(len(seqs[i]) for i in idx)
    input_ids = torch.full((len(idx), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), longest), dtype=torch.long)
    for row, i in enumerate(idx):
        input_ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
        mask[row, :len(seqs[i])] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return input_ids, mask, labels


@torch.no_grad()
def mean_loss(model, seqs, pad_id, batch_tokens):
    """Token-weighted mean next-token loss (nats) over ``seqs``."""
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and len(seqs[order[end]]) * (end + 1 - start) <= batch_tokens:
            end += 1
        input_ids, mask, labels = collate(seqs, order[start:end], pad_id)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        total += nll.item()
        count += (targets != -100).sum().item()
        start = end
    model.train()
    return total / count


# ------------------------------------------------------------------------------------------- comment measures
@torch.no_grad()
def comment_probability(model, tokenizer, texts, max_lines):
    """Over the first ``max_lines`` non-blank lines (after a document's first) of ``texts``: the mean probability
    the model gives to starting the line as a comment, and the share of those lines that are comments.

    At a line whose first non-blank character is at ``p``: the token holding ``p`` starts at ``o`` (after the
    shared context, e.g. "):\\n" and "   "); q = the summed probability, after the tokens before it, of the
    vocabulary tokens whose text starts with ``text[o:p] + "#"`` (e.g. " #", " # "). Multi-token paths to "#"
    (a lone " " then "#") are not counted: q is a slight underestimate."""
    model.eval()
    vocab = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    masks: dict[str, torch.Tensor] = {}
    qs, is_comment = [], []
    for text in texts:
        enc = tokenizer(text, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        probs = model(input_ids=ids).logits[0].float().softmax(-1)
        offsets = enc["offset_mapping"]
        line_start = 0
        for n, line in enumerate(text.split("\n")):
            start, line_start = line_start, line_start + len(line) + 1
            if n == 0 or not line.strip():
                continue
            p = start + len(line) - len(line.lstrip())
            k = next(j for j, (a, b) in enumerate(offsets) if a <= p < b)
            target = text[offsets[k][0]:p] + "#"
            if target not in masks:
                masks[target] = torch.tensor([v.startswith(target) for v in vocab])
            qs.append(probs[k - 1][masks[target]].sum().item())  # position k - 1 predicts token k (bos is token 0)
            is_comment.append(line.lstrip().startswith("#"))
            if len(qs) >= max_lines:
                model.train()
                return sum(qs) / len(qs), sum(is_comment) / len(is_comment), len(qs)
    model.train()
    return sum(qs) / len(qs), sum(is_comment) / len(is_comment), len(qs)


@torch.no_grad()
def samples(model, tokenizer, prompt, n, max_new_tokens, seed, temperature=0.8):
    """Greedy (n=0) or n sampled continuations of ``prompt``, as text (prompt excluded)."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    torch.manual_seed(seed)
    kwargs = dict(do_sample=False) if n == 0 else dict(do_sample=True, temperature=temperature, top_k=0,
                                                         num_return_sequences=n)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
    return [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]


def _lines(text, k):
    return text.split("\n")[:k]


# ----------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    command = " ".join(["python scripts/pretrain_base.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])])

    # data and tokenizer
    train_texts = load_code_corpus(PRETRAIN_CORPUS_PATH)
    heldout_texts = load_code_corpus(DEFAULT_CORPUS_PATH)
    tokenizer = train_code_tokenizer(train_texts, args.vocab_size, style="qwen2")
    train = encode(tokenizer, train_texts, args.max_len)
    heldout = encode(tokenizer, heldout_texts, args.max_len)
    train_tokens = sum(map(len, train))
    print(f"pretraining set: {len(train):,} documents, {train_tokens:,} tokens "
          f"({sum(map(len, train_texts)) / (train_tokens - 2 * len(train)):.2f} chars/token); held out: "
          f"{len(heldout):,} documents, {sum(map(len, heldout)):,} tokens; tokenizer {len(tokenizer)} entries "
          f"({time.time() - t_start:.0f} s)", flush=True)

    # model and optimizer
    shape = TinyConfig(vocab_size=len(tokenizer))
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(shape.llama_config(tokenizer))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    # training
    eval_set = heldout[:args.eval_docs]
    pad_id = tokenizer.pad_token_id
    stream = batches(train, args.batch_tokens, args.seed)
    curve, evals = [], []
    tokens_seen, window_loss, window_tokens = 0, 0.0, 0
    t_train = time.time()
    print(f"model: {n_params:,} parameters; {args.steps} steps of ~{args.batch_tokens} padded tokens", flush=True)
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        input_ids, mask, labels = collate(train, next(stream), pad_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n_targets = (labels[:, 1:] != -100).sum().item()
        tokens_seen += int(mask.sum().item())
        window_loss += loss.item() * n_targets
        window_tokens += n_targets
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.time() - t_train
            curve.append((step + 1, window_loss / window_tokens, tokens_seen))
            print(f"step {step + 1:5d}  loss {window_loss / window_tokens:.4f}  lr {lr_at(step):.2e}  "
                  f"tokens {tokens_seen:,}  {tokens_seen / elapsed:,.0f} tok/s  {elapsed:.0f} s", flush=True)
            window_loss, window_tokens = 0.0, 0
        if (step + 1) % args.eval_every == 0 and step + 1 != args.steps:
            evals.append((step + 1, mean_loss(model, eval_set, pad_id, 4 * args.batch_tokens)))
            print(f"step {step + 1:5d}  held-out loss {evals[-1][1]:.4f} ({len(eval_set)} documents)", flush=True)
    train_seconds = time.time() - t_train

    # final measures
    model.eval()
    final_train = mean_loss(model, train[:len(heldout)], pad_id, 4 * args.batch_tokens)
    final_heldout = mean_loss(model, heldout, pad_id, 4 * args.batch_tokens)
    print(f"final: train loss {final_train:.4f} (first {len(heldout)} pretraining documents), held-out loss "
          f"{final_heldout:.4f} ({len(heldout)} documents)", flush=True)
    q_small, share_small, n_small = comment_probability(model, tokenizer, heldout_texts, args.comment_lines)
    q_big, share_big, n_big = comment_probability(model, tokenizer, heldout_texts, 10 * args.comment_lines)
    corpus = comment_shares(heldout_texts)
    print(f"comment lines: model q {q_small:.4f} vs share {share_small:.4f} over {n_small} held-out lines; "
          f"q {q_big:.4f} vs share {share_big:.4f} over {n_big}", flush=True)
    greedy = samples(model, tokenizer, COMMENT_PROMPTS[0], 0, 64, args.seed)[0]
    sampled = {prompt: samples(model, tokenizer, prompt, 20, 48, args.seed + 1) for prompt in COMMENT_PROMPTS}
    with_comment = {prompt: sum(any(line.lstrip().startswith("#") for line in _lines(s, 3)) for s in outs)
                    for prompt, outs in sampled.items()}
    print("greedy after 'def add(a, b):':\n" + greedy, flush=True)
    for prompt, outs in sampled.items():
        print(f"--- {with_comment[prompt]}/20 samples write a comment line within 3 lines after {prompt!r}; two:")
        print(outs[0] + "\n---\n" + outs[1], flush=True)

    # save
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.model_max_length = shape.max_position_embeddings
    tokenizer.save_pretrained(args.out)
    # The class any transformers >= 4.45 resolves (5.x writes its own "TokenizersBackend", unknown to 4.x).
    tok_config = json.loads((args.out / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (args.out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    size = (args.out / "model.safetensors").stat().st_size
    curve_rows = "\n".join(f"| {s} | {l:.4f} | {t:,} |" for s, l, t in curve)
    eval_rows = "\n".join(f"| {s} | {l:.4f} |" for s, l in evals + [(args.steps, final_heldout)])
    sample_text = "\n\n".join(f"after `{p!r}` ({with_comment[p]}/20 write a comment line within 3 lines), "
                              f"the first sample:\n```python\n{p}{sampled[p][0]}\n```" for p in COMMENT_PROMPTS)
    (args.out / "PRETRAIN.md").write_text(f"""# ra3-tiny: how it was pretrained

Written by `scripts/pretrain_base.py`; rerun the command to rebuild these files (same machine class and library
versions give the same weights).

- command: `{command}`
- date: {datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
- software: Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, \
tokenizers {tokenizers.__version__}; {args.threads} CPU thread(s)
- wall time: {train_seconds / 60:.1f} min of training, {(time.time() - t_start) / 60:.1f} min in all
- model: LlamaForCausalLM, {n_params:,} parameters (hidden {shape.hidden_size}, {shape.num_hidden_layers} layers, \
{shape.num_attention_heads} heads / {shape.num_key_value_heads} KV heads, MLP {shape.intermediate_size}, untied \
embeddings); float32 `model.safetensors` of {size:,} bytes
- tokenizer: byte-level BPE with the qwen2-style pre-tokenizer, {len(tokenizer)} entries (`<|endoftext|>` is \
bos and eos, `<|pad|>`; nothing added), trained on the pretraining set
- data: `ra3/data/pretrain_corpus.jsonl.gz`, {len(train):,} documents, {train_tokens:,} tokens with bos/eos \
(CPython 3.11.7's standard library and its tests, see `ra3/data/CORPUS.md`); held out: \
`ra3/data/default_corpus.jsonl`, {len(heldout):,} documents of modules the model never saw
- training: {args.steps} steps, batches of ~{args.batch_tokens} padded tokens, {tokens_seen:,} tokens seen \
({tokens_seen / train_tokens:.2f} epochs); AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), \
peak lr {args.lr}, {args.warmup} warm-up steps, cosine to {args.min_lr_ratio} x the peak, gradient clip 1.0, \
seed {args.seed}

## Losses (nats per token)
- final train loss: {final_train:.4f} (first {len(heldout)} pretraining documents, after training)
- final held-out loss: {final_heldout:.4f} (the {len(heldout)} documents of the default corpus)

| step | held-out loss |
|---|---|
{eval_rows}

| step | train loss (mean since the previous row) | tokens seen |
|---|---|---|
{curve_rows}

## Comments
In the mid-training default corpus {corpus['comment_line_share']:.2%} of the lines are comment lines and \
{corpus['commented_code_share']:.2%} of the code lines follow a comment line. The model's probability of \
starting a comment line at a line boundary ("<indentation>#", at the line's own indentation), over held-out \
lines (every non-blank line after a document's first, in file order), against how many of those lines are \
comments:

| held-out lines | model's mean probability | share of those lines that are comments |
|---|---|---|
| {n_small} | {q_small:.4f} | {share_small:.4f} |
| {n_big} | {q_big:.4f} | {share_big:.4f} |

Greedy after `'def add(a, b):\\n'`:
```python
def add(a, b):
{greedy}
```

Sampled (temperature 0.8, 20 samples of 48 tokens each):

{sample_text}
""", encoding="utf-8")
    print(f"wrote {args.out} ({size:,} bytes of weights) in {(time.time() - t_start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

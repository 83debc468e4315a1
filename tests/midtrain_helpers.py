"""Small tokenizers, documents and models for the mid-training tests, built in seconds and offline."""
from __future__ import annotations

import functools
import random

import torch

# Python with comments above some lines, indented bodies, a docstring and a bracketed continuation
SNIPPETS = [
    'def area(width, height):\n    """Return the area.\n\n    Both sides in metres.\n    """\n'
    '    # the product of the sides\n    result = width * height\n    return result\n',
    "def total(items):\n    count = 0\n    for item in items:\n        # skip the empty ones\n"
    "        if not item:\n            continue\n        count += len(item)\n    return count\n",
    "class Box:\n    def __init__(self, size):\n        self.size = size\n\n    def grow(self, by):\n"
    "        # never shrink\n        self.size = max(self.size, self.size + by)\n        return self.size\n",
    "def pairs(values):\n    out = [\n        (a, b)\n        for a in values\n        for b in values\n    ]\n"
    "    return out\n",
    "def scale(xs, k):\n    text = 'a # not a comment'\n    ys = [x * k for x in xs]\n    return ys, text\n",
]


def snippet_texts(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "value", "item", "size", "count"]
    out = []
    for i in range(n):
        text = SNIPPETS[i % len(SNIPPETS)]
        for old in ("width", "height", "items", "values", "xs"):
            text = text.replace(old, rng.choice(names) + str(i % 7))
        out.append(text)
    return out


@functools.lru_cache(maxsize=None)
def code_tokenizer(style: str = "qwen2", vocab_size: int = 600):
    """A byte-level BPE tokenizer of ``style`` trained on the snippets (adds its BOS, as Llama-3's does)."""
    from ra3.data.tokenizer import train_code_tokenizer

    return train_code_tokenizer(snippet_texts(), vocab_size, style=style)


def toy_llama(vocab_size: int, *, seed: int = 0, hidden: int = 32, layers: int = 1, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                      pad_token_id=1)
    return LlamaForCausalLM(cfg).to(dtype).eval()


@torch.no_grad()
def boost_comments(model, vocab, docs, strength: float = 4.0) -> None:
    """Raise the logits of every comment-starting token (and of newline tokens, so comments end) along the mean
    hidden state, so a random model thinks at a visible rate."""
    from ra3.data.sequences import build_sequences
    from ra3.midtrain.batch import pack

    batch = pack(build_sequences(docs, vocab), vocab.pad_id)
    h = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    mu = h.reshape(-1, h.shape[-1]).mean(0)
    direction = mu / mu.norm() ** 2
    w = model.get_output_embeddings().weight
    for ids in vocab.sets:
        for i in ids:
            w[i] += strength * direction
    for i in sorted(vocab.newline)[:8]:
        w[i] += 0.7 * strength * direction


def annotate_by_hand(doc, comments: dict) -> tuple[str, dict]:
    """The annotated text built line by line, independently of ra3's own code (one action per line), and
    action -> (start, end) of its comment line in it."""
    lines = doc.text.split("\n")[:-1]
    out, spans, pos = [], {}, 0
    for k, line in enumerate(lines):
        if k in comments:
            indent = line[:len(line) - len(line.lstrip())]
            text = f"{indent}#{comments[k].text}\n"
            spans[k] = (pos, pos + len(text))
            out.append(text)
            pos += len(text)
        out.append(line + "\n")
        pos += len(line) + 1
    return "".join(out), spans

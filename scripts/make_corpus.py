"""Generate ra3's embedded default code corpus: a few hundred small Python functions, written for ra3.

Every function comes from a template in this file (our own code, released with ra3 under its licence), with
names, constants and operators drawn from a seeded RNG, so the corpus is reproducible and licence-clean.
Each record is one document: {"content": source, "name": function name, "template": template name}.
A few documents carry non-ASCII text (accents, arrows, CJK) so multi-byte handling is exercised end to end.

    python scripts/make_corpus.py                      # rewrites ra3/data/default_corpus.jsonl
    python scripts/make_corpus.py --out x.jsonl --count 500 --seed 1
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "ra3" / "data" / "default_corpus.jsonl"

NOUNS = ["items", "values", "scores", "prices", "counts", "numbers", "weights", "ages", "sizes", "points",
         "records", "entries", "samples", "readings", "grades", "totals"]
VERBS = ["filter", "scale", "select", "keep", "collect", "gather", "pick", "extract"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "maple", "ocean", "piano", "delta", "ember",
         "falcon", "garnet", "harbor", "island", "jungle", "kernel", "lantern", "meadow", "nectar"]
UNICODE_WORDS = ["café", "naïve", "résumé", "über", "→", "日本", "数据", "Ωmega", "façade",
                 "smörgåsbord"]
CMP = [(">", "greater"), ("<", "less"), (">=", "at_least"), ("<=", "at_most")]
ARITH = [("+", "add"), ("-", "sub"), ("*", "mul")]


def _t_filter_map(r):
    noun, verb = r.choice(NOUNS), r.choice(VERBS)
    cmp, cname = r.choice(CMP)
    op, _ = r.choice(ARITH)
    k, m = r.randint(0, 50), r.randint(1, 9)
    name = f"{verb}_{cname}_{noun}"
    return name, (f"def {name}({noun}, limit={k}):\n"
                  f"    result = []\n"
                  f"    for value in {noun}:\n"
                  f"        if value {cmp} limit:\n"
                  f"            result.append(value {op} {m})\n"
                  f"    return result\n")


def _t_count(r):
    noun = r.choice(NOUNS)
    name = f"count_{noun}"
    return name, (f"def {name}({noun}):\n"
                  f"    counts = {{}}\n"
                  f"    for item in {noun}:\n"
                  f"        counts[item] = counts.get(item, 0) + 1\n"
                  f"    return counts\n")


def _t_clamp(r):
    lo, hi = sorted(r.sample(range(-100, 101), 2))
    name = f"clamp_{r.choice(['value', 'level', 'speed', 'score', 'angle'])}"
    return name, (f"def {name}(x, low={lo}, high={hi}):\n"
                  f"    if x < low:\n"
                  f"        return low\n"
                  f"    if x > high:\n"
                  f"        return high\n"
                  f"    return x\n")


def _t_factorial(r):
    name = r.choice(["factorial", "fact", "product_up_to"])
    if r.random() < 0.5:
        return name, (f"def {name}(n):\n"
                      f"    if n <= 1:\n"
                      f"        return 1\n"
                      f"    return n * {name}(n - 1)\n")
    return name, (f"def {name}(n):\n"
                  f"    result = 1\n"
                  f"    for i in range(2, n + 1):\n"
                  f"        result *= i\n"
                  f"    return result\n")


def _t_fib(r):
    name = r.choice(["fibonacci", "fib", "nth_fibonacci"])
    return name, (f"def {name}(n):\n"
                  f"    a, b = 0, 1\n"
                  f"    for _ in range(n):\n"
                  f"        a, b = b, a + b\n"
                  f"    return a\n")


def _t_gcd(r):
    name = r.choice(["gcd", "greatest_common_divisor", "common_factor"])
    return name, (f"def {name}(a, b):\n"
                  f"    while b:\n"
                  f"        a, b = b, a % b\n"
                  f"    return abs(a)\n")


def _t_is_prime(r):
    name = r.choice(["is_prime", "check_prime", "prime_test"])
    return name, (f"def {name}(n):\n"
                  f"    if n < 2:\n"
                  f"        return False\n"
                  f"    i = 2\n"
                  f"    while i * i <= n:\n"
                  f"        if n % i == 0:\n"
                  f"            return False\n"
                  f"        i += 1\n"
                  f"    return True\n")


def _t_sum_digits(r):
    base = r.choice([10, 10, 2, 8, 16])
    name = "sum_digits" if base == 10 else f"sum_digits_base{base}"
    return name, (f"def {name}(n):\n"
                  f"    n = abs(n)\n"
                  f"    total = 0\n"
                  f"    while n > 0:\n"
                  f"        total += n % {base}\n"
                  f"        n //= {base}\n"
                  f"    return total\n")


def _t_palindrome(r):
    name = r.choice(["is_palindrome", "reads_same_backwards", "palindrome_check"])
    if r.random() < 0.5:
        return name, (f"def {name}(text):\n"
                      f"    cleaned = [c.lower() for c in text if c.isalnum()]\n"
                      f"    return cleaned == cleaned[::-1]\n")
    return name, (f"def {name}(text):\n"
                  f"    left, right = 0, len(text) - 1\n"
                  f"    while left < right:\n"
                  f"        if text[left] != text[right]:\n"
                  f"            return False\n"
                  f"        left += 1\n"
                  f"        right -= 1\n"
                  f"    return True\n")


def _t_binary_search(r):
    name = r.choice(["binary_search", "find_index", "bisect_find"])
    return name, (f"def {name}(sorted_items, target):\n"
                  f"    lo, hi = 0, len(sorted_items) - 1\n"
                  f"    while lo <= hi:\n"
                  f"        mid = (lo + hi) // 2\n"
                  f"        if sorted_items[mid] == target:\n"
                  f"            return mid\n"
                  f"        if sorted_items[mid] < target:\n"
                  f"            lo = mid + 1\n"
                  f"        else:\n"
                  f"            hi = mid - 1\n"
                  f"    return -1\n")


def _t_linear_search(r):
    noun = r.choice(NOUNS)
    name = f"first_index_in_{noun}"
    return name, (f"def {name}({noun}, target):\n"
                  f"    for index, value in enumerate({noun}):\n"
                  f"        if value == target:\n"
                  f"            return index\n"
                  f"    return -1\n")


def _t_max(r):
    noun = r.choice(NOUNS)
    kind, cmp = r.choice([("largest", ">"), ("smallest", "<")])
    name = f"{kind}_of_{noun}"
    return name, (f"def {name}({noun}):\n"
                  f"    if not {noun}:\n"
                  f"        return None\n"
                  f"    best = {noun}[0]\n"
                  f"    for value in {noun}[1:]:\n"
                  f"        if value {cmp} best:\n"
                  f"            best = value\n"
                  f"    return best\n")


def _t_mean(r):
    noun = r.choice(NOUNS)
    name = f"average_{noun}"
    return name, (f"def {name}({noun}):\n"
                  f"    if len({noun}) == 0:\n"
                  f"        return 0.0\n"
                  f"    total = sum({noun})\n"
                  f"    return total / len({noun})\n")


def _t_bubble_sort(r):
    name = r.choice(["bubble_sort", "sort_in_place", "simple_sort"])
    cmp = r.choice([">", "<"])
    return name, (f"def {name}(items):\n"
                  f"    n = len(items)\n"
                  f"    for i in range(n):\n"
                  f"        for j in range(n - i - 1):\n"
                  f"            if items[j] {cmp} items[j + 1]:\n"
                  f"                items[j], items[j + 1] = items[j + 1], items[j]\n"
                  f"    return items\n")


def _t_insertion_sort(r):
    name = r.choice(["insertion_sort", "insert_sorted", "sort_by_insertion"])
    return name, (f"def {name}(items):\n"
                  f"    for i in range(1, len(items)):\n"
                  f"        key = items[i]\n"
                  f"        j = i - 1\n"
                  f"        while j >= 0 and items[j] > key:\n"
                  f"            items[j + 1] = items[j]\n"
                  f"            j -= 1\n"
                  f"        items[j + 1] = key\n"
                  f"    return items\n")


def _t_reverse_words(r):
    sep = r.choice([" ", ",", "-", "_"])
    name = r.choice(["reverse_words", "flip_words", "words_backwards"])
    return name, (f"def {name}(text):\n"
                  f"    words = text.split({sep!r})\n"
                  f"    words.reverse()\n"
                  f"    return {sep!r}.join(words)\n")


def _t_capitalize(r):
    name = r.choice(["title_case", "capitalize_words", "make_title"])
    return name, (f"def {name}(text):\n"
                  f"    parts = []\n"
                  f"    for word in text.split():\n"
                  f"        parts.append(word[:1].upper() + word[1:].lower())\n"
                  f"    return ' '.join(parts)\n")


def _t_vowels(r):
    name = r.choice(["count_vowels", "vowel_count", "number_of_vowels"])
    vowels = r.choice(["aeiou", "aeiouy", "aeiouAEIOU"])
    return name, (f"def {name}(text):\n"
                  f"    total = 0\n"
                  f"    for char in text:\n"
                  f"        if char in {vowels!r}:\n"
                  f"            total += 1\n"
                  f"    return total\n")


def _t_greeting(r):
    word = r.choice(UNICODE_WORDS + WORDS)
    name = f"greet_{r.choice(['user', 'guest', 'friend', 'team'])}"
    return name, (f"def {name}(name, excited=False):\n"
                  f"    message = 'Hello, ' + name + ' from {word}'\n"
                  f"    if excited:\n"
                  f"        message += '!'\n"
                  f"    return message\n")


def _t_lookup(r):
    keys = r.sample(WORDS, 3)
    extra = r.choice(UNICODE_WORDS)
    name = f"lookup_{r.choice(['code', 'label', 'color', 'tag'])}"
    return name, (f"def {name}(key):\n"
                  f"    table = {{\n"
                  f"        {keys[0]!r}: 1,\n"
                  f"        {keys[1]!r}: 2,\n"
                  f"        {keys[2]!r}: 3,\n"
                  f"        {extra!r}: 4,\n"
                  f"    }}\n"
                  f"    return table.get(key, 0)\n")


def _t_class_counter(r):
    cls = r.choice(["Counter", "Tally", "Clicker", "Meter"])
    step = r.randint(1, 5)
    return cls, (f"class {cls}:\n"
                 f"    def __init__(self, start=0):\n"
                 f"        self.value = start\n"
                 f"\n"
                 f"    def increment(self):\n"
                 f"        self.value += {step}\n"
                 f"        return self.value\n"
                 f"\n"
                 f"    def reset(self):\n"
                 f"        self.value = 0\n")


def _t_class_stack(r):
    cls = r.choice(["Stack", "Pile", "LifoQueue"])
    return cls, (f"class {cls}:\n"
                 f"    def __init__(self):\n"
                 f"        self.items = []\n"
                 f"\n"
                 f"    def push(self, item):\n"
                 f"        self.items.append(item)\n"
                 f"\n"
                 f"    def pop(self):\n"
                 f"        if not self.items:\n"
                 f"            raise IndexError('pop from empty {cls.lower()}')\n"
                 f"        return self.items.pop()\n"
                 f"\n"
                 f"    def __len__(self):\n"
                 f"        return len(self.items)\n")


def _t_power(r):
    name = r.choice(["power", "fast_power", "pow_int"])
    return name, (f"def {name}(base, exponent):\n"
                  f"    result = 1\n"
                  f"    while exponent > 0:\n"
                  f"        if exponent % 2 == 1:\n"
                  f"            result *= base\n"
                  f"        base *= base\n"
                  f"        exponent //= 2\n"
                  f"    return result\n")


def _t_chunks(r):
    size = r.randint(2, 6)
    name = r.choice(["chunk_list", "split_into_chunks", "batched"])
    return name, (f"def {name}(items, size={size}):\n"
                  f"    chunks = []\n"
                  f"    for start in range(0, len(items), size):\n"
                  f"        chunks.append(items[start:start + size])\n"
                  f"    return chunks\n")


def _t_flatten(r):
    name = r.choice(["flatten", "flatten_nested", "unnest"])
    return name, (f"def {name}(nested):\n"
                  f"    flat = []\n"
                  f"    for element in nested:\n"
                  f"        if isinstance(element, list):\n"
                  f"            flat.extend({name}(element))\n"
                  f"        else:\n"
                  f"            flat.append(element)\n"
                  f"    return flat\n")


def _t_dedupe(r):
    noun = r.choice(NOUNS)
    name = f"unique_{noun}"
    return name, (f"def {name}({noun}):\n"
                  f"    seen = set()\n"
                  f"    result = []\n"
                  f"    for value in {noun}:\n"
                  f"        if value not in seen:\n"
                  f"            seen.add(value)\n"
                  f"            result.append(value)\n"
                  f"    return result\n")


def _t_running_total(r):
    noun = r.choice(NOUNS)
    op, opname = r.choice(ARITH)
    name = f"running_{opname}_{noun}"
    start = 1 if op == "*" else 0
    return name, (f"def {name}({noun}):\n"
                  f"    acc = {start}\n"
                  f"    out = []\n"
                  f"    for value in {noun}:\n"
                  f"        acc = acc {op} value\n"
                  f"        out.append(acc)\n"
                  f"    return out\n")


def _t_temperature(r):
    name, formula = r.choice([("celsius_to_fahrenheit", "c * 9 / 5 + 32"),
                              ("fahrenheit_to_celsius", "(c - 32) * 5 / 9"),
                              ("celsius_to_kelvin", "c + 273.15")])
    digits = r.randint(0, 3)
    return name, (f"def {name}(c):\n"
                  f"    value = {formula}\n"
                  f"    return round(value, {digits})\n")


def _t_fizzbuzz(r):
    a, b = r.choice([(3, 5), (2, 7), (3, 7), (4, 6)])
    wa, wb = r.sample(["Fizz", "Buzz", "Bang", "Pop", "Zap"], 2)
    name = f"{wa.lower()}{wb.lower()}"
    return name, (f"def {name}(n):\n"
                  f"    out = []\n"
                  f"    for i in range(1, n + 1):\n"
                  f"        if i % {a * b} == 0:\n"
                  f"            out.append('{wa}{wb}')\n"
                  f"        elif i % {a} == 0:\n"
                  f"            out.append('{wa}')\n"
                  f"        elif i % {b} == 0:\n"
                  f"            out.append('{wb}')\n"
                  f"        else:\n"
                  f"            out.append(str(i))\n"
                  f"    return out\n")


def _t_matrix(r):
    name = r.choice(["transpose", "transpose_matrix", "flip_rows_columns"])
    return name, (f"def {name}(matrix):\n"
                  f"    if not matrix:\n"
                  f"        return []\n"
                  f"    rows, cols = len(matrix), len(matrix[0])\n"
                  f"    return [[matrix[i][j] for i in range(rows)] for j in range(cols)]\n")


def _t_word_freq(r):
    top = r.randint(1, 5)
    name = r.choice(["top_words", "most_common_words", "frequent_words"])
    return name, (f"def {name}(text, k={top}):\n"
                  f"    freq = {{}}\n"
                  f"    for word in text.lower().split():\n"
                  f"        freq[word] = freq.get(word, 0) + 1\n"
                  f"    ranked = sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))\n"
                  f"    return [word for word, _ in ranked[:k]]\n")


def _t_safe_div(r):
    default = r.choice(["0", "None", "0.0", "float('inf')"])
    name = r.choice(["safe_divide", "divide_or_default", "ratio"])
    return name, (f"def {name}(a, b):\n"
                  f"    try:\n"
                  f"        return a / b\n"
                  f"    except ZeroDivisionError:\n"
                  f"        return {default}\n")


def _t_merge(r):
    name = r.choice(["merge_sorted", "merge_lists", "combine_sorted"])
    return name, (f"def {name}(left, right):\n"
                  f"    merged = []\n"
                  f"    i = j = 0\n"
                  f"    while i < len(left) and j < len(right):\n"
                  f"        if left[i] <= right[j]:\n"
                  f"            merged.append(left[i])\n"
                  f"            i += 1\n"
                  f"        else:\n"
                  f"            merged.append(right[j])\n"
                  f"            j += 1\n"
                  f"    merged.extend(left[i:])\n"
                  f"    merged.extend(right[j:])\n"
                  f"    return merged\n")


def _t_docstring(r):
    noun = r.choice(NOUNS)
    k = r.randint(2, 10)
    nth = {2: "2nd", 3: "3rd"}.get(k, f"{k}th")
    name = f"every_{nth}_of_{noun}"
    return name, (f"def {name}({noun}):\n"
                  f"    \"\"\"Return every {nth} element of {noun}.\"\"\"\n"
                  f"    return {noun}[::{k}]\n")


TEMPLATES = [v for k, v in sorted(globals().items()) if k.startswith("_t_")]


def make_corpus(count: int = 400, seed: int = 0) -> list[dict]:
    """``count`` distinct documents (deduplicated on source text), deterministic given ``seed``."""
    rng = random.Random(seed)
    seen, docs = set(), []
    attempts = 0
    while len(docs) < count:
        attempts += 1
        if attempts > count * 200:
            raise RuntimeError(f"templates yield fewer than {count} distinct documents")
        template = TEMPLATES[(attempts - 1) % len(TEMPLATES)]
        name, src = template(rng)
        if src in seen:
            continue
        seen.add(src)
        docs.append({"content": src, "name": name, "template": template.__name__[3:]})
    rng.shuffle(docs)
    return docs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    docs = make_corpus(args.count, args.seed)
    for doc in docs:  # every document must be valid Python
        compile(doc["content"], doc["name"], "exec")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    print(f"wrote {len(docs)} documents to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

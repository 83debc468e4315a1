"""Corpus loading and the embedded data: the default and pretraining corpora, directories of .py files,
local files, the datasets path, errors that name the argument, and the code tokenizer."""
from __future__ import annotations

import ast
import gzip
import json
import sys
import types

import pytest

from ra3.data import load_code_corpus, split_actions
from ra3.data.corpus import (DEFAULT_CORPUS_PATH, PRETRAIN_CORPUS_PATH, comment_shares, python_directory_units,
                             python_units)
from ra3.data.tokenizer import EOS_TOKEN, PAD_TOKEN, _pre_tokenizer, train_code_tokenizer


def _records(path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_default_corpus_is_real_commented_python():
    texts = load_code_corpus()
    assert 1500 <= len(texts) <= 2500
    assert len(set(texts)) == len(texts)
    for i, text in enumerate(texts):
        ast.parse(text, f"doc{i}")
        lines = text[:-1].split("\n")
        assert text.endswith("\n") and 4 <= len(lines) <= 40 and max(map(len, lines)) <= 100
    shares = comment_shares(texts)
    assert 0.03 <= shares["comment_line_share"] <= 0.15  # the stdlib's authors' own comments
    assert sum('"""' in t for t in texts) > len(texts) // 4  # and docstrings
    assert load_code_corpus(limit=5) == texts[:5]
    records = _records(DEFAULT_CORPUS_PATH)
    assert [r["content"] for r in records] == texts
    assert all(":" in r["source"] for r in records)


def test_pretraining_corpus_is_module_disjoint_from_the_default():
    assert PRETRAIN_CORPUS_PATH.stat().st_size <= 6_000_000
    default = {r["source"].split(":")[0] for r in _records(DEFAULT_CORPUS_PATH)}
    pretrain = _records(PRETRAIN_CORPUS_PATH)
    assert len(pretrain) > 10 * len(default)
    assert not default & {r["source"].split(":")[0] for r in pretrain}
    assert not set(load_code_corpus()) & {r["content"] for r in pretrain}
    assert load_code_corpus(PRETRAIN_CORPUS_PATH, limit=3) == [r["content"] for r in pretrain[:3]]


MODULE = '''"""A module."""
import functools


# The helper everyone uses.
# Two lines of comment.
@functools.lru_cache
def helper(x):
    """Double it."""
    return 2 * x


def short(x):
    return x


class Thing(Base):
    limit = 3

    # Not part of the method below: a blank line follows.

    def __init__(self, n):
        self.n = n
        self.items = []
        self.total = 0

    # Grow by one.
    def grow(self):
        def inner():
            return 1
        self.n += inner()

    def doc(self):
        text = """
not indented
"""
        return text

    def wide(self):
        x = 1
        y = 2
        return "LONG"


async def fetch(session, url):
    async with session.get(url) as response:
        body = await response.text()
    return body
'''.replace("LONG", "y" * 120)


def test_python_units_cut_functions_and_methods_with_their_comments():
    units = python_units(MODULE)
    assert [u.qualname for u in units] == ["helper", "Thing.__init__", "Thing.grow", "fetch"]
    helper, init, grow, fetch = units
    assert helper.text == ("# The helper everyone uses.\n# Two lines of comment.\n@functools.lru_cache\n"
                           "def helper(x):\n    \"\"\"Double it.\"\"\"\n    return 2 * x\n")
    assert helper.lineno == 5
    assert init.text.startswith("def __init__(self, n):\n    self.n = n\n")  # moved to column 0, no stray comment
    assert grow.text.startswith("# Grow by one.\ndef grow(self):\n    def inner():\n")  # nested defs stay inside
    for u in units:
        ast.parse(u.text)
    # short (2 lines), doc (a string at column 0 inside a method), wide (a 120-character line) are left out
    assert python_units(MODULE.replace("\n", "\r\n")) == units
    assert len(python_units(MODULE, max_line_chars=300)) == 5
    with pytest.raises(SyntaxError):
        python_units("def f(:\n    pass\n")
    assert python_units("def f(x):\n\tif x:\n\t\treturn 1\n\treturn 2\n") == []  # tabs are left out


def test_comment_shares():
    s = comment_shares(["def f(x):\n    # a\n    # b\n    y = x\n\n    return y\n", "def g():\n    pass\n"])
    assert (s["lines"], s["comment_lines"], s["code_lines"], s["commented_code_lines"]) == (8, 2, 5, 1)
    assert s["comment_line_share"] == 2 / 8 and s["commented_code_share"] == 1 / 5


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


FUNC = "def {name}(x):\n    # why\n    y = x + 1\n    return y\n"


def test_directory_of_python_files(tmp_path):
    repo = tmp_path / "repo"
    _write(repo, "b.py", FUNC.format(name="b_one") + "\n\n" + FUNC.format(name="b_two"))
    _write(repo, "a.py", "import os\n\n" + FUNC.format(name="a_one"))
    _write(repo, "pkg/__init__.py", "")
    _write(repo, "pkg/sub/mod.py", "class C:\n" + "".join("    " + line + "\n"
                                                         for line in FUNC.format(name="m").splitlines()))
    _write(repo, "pkg/broken.py", "def broken(:\n    pass\n")
    _write(repo, "notes.txt", FUNC.format(name="not_python"))
    for skipped in (".venv/lib/site-packages/dep.py", ".git/hook.py", "pkg/__pycache__/mod.py",
                    "site-packages/dep.py", "build/site-packages/x.py"):
        _write(repo, skipped, FUNC.format(name="skipped"))
    found = python_directory_units(repo)
    assert found.files == ["a.py", "b.py", "pkg/__init__.py", "pkg/broken.py", "pkg/sub/mod.py"]
    assert found.sources == ["a.py:a_one", "b.py:b_one", "b.py:b_two", "pkg/sub/mod.py:C.m"]
    assert [rel for rel, _ in found.skipped] == ["pkg/broken.py"] and "does not parse" in found.skipped[0][1]
    with pytest.warns(UserWarning, match="skipped 1 of 5 .py files"):
        texts = load_code_corpus(repo)
    assert texts == found.texts and texts[3] == FUNC.format(name="m")
    with pytest.warns(UserWarning):
        assert load_code_corpus(str(repo), limit=2) == texts[:2]
    assert load_code_corpus(repo / "b.py") == [FUNC.format(name="b_one"), FUNC.format(name="b_two")]


def test_directory_errors_name_the_argument(tmp_path):
    empty = tmp_path / "empty"
    _write(empty, "README.md", "no code\n")
    _write(empty, ".hidden/x.py", FUNC.format(name="hidden"))
    with pytest.raises(ValueError, match=r"source '.*empty' is a directory that holds no \.py files"):
        load_code_corpus(empty)
    unusable = tmp_path / "unusable"
    _write(unusable, "tiny.py", "def f():\n    return 1\n")
    _write(unusable, "bad.py", "def (\n")
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        with pytest.raises(ValueError, match=r"source '.*unusable': its 2 \.py files .* hold no usable documents"):
            load_code_corpus(unusable)
    with pytest.raises(ValueError, match="not a Python file that parses"):
        load_code_corpus(unusable / "bad.py")


@pytest.mark.parametrize("style", ["qwen2", "gpt2"])
def test_code_tokenizer(style):
    texts = load_code_corpus(limit=200)
    tok = train_code_tokenizer(texts, 400, style=style)
    again = train_code_tokenizer(texts, 400, style=style)
    assert tok.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()  # deterministic
    assert len(tok) == 400 and set(tok.get_added_vocab()) == {EOS_TOKEN, PAD_TOKEN}  # no "\n#" token
    assert tok.bos_token == tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert len(tok.encode("\n#", add_special_tokens=False)) == 2
    text = "def café(x):\n    # → ok 日本🙂\n\n    return x  # done\n"
    enc = tok(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    # bos in front (as Llama-3's tokenizer puts it), nothing else added
    assert enc["input_ids"][0] == tok.bos_token_id and enc["special_tokens_mask"] == [1] + [0] * (len(enc["input_ids"]) - 1)
    assert enc["input_ids"][1:] == tok(text, add_special_tokens=False)["input_ids"]
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    assert tok.decode(enc["input_ids"]) == text
    offsets = enc["offset_mapping"]
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    for i, (token, (a, b)) in enumerate(zip(tok.convert_ids_to_tokens(enc["input_ids"]), offsets)):
        assert a < b and (i == 0 or offsets[i - 1][1] >= a)  # non-empty, no gap
        assert bytes(byte_of[c] for c in token) in text[a:b].encode("utf-8")  # the token's bytes are in its chars


def _bytes_to_unicode():
    """GPT-2's byte -> printable character map (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def test_tokenizer_styles_split_newlines_like_their_models():
    text = "def f(x):\n    return x\n\n\nclass A:\n    # note\n"

    def pieces(style):
        return [text[a:b] for _, (a, b) in _pre_tokenizer(style).pre_tokenize_str(text)]

    # Qwen2 / Llama-3: newlines glue to the punctuation before them, runs of newlines stay whole
    assert pieces("qwen2") == ["def", " f", "(x", "):\n", "   ", " return", " x", "\n\n\n", "class", " A", ":\n",
                               "   ", " #", " note", "\n"]
    # GPT-2: the newline goes with the indentation after it
    assert pieces("gpt2") == ["def", " f", "(", "x", "):", "\n   ", " return", " x", "\n\n", "\n", "class", " A", ":",
                              "\n   ", " #", " note", "\n"]
    with pytest.raises(ValueError, match="style"):
        train_code_tokenizer(["x = 1\n"], 400, style="bert")
    with pytest.raises(ValueError, match="vocab_size"):
        train_code_tokenizer(["x = 1\n"], 100)
    with pytest.raises(ValueError, match="texts"):
        train_code_tokenizer([], 400)


def test_jsonl_and_json_files_with_a_text_column(tmp_path):
    rows = [{"code": "def f():\n    return 1\n", "id": 1}, {"code": "x = 'é'\n", "id": 2}]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert load_code_corpus(jsonl, text_column="code") == [r["code"] for r in rows]
    assert load_code_corpus(str(jsonl), text_column="code", limit=1) == [rows[0]["code"]]
    as_list = tmp_path / "c.json"
    as_list.write_text(json.dumps(rows), encoding="utf-8")
    assert load_code_corpus(as_list, text_column="code") == [r["code"] for r in rows]
    columns = tmp_path / "cols.json"
    columns.write_text(json.dumps({"code": [r["code"] for r in rows], "id": [1, 2]}), encoding="utf-8")
    assert load_code_corpus(columns, text_column="code") == [r["code"] for r in rows]


def test_errors_name_the_argument(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"code": "x = 1\n"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="text_column 'content'"):
        load_code_corpus(jsonl)
    with pytest.raises(ValueError, match="does not exist"):
        load_code_corpus(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="limit"):
        load_code_corpus(limit=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"code": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="not a string"):
        load_code_corpus(bad, text_column="code")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"code": \n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 1"):
        load_code_corpus(broken, text_column="code")


def test_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": ["a = 1\n", "b = 2\n"], "n": [1, 2]}), path)
    assert load_code_corpus(path) == ["a = 1\n", "b = 2\n"]
    with pytest.raises(ValueError, match="text_column 'code'"):
        load_code_corpus(path, text_column="code")


class _FakeDataset:
    """The slice of `datasets.Dataset` that load_code_corpus uses."""

    def __init__(self, columns):
        self.columns = columns
        self.column_names = list(columns)

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, name):
        return self.columns[name]

    def select(self, indices):
        return _FakeDataset({k: [v[i] for i in indices] for k, v in self.columns.items()})


def test_dataset_name_goes_through_datasets_load_dataset(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        if name != "org/code":
            raise FileNotFoundError(f"Dataset {name} doesn't exist on the Hub")
        return _FakeDataset({"content": ["a = 1\n", "b = 2\n", "c = 3\n"], "lang": ["py"] * 3})

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_code_corpus("org/code", split="validation", limit=2) == ["a = 1\n", "b = 2\n"]
    assert calls == [("org/code", "validation")]
    with pytest.raises(ValueError, match="text_column 'code'"):
        load_code_corpus("org/code", text_column="code")
    with pytest.raises(ValueError, match="source 'org/other'"):
        load_code_corpus("org/other")


def test_dataset_name_without_datasets_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ValueError, match="pip install datasets"):
        load_code_corpus("org/code")


@pytest.mark.parametrize("text", ["a\n  b\n\n\nc\nd\n", "\n\nx", "x\r\ny\r\n", "only", "a\n\n"])
def test_split_actions_round_trips(text):
    norm = text.replace("\r\n", "\n")
    norm = norm[:-1] if norm.endswith("\n") else norm
    for unit in ("line", "block"):
        actions = split_actions(text, unit)
        assert "\n".join(actions) == norm
    blocks = split_actions("a\nb\n\nc\n", "block")
    assert blocks == ["a\nb", "\nc"]
    with pytest.raises(ValueError, match="unit"):
        split_actions("a", "word")

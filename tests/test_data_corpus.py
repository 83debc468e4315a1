"""Corpus loading: the embedded default, local files, the datasets path, and errors that name the argument."""
from __future__ import annotations

import json
import sys
import types

import pytest

from ra3.data import load_code_corpus, split_actions


def test_default_corpus_is_valid_python():
    texts = load_code_corpus()
    assert 300 <= len(texts) <= 1000
    assert len(set(texts)) == len(texts)
    for i, text in enumerate(texts):
        compile(text, f"doc{i}", "exec")
    assert any(any(ord(c) > 127 for c in t) for t in texts), "the default corpus should exercise multi-byte text"
    assert load_code_corpus(limit=5) == texts[:5]


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

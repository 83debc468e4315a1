"""Load a code corpus as a list of source texts: the embedded default, a local file, or a `datasets` dataset."""
from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_CORPUS_PATH = Path(__file__).resolve().parent / "default_corpus.jsonl"
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def _column(records, text_column: str, source: str) -> list[str]:
    texts = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"source {source!r}: record {i} is a {type(record).__name__}, not an object with a "
                             f"{text_column!r} field")
        if text_column not in record:
            raise ValueError(f"text_column {text_column!r} is not a field of source {source!r} (record {i} has "
                             f"fields {sorted(record)})")
        value = record[text_column]
        if not isinstance(value, str):
            raise ValueError(f"text_column {text_column!r} of record {i} in {source!r} is a "
                             f"{type(value).__name__}, not a string")
        texts.append(value)
    return texts


def _read_jsonl(path: Path):
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"source {str(path)!r}: line {line_no} is not valid JSON ({exc})") from None


def _read_json(path: Path):
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):  # {"data": [...]} or a column-oriented {"content": [...], ...}
        if "data" in data and isinstance(data["data"], list):
            return data["data"]
        if data and all(isinstance(v, list) for v in data.values()):
            n = len(next(iter(data.values())))
            return [{k: v[i] for k, v in data.items()} for i in range(n)]
    if not isinstance(data, list):
        raise ValueError(f"source {str(path)!r}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _read_parquet(path: Path, text_column: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(f"reading the parquet source {str(path)!r} needs pyarrow: pip install pyarrow") from exc
    table = pq.read_table(path)
    if text_column not in table.column_names:
        raise ValueError(f"text_column {text_column!r} is not a column of source {str(path)!r} "
                         f"(columns: {table.column_names})")
    return [{text_column: v} for v in table.column(text_column).to_pylist()]


def _load_dataset(name: str, text_column: str, split: str, limit):
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(f"source {name!r} is neither the embedded default, nor an existing .jsonl/.json/.parquet "
                         f"file, and the `datasets` library (needed to load it as a dataset) is not installed: "
                         f"pip install datasets") from exc
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - the hub raises many kinds; all mean "cannot load this source"
        raise ValueError(f"source {name!r} could not be loaded as a datasets dataset (split={split!r}): {exc}") from exc
    if text_column not in ds.column_names:
        raise ValueError(f"text_column {text_column!r} is not a column of dataset {name!r} "
                         f"(columns: {ds.column_names})")
    column = ds[text_column] if limit is None else ds.select(range(min(limit, len(ds))))[text_column]
    return [{text_column: v} for v in column]


def load_code_corpus(source: str | os.PathLike | None = None, *, text_column: str = "content",
                     split: str = "train", limit: int | None = None) -> list[str]:
    """Source texts of a code corpus, one string per document, in file order.

    source: None (the embedded default, ~400 small Python functions written for ra3), a path to a .jsonl /
    .json / .parquet file, or a `datasets` dataset name or builder (loaded lazily with ``split``).
    text_column: the field holding the code. limit: keep the first ``limit`` documents.
    Raises ValueError naming the argument on a missing file, a missing column or a bad limit.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if not isinstance(text_column, str) or not text_column:
        raise ValueError(f"text_column must be a non-empty string, got {text_column!r}")
    if source is None:
        texts = _column(_read_jsonl(DEFAULT_CORPUS_PATH), "content", "<embedded default>")
        return texts[:limit] if limit is not None else texts
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be None, a path or a dataset name, got {type(source).__name__}")
    path = Path(source)
    src = str(source)
    if path.suffix.lower() in _FILE_SUFFIXES or path.exists():
        if not path.is_file():
            raise ValueError(f"source {src!r} does not exist (or is not a file)")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            records = _read_jsonl(path)
        elif suffix == ".json":
            records = _read_json(path)
        elif suffix == ".parquet":
            records = _read_parquet(path, text_column)
        else:
            raise ValueError(f"source {src!r}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    else:
        records = _load_dataset(src, text_column, split, limit)
    texts = _column(records, text_column, src)
    if not texts:
        raise ValueError(f"source {src!r} holds no documents")
    return texts[:limit] if limit is not None else texts

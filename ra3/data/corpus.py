"""Code corpora for RA3 as lists of source texts: the embedded default, a directory of ``.py`` files (a
repository), a .py / .jsonl / .jsonl.gz / .json / .parquet file, or a `datasets` dataset.

The embedded data (``ra3/data/``) is real Python: the functions and methods of the standard library of CPython
3.11.7 (``Lib/``), with the comments and docstrings their authors wrote, cut into documents by
:func:`python_units`. CPython is distributed under the PSF License Agreement; its text is in
``ra3/data/LICENSE-PSF.txt``. ``scripts/make_corpus.py`` regenerates the two files (sizes and comment shares in
``ra3/data/CORPUS.md``):

- ``default_corpus.jsonl``: the mid-training default, ~2,000 documents of library modules (no test suites);
  records ``{"content": text, "source": "module:qualname"}``.
- ``pretrain_corpus.jsonl.gz``: every other module, the test suites included: the pretraining set of the
  shipped ``ra3-tiny``. The split is by module (in the order of a hash of the name), so no module is in both
  and the default corpus is held out from the base model.
"""
from __future__ import annotations

import ast
import gzip
import json
import os
import unicodedata
import warnings
from pathlib import Path
from typing import NamedTuple

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_CORPUS_PATH = DATA_DIR / "default_corpus.jsonl"
PRETRAIN_CORPUS_PATH = DATA_DIR / "pretrain_corpus.jsonl.gz"
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

MIN_UNIT_LINES, MAX_UNIT_LINES, MAX_LINE_CHARS = 4, 40, 100
# Directories a repository walk never enters (besides hidden ones: .git, .venv, .tox, ...).
SKIPPED_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "node_modules"})
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_BAD_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})  # control characters, lone surrogates, line separators


class PythonUnit(NamedTuple):
    """One document cut from a Python module: ``qualname`` ('f' or 'Class.method'), its first line in the
    module (1-based, the first comment line above the def when there is one) and its source ``text``."""
    qualname: str
    lineno: int
    text: str


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _unit_text(lines: list[str], start: int, end: int) -> str | None:
    """lines[start:end] moved to column 0 (by the first line's indentation), or None when a line sits left of it."""
    indent = _indent(lines[start])
    out = []
    for line in lines[start:end]:
        if not line.strip():
            out.append("")
        elif line.startswith(indent):
            out.append(line[len(indent):])
        else:  # e.g. a multi-line string that starts at column 0 inside a method
            return None
    return "\n".join(out) + "\n"


def _usable(text: str, min_lines: int, max_lines: int, max_line_chars: int) -> bool:
    lines = text[:-1].split("\n")
    if not min_lines <= len(lines) <= max_lines or max(len(line) for line in lines) > max_line_chars:
        return False
    if any(unicodedata.category(c) in _BAD_CATEGORIES for c in text if c != "\n"):
        return False  # tabs, form feeds, NULs, U+2028 ...: text that line splitters disagree about
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


def python_units(source: str, *, min_lines: int = MIN_UNIT_LINES, max_lines: int = MAX_UNIT_LINES,
                 max_line_chars: int = MAX_LINE_CHARS) -> list[PythonUnit]:
    """The documents of one Python module: its top-level functions and the methods of its top-level classes.

    Each unit spans the decorators, the def and the body, plus the comment lines directly above it (no blank line
    between, at the def's indentation); it is moved to column 0 and ends with one newline. Line endings become
    "\\n". Kept only when the unit parses on its own (``ast.parse``), has ``min_lines``..``max_lines`` lines, no
    line longer than ``max_line_chars`` characters and no control character but "\\n" (tabs and form feeds
    included). Units come in source order.
    Raises SyntaxError (or ValueError, e.g. for a NUL byte) when ``source`` itself does not parse.
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__}")
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    tree = ast.parse(source)
    lines = source.split("\n")
    candidates = []
    for node in tree.body:
        if isinstance(node, _FUNCTIONS):
            candidates.append((node.name, node))
        elif isinstance(node, ast.ClassDef):
            candidates += [(f"{node.name}.{child.name}", child) for child in node.body if isinstance(child, _FUNCTIONS)]
    units = []
    for qualname, node in candidates:
        start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
        indent = _indent(lines[start])
        while start > 0 and lines[start - 1].lstrip(" \t").startswith("#") and _indent(lines[start - 1]) == indent:
            start -= 1
        text = _unit_text(lines, start, node.end_lineno)
        if text is not None and _usable(text, min_lines, max_lines, max_line_chars):
            units.append(PythonUnit(qualname, start + 1, text))
    return units


def comment_shares(texts: list[str]) -> dict:
    """How much of ``texts`` is comments: ``comment_line_share`` (lines whose stripped text starts with "#",
    over all lines) and ``commented_code_share`` (non-blank code lines whose previous line is a comment line,
    over all non-blank code lines: how often the authors wrote a comment before a line), with the counts."""
    lines = comments = code = commented = 0
    for text in texts:
        previous_is_comment = False
        for line in text.replace("\r\n", "\n").split("\n")[: -1 if text.endswith("\n") else None]:
            stripped = line.strip()
            is_comment = stripped.startswith("#")
            lines += 1
            comments += is_comment
            if stripped and not is_comment:
                code += 1
                commented += previous_is_comment
            previous_is_comment = is_comment
    return {"lines": lines, "comment_lines": comments, "code_lines": code, "commented_code_lines": commented,
            "comment_line_share": comments / max(lines, 1), "commented_code_share": commented / max(code, 1)}


class DirectoryUnits(NamedTuple):
    """What :func:`python_directory_units` found: unit ``texts`` with their ``sources`` ('path:qualname', the
    path relative to the directory), the .py ``files`` read (relative paths, sorted) and the ``skipped`` ones
    as (relative path, reason): files that are not UTF-8 or do not parse."""
    texts: list[str]
    sources: list[str]
    files: list[str]
    skipped: list[tuple[str, str]]


def python_files(directory: str | os.PathLike) -> list[str]:
    """Every .py file under ``directory`` as a sorted relative POSIX path; hidden files and directories,
    ``__pycache__``, ``site-packages``, ``dist-packages`` and ``node_modules`` are not entered."""
    root = Path(directory)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIPPED_DIRS]
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames if f.endswith(".py") and not f.startswith(".")]
    return sorted(found)


def python_directory_units(directory: str | os.PathLike) -> DirectoryUnits:
    """The :func:`python_units` of every .py file under ``directory`` (see :func:`python_files`), files in
    sorted path order. Files that are not UTF-8 text or do not parse are skipped and listed."""
    root = Path(directory)
    files = python_files(root)
    texts, sources, skipped = [], [], []
    for rel in files:
        try:
            source = (root / rel).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            skipped.append((rel, "not UTF-8 text"))
            continue
        except OSError as exc:
            skipped.append((rel, f"unreadable ({exc.strerror or exc})"))
            continue
        try:
            units = python_units(source)
        except (SyntaxError, ValueError, RecursionError) as exc:
            skipped.append((rel, f"does not parse ({type(exc).__name__}: {exc})"))
            continue
        texts += [u.text for u in units]
        sources += [f"{rel}:{u.qualname}" for u in units]
    return DirectoryUnits(texts, sources, files, skipped)


def _load_directory(path: Path, src: str) -> list[str]:
    found = python_directory_units(path)
    if not found.files:
        raise ValueError(f"source {src!r} is a directory that holds no .py files (hidden directories, "
                         f"__pycache__ and site-packages are not searched); a directory source needs Python "
                         f"files, or pass a .jsonl/.json/.parquet file or a datasets name")
    if found.skipped:
        first, reason = found.skipped[0]
        warnings.warn(f"source {src!r}: skipped {len(found.skipped)} of {len(found.files)} .py files that are not "
                      f"UTF-8 or do not parse (first: {first}: {reason})", stacklevel=3)
    if not found.texts:
        raise ValueError(f"source {src!r}: its {len(found.files)} .py files ({len(found.skipped)} skipped) hold no "
                         f"usable documents: a document is a top-level function or a method of a top-level class, "
                         f"{MIN_UNIT_LINES}-{MAX_UNIT_LINES} lines of at most {MAX_LINE_CHARS} characters, that "
                         f"parses on its own")
    return found.texts


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


def _read_jsonl(path: Path, compressed: bool = False):
    with (gzip.open(path, "rt", encoding="utf-8") if compressed else path.open(encoding="utf-8")) as f:
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

    source: None (the embedded default: ~2000 functions and methods of CPython's standard library, see the
    module docstring); a directory (a repository: every .py file under it, sorted by path, cut into documents
    by :func:`python_units`; files that do not parse are skipped, with one warning that counts them); a .py
    file (its units); a path to a .jsonl / .jsonl.gz / .json / .parquet file; or a `datasets` dataset name or
    builder (loaded lazily with ``split``).
    text_column: the field holding the code (files and datasets). limit: keep the first ``limit`` documents.
    Raises ValueError naming the argument on a missing file, a missing column, a bad limit, a directory without
    .py files or without usable documents; warns when most documents of a file or dataset do not parse as Python.
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
    name = path.name.lower()
    if path.is_dir():
        texts = _load_directory(path, src)
        return texts[:limit] if limit is not None else texts
    if path.suffix.lower() in _FILE_SUFFIXES + (".py",) or name.endswith(".jsonl.gz") or path.exists():
        if not path.is_file():
            raise ValueError(f"source {src!r} does not exist (or is not a file)")
        suffix = path.suffix.lower()
        if name.endswith(".jsonl.gz"):
            records = _read_jsonl(path, compressed=True)
        elif suffix == ".jsonl":
            records = _read_jsonl(path)
        elif suffix == ".json":
            records = _read_json(path)
        elif suffix == ".parquet":
            records = _read_parquet(path, text_column)
        elif suffix == ".py":
            try:
                units = python_units(path.read_bytes().decode("utf-8-sig"))
            except (UnicodeDecodeError, SyntaxError, ValueError, RecursionError) as exc:
                raise ValueError(f"source {src!r} is not a Python file that parses ({type(exc).__name__}: {exc})") \
                    from None
            records = [{text_column: u.text} for u in units]
        else:
            raise ValueError(f"source {src!r}: unsupported file type {suffix!r}; use a directory of .py files, a "
                             f".py, .jsonl, .jsonl.gz, .json or .parquet file")
    else:
        records = _load_dataset(src, text_column, split, limit)
    texts = _column(records, text_column, src)
    if not texts:
        raise ValueError(f"source {src!r} holds no documents")
    texts = texts[:limit] if limit is not None else texts
    _warn_unless_python(texts, src, text_column)
    return texts


def _warn_unless_python(texts: list[str], src: str, text_column: str, sample: int = 500) -> None:
    """One warning when most documents (of the first ``sample``) do not parse as Python: prose, or the wrong
    column, would otherwise train without a word."""
    checked = texts[:sample]
    failing = 0
    for text in checked:
        try:
            ast.parse(text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            failing += 1
    if failing * 2 > len(checked):
        warnings.warn(f"source {src!r}: {failing} of the first {len(checked)} documents (column {text_column!r}) "
                      f"do not parse as Python; RA3 mid-trains on code: is this the right corpus and text_column?",
                      stacklevel=3)

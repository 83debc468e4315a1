"""Generate ra3's embedded corpora from the Python standard library: real code, with its comments and docstrings.

Every ``.py`` file of the standard library of the running Python (``sysconfig``'s ``stdlib`` path; the shipped
files come from CPython 3.11.7, ``Lib/`` of pyenv's build) is cut into documents by
``ra3.data.corpus.python_units`` (top-level functions and methods, 4-40 lines, the comment lines above a def
included). Two disjoint sets are written, split by module (no module is in both):

- ``ra3/data/default_corpus.jsonl``: the mid-training default, ~2,000 documents of library modules (never of a
  test suite). Modules join it in the order of the SHA-256 of their name, each one only if it has at most
  ``--max-module-docs`` documents (so no module dominates: tkinter's 354 stay out) and the set stays under
  ``--max-docs``, until it holds ``--min-docs``.
- ``ra3/data/pretrain_corpus.jsonl.gz``: every other document, test suites included: the pretraining set of
  ``ra3-tiny`` (``scripts/pretrain_base.py``).

Records are ``{"content": text, "source": "module:qualname"}``; exact duplicates are kept once (the first in the
default set, then in the pretraining set). Each file is ordered by the SHA-256 of its sources, so its first
documents are a spread of modules (``load_code_corpus(limit=k)``), and the output is byte-for-byte the same on
every run. Also written: ``ra3/data/LICENSE-PSF.txt`` (the stdlib's LICENSE.txt: CPython is under the PSF
License Agreement) and ``ra3/data/CORPUS.md`` (sizes and comment shares).

    python scripts/make_corpus.py                       # rewrites the files above
    python scripts/make_corpus.py --stdlib /usr/lib/python3.11 --out-dir /tmp/corpus
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import platform
import re
import shutil
import sys
import sysconfig
from pathlib import Path

from ra3.data.corpus import (MAX_LINE_CHARS, MAX_UNIT_LINES, MIN_UNIT_LINES, comment_shares, python_files,
                             python_units)

DATA_DIR = Path(__file__).resolve().parent.parent / "ra3" / "data"
SHIPPED_PYTHON = "3.11.7"  # the CPython whose standard library the shipped files come from
# Test suites: test/, tests/, idlelib/idle_test/ and test_*.py files. They only go to the pretraining set.
TEST_PATH = re.compile(r"(^|/)(test|tests|idle_test)(/|$)|(^|/)test_[^/]*\.py$")


def module_name(rel_path: str) -> str:
    """'email/mime/text.py' -> 'email.mime.text'; 'json/__init__.py' -> 'json'."""
    parts = rel_path[:-len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def collect(stdlib: Path) -> tuple[dict[str, list[tuple[str, str]]], set[str], list[str]]:
    """{module: [(qualname, text), ...]} of every file under ``stdlib``, the test modules, the files skipped."""
    modules, tests, skipped = {}, set(), []
    for rel in python_files(stdlib):
        try:
            units = python_units((stdlib / rel).read_bytes().decode("utf-8-sig"))
        except (UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
            skipped.append(rel)  # lib2to3's Python 2 test data, badsyntax_*.py, ...
            continue
        name = module_name(rel)
        if name in modules:  # never happens in CPython; keep the first file of a name
            continue
        modules[name] = [(u.qualname, u.text) for u in units]
        if TEST_PATH.search(rel):
            tests.add(name)
    return modules, tests, skipped


def split(modules: dict[str, list[tuple[str, str]]], tests: set[str], min_docs: int, max_docs: int,
          max_module_docs: int):
    """(default records, pretraining records, default module names), duplicates removed, each list in hash order."""
    default_modules, count = [], 0
    for name in sorted((m for m in modules if m not in tests and modules[m]), key=_sha):
        if count >= min_docs:
            break
        n = len(modules[name])
        if n <= max_module_docs and count + n <= max_docs:
            default_modules.append(name)
            count += n
    chosen = set(default_modules)
    seen: set[str] = set()

    def records(names):
        out = []
        for name in sorted(names):
            for qualname, text in modules[name]:
                if text not in seen:
                    seen.add(text)
                    out.append({"content": text, "source": f"{name}:{qualname}"})
        return sorted(out, key=lambda r: _sha(r["source"]))

    default = records(chosen)
    pretrain = records(m for m in modules if m not in chosen)
    return default, pretrain, sorted(chosen)


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(data)
    return buf.getvalue()


def _describe(name: str, records, size: int) -> str:
    s = comment_shares([r["content"] for r in records])
    n_modules = len({r["source"].split(":")[0] for r in records})
    chars = sum(len(r["content"]) for r in records)
    return (f"| {name} | {len(records):,} | {n_modules:,} | {s['lines']:,} | {chars:,}"
            f" | {size:,} | {s['comment_line_share']:.2%} | {s['commented_code_share']:.2%} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="the standard library to read (default: the running Python's)")
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--min-docs", type=int, default=2000)
    parser.add_argument("--max-docs", type=int, default=2500)
    parser.add_argument("--max-module-docs", type=int, default=150)
    args = parser.parse_args(argv)
    version = platform.python_version()
    if version != SHIPPED_PYTHON:
        print(f"note: running Python {version}; the shipped files were made from {SHIPPED_PYTHON}'s standard "
              f"library, so the output will differ", file=sys.stderr)
    modules, tests, skipped = collect(args.stdlib)
    default, pretrain, default_modules = split(modules, tests, args.min_docs, args.max_docs,
                                                 args.max_module_docs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    default_bytes = _jsonl(default)
    pretrain_bytes = _gzip(_jsonl(pretrain))
    (args.out_dir / "default_corpus.jsonl").write_bytes(default_bytes)
    (args.out_dir / "pretrain_corpus.jsonl.gz").write_bytes(pretrain_bytes)
    shutil.copyfile(args.stdlib / "LICENSE.txt", args.out_dir / "LICENSE-PSF.txt")
    table = "\n".join([
        "| file | documents | modules | lines | characters | bytes on disk | comment lines | code lines after a "
        "comment |",
        "|---|---|---|---|---|---|---|---|",
        _describe("default_corpus.jsonl", default, len(default_bytes)),
        _describe("pretrain_corpus.jsonl.gz", pretrain, len(pretrain_bytes)),
    ])
    card = f"""# ra3's embedded corpora

Generated by `python scripts/make_corpus.py` from the standard library of Python {version}
(`{args.stdlib}`); do not edit by hand. Real Python, with its authors' comments and docstrings.
CPython is under the PSF License Agreement (`LICENSE-PSF.txt`, a copy of the stdlib's LICENSE.txt).

A document is a top-level function or a method of a top-level class with its decorators and the comment lines
directly above it, moved to column 0, that parses on its own and has {MIN_UNIT_LINES}-{MAX_UNIT_LINES} lines of at
most {MAX_LINE_CHARS} characters (`ra3.data.corpus.python_units`). {len(modules):,} modules read
({len(tests):,} of them test suites); {len(skipped)} files skipped because they do not parse (lib2to3's
Python 2 test data, bad-syntax tests).

- `default_corpus.jsonl`: the mid-training default (`load_code_corpus()`): {len(default_modules)} library modules
  chosen in the order of the SHA-256 of their names (at most {args.max_module_docs} documents each).
- `pretrain_corpus.jsonl.gz`: all other modules, test suites included: the pretraining set of `ra3-tiny`.

No module is in both; exact duplicates are kept once. "comment lines": lines whose stripped text starts with
"#", over all lines. "code lines after a comment": non-blank, non-comment lines whose previous line is a comment
line, over all non-blank, non-comment lines (the rate at which the code's authors "think" before a line).

{table}
"""
    (args.out_dir / "CORPUS.md").write_text(card, encoding="utf-8")
    print(card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

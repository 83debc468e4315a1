"""A synthetic task set for trying RLVR end to end on a laptop: one-line functions with unit tests.

Each task is a function whose docstring says what to return and whose body the model writes after ``return``:
one of its arguments by name (``def pick_3(left, right): \"\"\"Return right.\"\"\"``), a constant (``True``,
``False``, ``None``) or an integer. Answers are whole lines (the name or value, then the newline that ends the
line), sampled token by token. Three graded tests per task: the program loads (``callable``), the value has the
right type, the value is right. The shipped ``ra3-tiny`` solves some of them from the start (it copies an
argument's name or writes a constant now and then), so the pass rate starts above zero and GRPO has a signal
from step 0. These are generated, not benchmark data.
"""
from __future__ import annotations

import random

from ra3.eval.benchmarks import Task

ARGUMENTS = (("x",), ("a", "b"), ("x", "y"), ("left", "right"), ("value", "default"), ("a", "b", "c"),
             ("x", "y", "z"), ("name", "value"), ("first", "second"))
CONSTANTS = ("True", "False", "None")
KINDS = ("argument", "argument", "constant", "integer")  # the mix, in the order tasks cycle through it


def toy_tasks(n: int = 16, seed: int = 0) -> list[Task]:
    """``n`` tasks, the kinds of KINDS in turn, each drawn deterministically from ``seed``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = random.Random(seed)
    return [_task(i, KINDS[i % len(KINDS)], rng) for i in range(n)]


def _task(i: int, kind: str, rng: random.Random) -> Task:
    if kind == "argument":
        args = rng.choice(ARGUMENTS)
        j = rng.randrange(len(args))
        name, answer, signature = f"pick_{i}", args[j], ", ".join(args)
        calls = [tuple(range(10 * t + 1, 10 * t + 1 + len(args))) for t in (1, 2)]  # distinct values per call
        tests = (f"assert callable({name})", f"assert isinstance({name}(*{calls[0]}), int)",
                 *(f"assert {name}(*{c}) == {c[j]}" for c in calls))
    elif kind == "constant":
        answer, signature, name = rng.choice(CONSTANTS), "", f"constant_{i}"
        tests = (f"assert callable({name})", f"assert type({name}()) in (bool, type(None))",
                 f"assert {name}() is {answer}")
    else:
        answer, signature, name = str(rng.randint(0, 9)), "", f"answer_{i}"
        tests = (f"assert callable({name})", f"assert isinstance({name}(), int)", f"assert {name}() == {answer}")
    prompt = f'def {name}({signature}):\n    """Return {answer}."""\n    return'
    return Task(task_id=f"toy/{i}", prompt=prompt, tests=tests, entry_point=name, prefix=prompt, stop=("\n",),
                reference=f" {answer}", meta={"benchmark": "toy", "kind": kind})

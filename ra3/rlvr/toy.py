"""A synthetic task set for trying RLVR end to end on a laptop: tiny programs with unit tests.

Task i asks for a one-line function body returning a given integer; its three tests give graded credit:
the program loads (``callable``), the function returns an int, and it returns the right int. Even a randomly
initialised tiny model hits the first level by chance, so GRPO has a learning signal from step 0. These are
generated, not benchmark data.
"""
from __future__ import annotations

import random

from ra3.eval.benchmarks import Task


def toy_tasks(n: int = 16, seed: int = 0) -> list[Task]:
    """``n`` tasks "return the integer k" (k in 0..9), deterministic for ``seed``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        k = rng.randint(0, 9)
        name = f"answer_{i}"
        prompt = f'def {name}():\n    """Return the integer {k}."""\n    return '
        tests = (f"assert callable({name})", f"assert isinstance({name}(), int)", f"assert {name}() == {k}")
        tasks.append(Task(task_id=f"toy/{i}", prompt=prompt, tests=tests, entry_point=name, prefix=prompt,
                          stop=("\n",), reference=str(k), meta={"benchmark": "toy"}))
    return tasks

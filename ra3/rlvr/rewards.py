"""Verifiable rewards: run each sampled completion against its task's unit tests in the sandbox."""
from __future__ import annotations

from collections.abc import Sequence

from ra3.eval.benchmarks import Task
from ra3.eval.sandbox import ExecResult, Sandbox


class UnitTestReward:
    """reward = 1.0 when every test passes, else 0.0; with ``partial_credit`` the fraction of tests passed.

    Identical (task, completion) pairs in one call run once: a policy that has converged samples many
    duplicates, and a program's verdict does not depend on how often it was drawn.
    """

    def __init__(self, sandbox: Sandbox, *, partial_credit: bool = False, workers: int | None = None,
                 progress: bool = False):
        if not isinstance(sandbox, Sandbox):
            raise TypeError(f"sandbox must be a ra3.eval.Sandbox, got {type(sandbox).__name__}")
        self.sandbox, self.partial_credit, self.workers, self.progress = sandbox, partial_credit, workers, progress

    def __call__(self, tasks: Sequence[Task], completions: Sequence[str]) -> tuple[list[float], list[ExecResult]]:
        """Rewards and execution results for ``completions[i]`` (post-processed code) of ``tasks[i]``."""
        if len(tasks) != len(completions):
            raise ValueError(f"tasks has {len(tasks)} entries but completions has {len(completions)}")
        keys = [(t.task_id, c) for t, c in zip(tasks, completions)]
        first: dict = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        unique = list(first)
        jobs = [tasks[first[k]].job(k[1], stop_on_failure=not self.partial_credit) for k in unique]
        verdicts = dict(zip(unique, self.sandbox.run_many(jobs, workers=self.workers, desc="rewards",
                                                          progress=self.progress)))
        results = [verdicts[k] for k in keys]
        rewards = [r.fraction_passed if self.partial_credit else float(r.passed) for r in results]
        return rewards, results

"""Code evaluation: benchmark tasks, prompts, a process sandbox with hard limits, and pass@k.

Importing this package loads no model code (no torch): ``ra3.generation`` is imported only to sample.
"""
from ra3.eval.benchmarks import BENCHMARKS, Task, load_tasks
from ra3.eval.evaluate import generate_samples, read_samples, score_samples, summarize
from ra3.eval.passk import mean_pass_at_k, pass_at_k, pass_at_ks
from ra3.eval.sandbox import ExecResult, IOCase, Sandbox, SandboxConfig, StdioJob, TestJob, outputs_match

__all__ = [
    "BENCHMARKS", "Task", "load_tasks", "generate_samples", "read_samples", "score_samples", "summarize",
    "pass_at_k", "mean_pass_at_k", "pass_at_ks", "Sandbox", "SandboxConfig", "TestJob", "StdioJob", "IOCase",
    "ExecResult", "outputs_match",
]

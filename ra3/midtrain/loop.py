"""The RA3 EM loop, top to bottom: per round, E-step (RL over latents), annotate + ELBO, M-step (NTP on the
annotated code), held-out NTP loss. ``objective='ntp'`` runs the baseline: the same M-step budget on plain code.

Resumable: ``DIR/checkpoints/<objective>/latest.pt`` holds the weights, the optimizer, the reference policy, the
annotations and the position in the loop; every random draw is seeded by (seed, objective, round, phase,
step), so a resumed run writes the same metrics as an uninterrupted one.

Distributed (``distributed: ddp | fsdp`` under torchrun): every rank samples and trains on its share of each
step's documents, gradients are averaged over ranks (DDP / FSDP2), metrics describe the whole step, rank 0
alone writes files and logs; the checkpoint is then a sharded ``DIR/checkpoints/<objective>/sharded``
directory (``ra3.distributed.save_checkpoint``) holding the same things, resumable under ddp or fsdp.
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import time
import zlib
from pathlib import Path

import torch

from ra3 import distributed as dist
from ra3.data.corpus import load_code_corpus
from ra3.data.sequences import CommentVocab, Document, annotated_text, build_sequences, check_annotation, make_documents
from ra3.midtrain.config import MidtrainConfig
from ra3.midtrain.e_step import annotate, e_step
from ra3.midtrain.m_step import heldout_loss, m_step
from ra3.midtrain.records import (MetricsWriter, load_run_state, save_checkpoint, save_sharded_checkpoint,
                                  summary_table)
from ra3.midtrain.rollout import HFGenerator
from ra3.midtrain.scoring import PolicyHead, output_head

# config fields that may change between a run and its resumption without changing what it computes
_RESUME_FREE_FIELDS = ("out", "resume", "stop_after_steps", "progress", "checkpoint_every", "num_samples",
                       "distributed")


class StopRun(Exception):
    """Raised when ``stop_after_steps`` optimizer steps have run (a planned interruption)."""


def step_seed(*parts) -> int:
    """A stable 31-bit seed from any JSON-able parts (Python's hash() is salted per process; crc32 is not)."""
    return zlib.crc32(json.dumps(parts).encode()) & 0x7FFFFFFF


def prepare_documents(cfg: MidtrainConfig, tokenizer) -> tuple[list[Document], list[Document]]:
    """(training documents, held-out documents): corpus -> actions -> tokens, shuffled by seed, then split."""
    try:
        texts = load_code_corpus(cfg.corpus, text_column=cfg.text_column, split=cfg.split, limit=cfg.corpus_limit)
    except (ValueError, TypeError, ImportError) as exc:
        name = "text_column" if "text_column" in str(exc) else "corpus"
        raise ValueError(f"config field {name!r}: {exc}") from exc
    docs = make_documents(texts, tokenizer, unit=cfg.action_unit, max_actions=cfg.max_actions,
                          max_action_tokens=cfg.max_action_tokens)
    if len(docs) < 2:
        raise ValueError(f"config field 'corpus': {len(docs)} usable document(s) after splitting into actions; "
                         f"need at least 2")
    random.Random(cfg.seed).shuffle(docs)
    n_held = min(int(round(len(docs) * cfg.heldout_fraction)), len(docs) - 1)
    if cfg.heldout_fraction > 0:
        n_held = max(n_held, 1)
    return docs[n_held:], docs[:n_held]


def _batch_indices(n: int, batch_size: int, step: int, *seed_parts) -> list[int]:
    """Indices of M-step batch ``step``: consecutive slices of a stream of seeded permutations of range(n)."""
    out, start = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(*seed_parts, epoch)))
        out.extend(perm[offset:offset + batch_size - len(out)].tolist())
    return out


def _rollout_engine(cfg: MidtrainConfig, model, tokenizer, vocab: CommentVocab, *, progress: bool):
    """The E-step's rollout engine: Hugging Face (shares the trainer's model) or vLLM (a synced copy)."""
    if cfg.engine == "vllm":
        from ra3.midtrain.rollout_vllm import VLLMGenerator  # noqa: PLC0415  (vllm loads only when asked for)

        return VLLMGenerator(model, tokenizer, vocab, max_rationale_tokens=cfg.max_rationale_tokens,
                             temperature=cfg.rollout_temperature, seed=cfg.seed)
    return HFGenerator(model, vocab, max_rationale_tokens=cfg.max_rationale_tokens,
                       temperature=cfg.rollout_temperature, batch_size=cfg.rollout_batch_size, progress=progress,
                       backend=cfg.ops_backend)


def _check_resumable(saved: dict, cfg: MidtrainConfig) -> None:
    now = cfg.to_dict()
    diff = sorted(k for k in now if k not in _RESUME_FREE_FIELDS and saved["config"].get(k) != now[k])
    if diff:
        raise ValueError(f"config field(s) {diff} differ from the checkpoint in {cfg.out!r}; resume with the same "
                         f"config, or pass --resume false (starts over) or a new --out")


def run_midtrain(cfg: MidtrainConfig) -> dict:
    """Run (or resume) the configured objective(s) to completion. Returns {'status', 'out', 'records', 'table'}.

    With ``distributed`` ddp / fsdp, every process torchrun started calls it (it joins their process group)."""
    cfg.validate()
    with dist.session(cfg.distributed, backend="gloo" if cfg.device == "cpu" else None):
        return _run_midtrain(cfg)


def _run_midtrain(cfg: MidtrainConfig) -> dict:
    out = Path(cfg.out)
    objectives = ["ra3", "ntp"] if cfg.objective == "both" else [cfg.objective]
    sharded = cfg.distributed != "none"
    if not cfg.resume and dist.is_main():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    dist.barrier()
    saved = {o: load_run_state(out / "checkpoints" / o, sharded=sharded) if cfg.resume else None for o in objectives}
    keep = 0  # metrics lines that the checkpoint we resume from had written
    for o in objectives:
        if saved[o] is None:
            break
        _check_resumable(saved[o], cfg)
        keep = saved[o]["metrics_lines"]
        if not saved[o]["progress"]["done"]:
            break
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    dist.log(f"ra3 midtrain: config written to {out / 'config.yaml'}")
    writer = MetricsWriter(out, keep_lines=keep)
    budget = {"steps": 0}
    status = "completed"
    threads = torch.get_num_threads()
    if cfg.cpu_threads:
        # tiny matmuls gain nothing from a second thread, and OpenMP spin-waits collapse on a busy machine
        torch.set_num_threads(cfg.cpu_threads)
    try:
        for o in objectives:
            if saved[o] is not None and saved[o]["progress"]["done"]:
                dist.log(f"ra3 midtrain: {o} already complete in {out}; skipping")
                continue
            _run_objective(o, cfg, out, writer, saved[o], budget)
    except StopRun:
        status = "stopped"
        dist.log(f"ra3 midtrain: stopped after {budget['steps']} steps (stop_after_steps); rerun to resume")
    finally:
        torch.set_num_threads(threads)
    dist.barrier()  # rank 0 has written every record
    records = writer.records()
    table = summary_table(records)
    if dist.is_main():
        (out / "summary.md").write_text(table + "\n", encoding="utf-8")
    dist.log(f"\n{table}\n\nmetrics: {writer.path}")
    return {"status": status, "out": str(out), "records": records, "table": table}


def _run_objective(objective: str, cfg: MidtrainConfig, out: Path, writer: MetricsWriter, saved: dict | None,
                   budget: dict) -> None:
    from tqdm.auto import tqdm

    from ra3.models import load_model

    ra3 = objective == "ra3"
    info = dist.get_info()
    if ra3 and cfg.engine == "vllm":
        from ra3.midtrain.rollout_vllm import require_vllm  # noqa: PLC0415

        require_vllm()  # a missing vllm is named before any model loads
    try:
        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=str(info.device) if info.distributed
                                      else cfg.device, seed=cfg.seed)
    except ValueError as exc:
        name = "device" if str(exc).startswith("device") else "model"
        raise ValueError(f"config field {name!r}: {exc}") from exc
    try:
        vocab = CommentVocab(tokenizer, output_head(model)[0].shape[0])
    except ValueError as exc:
        raise ValueError(f"config field 'model': {exc}") from exc
    head = PolicyHead(vocab, output_head(model)[0].device)
    train_docs, heldout_docs = prepare_documents(cfg, tokenizer)
    _check_rank_shares(cfg, ra3, len(train_docs), info.world_size)
    heldout_plain = build_sequences(heldout_docs, vocab)
    generator = _rollout_engine(cfg, model, tokenizer, vocab, progress=cfg.progress and info.is_main)
    ckpt_dir = out / "checkpoints" / objective
    first_phase = "e_step" if ra3 else "annotate"
    p = {"iteration": 0, "phase": first_phase, "phase_step": 0, "step": 0, "done": False, "acc": {}}
    ref_state = opt_state = annotations = None
    model = dist.wrap_model(model, cfg.distributed)  # DDP / FSDP2 under torchrun; the model itself otherwise
    if saved is not None:
        ref_state, opt_state = _restore_weights(saved, model, cfg)
        p, annotations = saved["progress"], saved["annotations"]
        dist.log(f"ra3 midtrain: resuming {objective} at round {p['iteration']}, {p['phase']} step {p['phase_step']}")
    live = {"ref": None, "opt": None}

    def checkpoint():
        run_state = {"config": cfg.to_dict(), "progress": copy.deepcopy(p), "annotations": annotations,
                     "metrics_lines": writer.lines}
        if cfg.distributed != "none":
            save_sharded_checkpoint(ckpt_dir, {**run_state, "model": model, "ref": live["ref"],
                                               "optimizer": live["opt"]})
            return
        save_checkpoint(ckpt_dir, {
            **run_state, "model": model.state_dict(),
            "ref": live["ref"].state_dict() if live["ref"] is not None else None,
            "optimizer": live["opt"].state_dict() if live["opt"] is not None else None})

    def finish_step(record: dict):
        p["step"] += 1
        p["phase_step"] += 1
        budget["steps"] += 1
        writer.write({"kind": "step", "objective": objective, "iteration": p["iteration"], "phase": p["phase"],
                      "step": p["step"], "phase_step": p["phase_step"], **record})
        bar.update(1)
        if p["phase_step"] % cfg.checkpoint_every == 0:
            checkpoint()
        if cfg.stop_after_steps is not None and budget["steps"] >= cfg.stop_after_steps:
            raise StopRun

    def optimizer(lr, state):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        if state is not None:
            opt.load_state_dict(state)
        return opt

    steps_per_round = (cfg.e_steps if ra3 else 0) + cfg.m_steps
    bar = tqdm(total=cfg.em_iterations * steps_per_round, initial=p["step"], desc=f"midtrain {objective}",
               unit="step", disable=not (cfg.progress and info.is_main), dynamic_ncols=True)
    try:
        while p["iteration"] < cfg.em_iterations:
            it = p["iteration"]
            seed = (cfg.seed, objective, it)
            data_seed = (cfg.seed, it)  # RA3 and NTP see the same documents in the same order
            rng = random.Random(step_seed(*data_seed, "annotate-docs"))
            round_docs = train_docs if cfg.annotate_docs is None or cfg.annotate_docs >= len(train_docs) else \
                rng.sample(train_docs, cfg.annotate_docs)

            # ---- E-step: RL over latents (q = the policy; the reference is the policy at the round's start)
            if p["phase"] == "e_step":
                live["ref"] = dist.frozen_copy(model) if cfg.kl_coef > 0 else None
                if ref_state is not None and live["ref"] is not None:
                    live["ref"].load_state_dict(ref_state)
                live["opt"] = optimizer(cfg.e_lr, opt_state)
                ref_state = opt_state = None
                while p["phase_step"] < cfg.e_steps:
                    s = p["phase_step"]
                    perm = torch.randperm(len(train_docs), generator=torch.Generator().manual_seed(
                        step_seed(*seed, "e_step-docs", s)))
                    docs = dist.shard([train_docs[i] for i in perm[:cfg.e_docs_per_step].tolist()])  # this rank's
                    m = e_step(model, live["ref"], live["opt"], docs, generator, head, vocab, cfg,
                               seed=step_seed(*seed, "e_step", s))
                    _warn_if_silent(m, it, s)
                    acc = p["acc"]
                    acc["estep_return_sum"] = acc.get("estep_return_sum", 0.0) + m["return_mean"]
                    acc["estep_advantage_abs_sum"] = acc.get("estep_advantage_abs_sum", 0.0) + m["advantage_abs_mean"]
                    acc["estep_tokens"] = acc.get("estep_tokens", 0) + m["tokens"]
                    acc["estep_think_q_sum"] = acc.get("estep_think_q_sum", 0.0) + m["think_q_mean"]
                    acc["estep_time"] = acc.get("estep_time", 0.0) + m["time_s"]
                    acc["estep_steps"] = acc.get("estep_steps", 0) + 1
                    bar.set_postfix(ret=f"{m['return_mean']:.1f}", thinks=f"{m['thinks_per_100_lines']:.0f}%")
                    finish_step(m)
                live["ref"] = live["opt"] = None
                p["phase"], p["phase_step"] = "annotate", 0
                checkpoint()

            # ---- annotate the round's documents with q, and the ELBO on them (RA3); plain code for NTP
            if p["phase"] == "annotate":
                if ra3:
                    t_annotate = time.perf_counter()
                    annotations, parts, tps = annotate(model, generator, round_docs, head, vocab, cfg,
                                                       seed=step_seed(*seed, "annotate"))
                    for doc, comments in zip(round_docs, annotations):
                        check_annotation(doc, comments)  # each inserted line is a comment; the code is intact
                    lines, thinks = float(parts["num_lines"].sum()), float(parts["thinks"].sum())
                    p["acc"].update({
                        "elbo": float(parts[f"elbo_{cfg.kl_form}"].mean()),
                        "elbo_fixed": float(parts["elbo_fixed"].mean()),
                        "elbo_exact": float(parts["elbo_exact"].mean()),
                        "expert_loglik": float(parts["expert_loglik"].mean()),
                        "expert_loglik_per_token": float(parts["expert_loglik"].sum() / parts["code_tokens"].sum()),
                        "thinks_per_100_lines": 100.0 * thinks / max(lines, 1.0),
                        "rationale_len_mean": float(parts["rationale_tokens"].sum()) / max(thinks, 1.0),
                        "cost_paid": float(parts["cost_paid"].mean()),
                        "kl_decision": float(parts["kl_decision"].mean()),
                        "kl_comment": float(parts["kl_comment"].mean()),
                        "annotate_tokens_per_s": tps,
                        "annotate_time_s": time.perf_counter() - t_annotate,
                        "annotate_tokens": int(parts["tokens"].sum())})
                    if info.is_main:
                        _write_samples(out / "samples" / f"{objective}-iter{it}.md", round_docs, annotations, parts,
                                       cfg.num_samples)
                else:
                    annotations = [{} for _ in round_docs]
                p["phase"], p["phase_step"] = "m_step", 0
                checkpoint()

            # ---- M-step: NTP on the annotated documents (or on plain code for the baseline)
            if p["phase"] == "m_step":
                data = build_sequences(round_docs, vocab, annotations)
                live["opt"] = optimizer(cfg.m_lr, opt_state)
                opt_state = None
                while p["phase_step"] < cfg.m_steps:
                    s = p["phase_step"]
                    idx = _batch_indices(len(data), cfg.m_batch_size, s, *data_seed, "m_step")
                    m = m_step(model, live["opt"], [data[i] for i in dist.shard(idx)], pad_id=vocab.pad_id,
                               tokens=cfg.mstep_tokens, grad_clip=cfg.grad_clip, backend=cfg.ops_backend)
                    # which expert documents this step trained on (the same for RA3 and NTP)
                    m["documents_crc"] = zlib.crc32("\0".join(round_docs[i].text for i in idx).encode())
                    acc = p["acc"]
                    acc["mstep_loss_last"] = m["loss"]
                    acc["mstep_tokens"] = acc.get("mstep_tokens", 0) + m["tokens"]
                    acc["mstep_code_tokens"] = acc.get("mstep_code_tokens", 0) + m["code_tokens"]
                    acc["mstep_time"] = acc.get("mstep_time", 0.0) + m["time_s"]
                    bar.set_postfix(loss=f"{m['loss']:.3f}")
                    finish_step(m)
                live["opt"] = None

                # ---- end of round: held-out NTP loss, the round's record
                acc = p["acc"]
                n_e = acc.get("estep_steps", 0)
                record = {
                    "kind": "iteration", "objective": objective, "iteration": it, "step": p["step"],
                    "elbo": acc.get("elbo"), "elbo_fixed": acc.get("elbo_fixed"),
                    "elbo_exact": acc.get("elbo_exact"), "expert_loglik": acc.get("expert_loglik"),
                    "expert_loglik_per_token": acc.get("expert_loglik_per_token"),
                    "thinks_per_100_lines": acc.get("thinks_per_100_lines"),
                    "rationale_len_mean": acc.get("rationale_len_mean"),
                    "cost_paid": acc.get("cost_paid"), "kl_decision": acc.get("kl_decision"),
                    "kl_comment": acc.get("kl_comment"),
                    "estep_return_mean": acc["estep_return_sum"] / n_e if n_e else None,
                    "estep_advantage_abs_mean": acc["estep_advantage_abs_sum"] / n_e if n_e else None,
                    "mstep_loss": acc.get("mstep_loss_last"),
                    "heldout_ntp_loss": heldout_loss(model, heldout_plain, pad_id=vocab.pad_id, tokens="all",
                                                     batch_size=cfg.eval_batch_size, backend=cfg.ops_backend),
                    "heldout_code_loss": _heldout_code_loss(model, generator, heldout_docs, vocab, cfg, data_seed),
                    "think_q_mean": acc["estep_think_q_sum"] / n_e if n_e else None,
                    "mstep_steps": cfg.m_steps, "mstep_code_tokens": acc.get("mstep_code_tokens", 0),
                    "estep_tokens": acc.get("estep_tokens", 0), "estep_time_s": acc.get("estep_time", 0.0),
                    "annotate_tokens": acc.get("annotate_tokens", 0), "annotate_time_s": acc.get("annotate_time_s", 0.0),
                    "estep_tokens_per_s": acc["estep_tokens"] / acc["estep_time"] if n_e else None,
                    "mstep_tokens_per_s": (acc["mstep_tokens"] / acc["mstep_time"]) if acc.get("mstep_time")
                    else None,
                    "annotate_tokens_per_s": acc.get("annotate_tokens_per_s"),
                }
                writer.write(record)
                p.update({"iteration": it + 1, "phase": first_phase, "phase_step": 0, "acc": {}})
                annotations = None
                checkpoint()
        dist.save_pretrained(model, out / objective / "final", tokenizer)
        p["done"] = True
        checkpoint()
    finally:
        bar.close()


def _check_rank_shares(cfg: MidtrainConfig, ra3: bool, n_train: int, world_size: int) -> None:
    """Under ddp / fsdp every rank needs at least one document (rollout group, sequence) of every step."""
    if world_size == 1:
        return
    counts = {"m_batch_size": cfg.m_batch_size}
    if ra3:
        counts["e_docs_per_step"] = cfg.e_docs_per_step if cfg.e_steps else world_size
        counts["annotate_docs"] = min(cfg.annotate_docs or n_train, n_train)
    for name, n in counts.items():
        if n < world_size:
            raise ValueError(f"config field {name!r}: {n} cannot be shared by {world_size} ranks (each needs at "
                             f"least one); use at least {world_size}")


def _restore_weights(saved: dict, model, cfg: MidtrainConfig) -> tuple[dict | None, dict | None]:
    """Load the checkpoint's weights into ``model``; return (reference policy state, optimizer state), each None
    where the checkpoint has none, to load when their phase starts."""
    if "sharded" not in saved:
        model.load_state_dict(saved["model"])
        return saved["ref"], saved["optimizer"]
    # sharded: load in place, into a reference policy and an optimizer built like the saved ones
    held = dist.checkpoint_contents(saved["sharded"])
    ref = dist.frozen_copy(model) if "ref" in held["modules"] else None
    opt = torch.optim.AdamW(model.parameters(), weight_decay=cfg.weight_decay) if held["optimizer"] else None
    dist.load_checkpoint({"model": model, "optimizer": opt, "ref": ref}, saved["sharded"])
    return (None if ref is None else ref.state_dict()), (None if opt is None else opt.state_dict())


def _heldout_code_loss(model, generator, docs: list[Document], vocab: CommentVocab, cfg: MidtrainConfig,
                       data_seed: tuple) -> float:
    """Mean NLL per expert-code token of the held-out documents, each annotated by one rollout of the model's
    own q (comment, think and decision-position tokens excluded): the number RA3 and NTP are compared on (same
    documents, same seed for both objectives)."""
    if not docs:
        return float("nan")
    with dist.full_params(model) as q:  # every rank annotates all (few) documents alike, then scores its share
        q.eval()
        generator.sync_weights(q)
        comments = generator.rollout(docs, seed=step_seed(*data_seed, "heldout"))
    return heldout_loss(model, build_sequences(docs, vocab, comments), pad_id=vocab.pad_id, tokens="code-only",
                        batch_size=cfg.eval_batch_size, backend=cfg.ops_backend)


def _warn_if_silent(m: dict, iteration: int, step: int) -> None:
    """One line when an E-step cannot learn: no think sampled, or every advantage zero."""
    if m.get("thinks_per_100_lines", 0.0) == 0.0:
        dist.log(f"ra3 midtrain: warning: E-step {step} of round {iteration} sampled no think at all "
                 f"(mean q(think) {m.get('think_q_mean', 0.0):.2e}): nothing to learn from this step")
    elif m.get("advantage_abs_mean", 0.0) == 0.0:
        dist.log(f"ra3 midtrain: warning: E-step {step} of round {iteration}: every advantage is zero "
                 f"(all rollouts of each document identical or equally rewarded)")


def _write_samples(path: Path, docs, annotations, parts, n: int) -> None:
    """The first ``n`` annotated documents, as code with their comment lines, and each one's ELBO terms."""
    if n == 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = [f"# Annotated samples ({time.strftime('%Y-%m-%d %H:%M:%S')})\n"]
    for i in range(min(n, len(docs))):
        doc, comments = docs[i], annotations[i]
        # 1-based line numbers of the inserted comments in the annotated text (the expert's own comments stay)
        rows = [doc.text.count("\n", 0, doc.anchors[k]) + j + 1 for j, k in enumerate(sorted(comments))]
        chunks.append(f"## document {i}: {int(parts['thinks'][i])} thinks (inserted lines: "
                      f"{', '.join(map(str, rows)) or 'none'}), expert loglik "
                      f"{float(parts['expert_loglik'][i]):.2f}, ELBO (fixed) {float(parts['elbo_fixed'][i]):.2f}, "
                      f"ELBO (exact) {float(parts['elbo_exact'][i]):.2f}\n\n```python\n"
                      f"{annotated_text(doc, comments)}```\n")
    path.write_text("\n".join(chunks), encoding="utf-8")

"""The RA3 EM loop, top to bottom: per round, E-step (RL over latents), annotate + ELBO, M-step (NTP on the
annotated code), held-out NTP loss. ``objective='ntp'`` runs the baseline: the same M-step budget on plain code.

The run directory is ``ra3.train.run``'s. Resumable by rerunning: ``DIR/checkpoints/<objective>/latest.pt`` holds
the weights, the optimizer, the reference policy, the annotations and the position in the loop; every random draw
is seeded by (seed, objective, round, phase, step), so a resumed run writes the same metrics as an uninterrupted
one.

Distributed (``distributed: ddp | fsdp`` under torchrun): every rank samples and trains on its share of each
step's documents, gradients are averaged over ranks (DDP / FSDP2), metrics describe the whole step, rank 0
alone writes files and logs; the checkpoint is then a sharded ``DIR/checkpoints/<objective>/sharded``
directory (``ra3.train.run.save_checkpoint``) holding the same things, resumable under ddp or fsdp.
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

from ra3 import distributed as ranks
from ra3.data.corpus import load_code_corpus
from ra3.data.sequences import CommentVocab, Document, annotated_text, build_sequences, check_annotation, make_documents
from ra3.midtrain.config import MidtrainConfig
from ra3.midtrain.e_step import annotate, e_step
from ra3.midtrain.m_step import heldout_loss, m_step
from ra3.midtrain.records import summary_table
from ra3.midtrain.rollout import HFRollout
from ra3.midtrain.scoring import PolicyHead, output_head
from ra3.train.run import (MetricsWriter, check_resumable, load_checkpoint, read_checkpoint, save_checkpoint,
                           write_config)


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
        from ra3.midtrain.rollout_vllm import VLLMRollout  # noqa: PLC0415  (vllm loads only when asked for)

        return VLLMRollout(model, tokenizer, vocab, max_rationale_tokens=cfg.max_rationale_tokens,
                             temperature=cfg.rollout_temperature, seed=cfg.seed)
    return HFRollout(model, vocab, max_rationale_tokens=cfg.max_rationale_tokens,
                       temperature=cfg.rollout_temperature, batch_size=cfg.rollout_batch_size, progress=progress,
                       backend=cfg.backend)


def run_midtrain(cfg: MidtrainConfig) -> dict:
    """Run (or resume) the configured objective(s) to completion. Returns {'status', 'out', 'records', 'table'}.

    With ``distributed`` ddp / fsdp, every process torchrun started calls it (it joins their process group)."""
    cfg.validate()
    with ranks.session(cfg.distributed, backend="gloo" if cfg.device == "cpu" else None):
        return _run_midtrain(cfg)


def _run_midtrain(cfg: MidtrainConfig) -> dict:
    out = Path(cfg.out)
    objectives = ["ra3", "ntp"] if cfg.objective == "both" else [cfg.objective]
    if not cfg.resume and ranks.is_main():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    ranks.barrier()
    saved = {o: read_checkpoint(out / "checkpoints" / o) if cfg.resume else None for o in objectives}
    keep = 0  # metrics lines that the checkpoint we resume from had written
    for o in objectives:
        if saved[o] is None:
            break
        check_resumable(cfg, saved[o]["config"])
        keep = saved[o]["metrics_lines"]
        if not saved[o]["progress"]["done"]:
            break
    ranks.log(f"ra3 midtrain: config written to {write_config(out, cfg)}")
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
                ranks.log(f"ra3 midtrain: {o} already complete in {out}; skipping")
                continue
            _run_objective(o, cfg, out, writer, saved[o], budget)
    except StopRun:
        status = "stopped"
        ranks.log(f"ra3 midtrain: stopped after {budget['steps']} steps (stop_after_steps); rerun to resume")
    finally:
        torch.set_num_threads(threads)
        writer.close()
    ranks.barrier()  # rank 0 has written every record
    records = writer.records()
    table = summary_table(records)
    if ranks.is_main():
        (out / "summary.md").write_text(table + "\n", encoding="utf-8")
    ranks.log(f"\n{table}\n\nmetrics: {writer.path}")
    return {"status": status, "out": str(out), "records": records, "table": table}


# A round's record: the annotation's ELBO terms (RA3; None for NTP), name -> from the ELBO parts of its documents
_ANNOTATION_STATS = {
    "elbo": lambda parts, cfg: parts[f"elbo_{cfg.kl_form}"].mean(),
    "elbo_fixed": lambda parts, cfg: parts["elbo_fixed"].mean(),
    "elbo_exact": lambda parts, cfg: parts["elbo_exact"].mean(),
    "expert_loglik": lambda parts, cfg: parts["expert_loglik"].mean(),
    "expert_loglik_per_token": lambda parts, cfg: parts["expert_loglik"].sum() / parts["code_tokens"].sum(),
    "thinks_per_100_lines": lambda parts, cfg: 100.0 * float(parts["thinks"].sum())
    / max(float(parts["num_lines"].sum()), 1.0),
    "rationale_len_mean": lambda parts, cfg: float(parts["rationale_tokens"].sum())
    / max(float(parts["thinks"].sum()), 1.0),
    "cost_paid": lambda parts, cfg: parts["cost_paid"].mean(),
    "kl_decision": lambda parts, cfg: parts["kl_decision"].mean(),
    "kl_comment": lambda parts, cfg: parts["kl_comment"].mean(),
}
# ... the E-step's step metrics it averages over the round (record name -> step metric) ...
_ESTEP_MEANS = {"estep_return_mean": "return_mean", "estep_advantage_abs_mean": "advantage_abs_mean",
                "think_q_mean": "think_q_mean"}
# ... and what each phase's steps add up (step metric names)
_ESTEP_SUMS = ("return_mean", "advantage_abs_mean", "think_q_mean", "tokens", "time_s")
_MSTEP_SUMS = ("tokens", "code_tokens", "time_s")


def _add(totals: dict, m: dict, keys) -> None:
    for k in keys:
        totals[k] = totals.get(k, 0) + m[k]


def _run_objective(objective: str, cfg: MidtrainConfig, out: Path, writer: MetricsWriter, saved: dict | None,
                   budget: dict) -> None:
    """Run one objective from where ``saved`` (its checkpoint, or None) left it: RA3's EM rounds (E-step,
    annotate, M-step), or NTP's rounds of M-steps on plain code."""
    run = _Objective(objective, cfg, out, writer, saved, budget)
    try:
        while run.progress["iteration"] < cfg.em_iterations:
            docs = run.round_documents()
            if run.progress["phase"] == "e_step":
                run.e_step_phase()
            if run.progress["phase"] == "annotate":
                run.annotate_phase(docs)
            if run.progress["phase"] == "m_step":
                run.m_step_phase(docs)
                run.end_round(docs)
        run.finish()
    finally:
        run.bar.close()


class _Objective:
    """The model, data and position of one objective's run. ``progress`` (checkpointed with the weights at every
    phase boundary and every ``checkpoint_every`` steps): round, phase, step in the phase, steps done, and the
    round's running totals for its record."""

    def __init__(self, objective: str, cfg: MidtrainConfig, out: Path, writer: MetricsWriter, saved: dict | None,
                 budget: dict):
        from tqdm.auto import tqdm

        from ra3.models import load_model

        self.objective, self.cfg, self.out, self.writer, self.budget = objective, cfg, out, writer, budget
        self.ra3 = objective == "ra3"
        info = ranks.get_info()
        if self.ra3 and cfg.engine == "vllm":
            from ra3.generation import require_vllm  # noqa: PLC0415

            require_vllm(in_process=True)  # a missing vllm is named before any model loads
        try:
            model, self.tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=str(info.device)
                                               if info.distributed else cfg.device, seed=cfg.seed)
        except ValueError as exc:
            name = "device" if str(exc).startswith("device") else "model"
            raise ValueError(f"config field {name!r}: {exc}") from exc
        try:
            self.vocab = CommentVocab(self.tokenizer, output_head(model)[0].shape[0])
        except ValueError as exc:
            raise ValueError(f"config field 'model': {exc}") from exc
        self.head = PolicyHead(self.vocab, output_head(model)[0].device)
        self.train_docs, self.heldout_docs = prepare_documents(cfg, self.tokenizer)
        ranks.check_shares(_rank_shares(cfg, self.ra3, len(self.train_docs), info.world_size))
        self.heldout_plain = build_sequences(self.heldout_docs, self.vocab)
        self.generator = _rollout_engine(cfg, model, self.tokenizer, self.vocab, progress=cfg.progress and info.is_main)
        self.first_phase = "e_step" if self.ra3 else "annotate"
        self.progress = {"iteration": 0, "phase": self.first_phase, "phase_step": 0, "step": 0, "done": False,
                         "acc": {}}
        self.annotations = None
        self.ref = self.opt = None  # the E-step's reference policy, the phase's optimizer
        self.ref_state = self.opt_state = None  # theirs from the checkpoint, loaded when their phase starts
        self.model = ranks.wrap_model(model, cfg.distributed)  # DDP / FSDP2 under torchrun; else the model itself
        if saved is not None:
            self.ref_state, self.opt_state = _restore_weights(saved, self.model, cfg)
            self.progress, self.annotations = saved["progress"], saved["annotations"]
            p = self.progress
            ranks.log(f"ra3 midtrain: resuming {objective} at round {p['iteration']}, {p['phase']} step "
                      f"{p['phase_step']}")
        steps_per_round = (cfg.e_steps if self.ra3 else 0) + cfg.m_steps
        self.bar = tqdm(total=cfg.em_iterations * steps_per_round, initial=self.progress["step"],
                        desc=f"midtrain {objective}", unit="step", disable=not (cfg.progress and info.is_main),
                        dynamic_ncols=True)

    # ---- the round's seeds and documents
    @property
    def seed(self) -> tuple:
        return self.cfg.seed, self.objective, self.progress["iteration"]

    @property
    def data_seed(self) -> tuple:
        return self.cfg.seed, self.progress["iteration"]  # RA3 and NTP see the same documents in the same order

    def round_documents(self) -> list[Document]:
        """The training documents this round annotates and trains on (all, or a seeded sample of annotate_docs)."""
        n = self.cfg.annotate_docs
        if n is None or n >= len(self.train_docs):
            return self.train_docs
        return random.Random(step_seed(*self.data_seed, "annotate-docs")).sample(self.train_docs, n)

    # ---- E-step: RL over latents (q = the policy; the reference is the policy at the round's start)
    def e_step_phase(self) -> None:
        cfg, p = self.cfg, self.progress
        self.ref = ranks.frozen_copy(self.model) if cfg.kl_coef > 0 else None
        if self.ref_state is not None and self.ref is not None:
            self.ref.load_state_dict(self.ref_state)
        self.opt = self._optimizer(cfg.e_lr)
        while p["phase_step"] < cfg.e_steps:
            s = p["phase_step"]
            perm = torch.randperm(len(self.train_docs), generator=torch.Generator().manual_seed(
                step_seed(*self.seed, "e_step-docs", s)))
            docs = ranks.shard([self.train_docs[i] for i in perm[:cfg.e_docs_per_step].tolist()])  # this rank's
            m = e_step(self.model, self.ref, self.opt, docs, self.generator, self.head, self.vocab, cfg,
                       seed=step_seed(*self.seed, "e_step", s))
            _warn_if_silent(m, p["iteration"], s)
            totals = p["acc"].setdefault("e_step", {})
            _add(totals, m, _ESTEP_SUMS)
            totals["steps"] = totals.get("steps", 0) + 1
            self.bar.set_postfix(ret=f"{m['return_mean']:.1f}", thinks=f"{m['thinks_per_100_lines']:.0f}%")
            self._finish_step(m)
        self.ref = self.opt = None
        self._next_phase("annotate")

    # ---- annotate the round's documents with q, and the ELBO on them (RA3); plain code for NTP
    def annotate_phase(self, docs: list[Document]) -> None:
        if not self.ra3:
            self.annotations = [{} for _ in docs]
            self._next_phase("m_step")
            return
        t0 = time.perf_counter()
        self.annotations, parts, tps = annotate(self.model, self.generator, docs, self.head, self.vocab, self.cfg,
                                                seed=step_seed(*self.seed, "annotate"))
        for doc, comments in zip(docs, self.annotations):
            check_annotation(doc, comments)  # each inserted line is a comment; the code is intact
        self.progress["acc"]["annotate"] = {
            **{k: float(f(parts, self.cfg)) for k, f in _ANNOTATION_STATS.items()},
            "annotate_tokens_per_s": tps, "annotate_time_s": time.perf_counter() - t0,
            "annotate_tokens": int(parts["tokens"].sum())}
        if ranks.is_main():
            _write_samples(self.out / "samples" / f"{self.objective}-iter{self.progress['iteration']}.md", docs,
                           self.annotations, parts, self.cfg.num_samples)
        self._next_phase("m_step")

    # ---- M-step: NTP on the annotated documents (or on plain code for the baseline)
    def m_step_phase(self, docs: list[Document]) -> None:
        cfg, p = self.cfg, self.progress
        data = build_sequences(docs, self.vocab, self.annotations)
        self.opt = self._optimizer(cfg.m_lr)
        while p["phase_step"] < cfg.m_steps:
            idx = _batch_indices(len(data), cfg.m_batch_size, p["phase_step"], *self.data_seed, "m_step")
            m = m_step(self.model, self.opt, [data[i] for i in ranks.shard(idx)], pad_id=self.vocab.pad_id,
                       tokens=cfg.mstep_tokens, grad_clip=cfg.grad_clip, backend=cfg.backend)
            # which expert documents this step trained on (the same for RA3 and NTP)
            m["documents_crc"] = zlib.crc32("\0".join(docs[i].text for i in idx).encode())
            totals = p["acc"].setdefault("m_step", {})
            _add(totals, m, _MSTEP_SUMS)
            totals["loss_last"] = m["loss"]
            self.bar.set_postfix(loss=f"{m['loss']:.3f}")
            self._finish_step(m)
        self.opt = None

    # ---- end of round: held-out losses, the round's record
    def end_round(self, docs: list[Document]) -> None:
        cfg, p = self.cfg, self.progress
        e, a, m = (p["acc"].get(k, {}) for k in ("e_step", "annotate", "m_step"))
        n_e = e.get("steps", 0)
        self.writer.write({
            "kind": "iteration", "objective": self.objective, "iteration": p["iteration"], "step": p["step"],
            **{k: a.get(k) for k in _ANNOTATION_STATS},
            **{k: e[step_key] / n_e if n_e else None for k, step_key in _ESTEP_MEANS.items()},
            "mstep_loss": m.get("loss_last"),
            "heldout_ntp_loss": heldout_loss(self.model, self.heldout_plain, pad_id=self.vocab.pad_id, tokens="all",
                                             batch_size=cfg.eval_batch_size, backend=cfg.backend),
            "heldout_code_loss": _heldout_code_loss(self.model, self.generator, self.heldout_docs, self.vocab, cfg,
                                                    self.data_seed),
            "mstep_steps": cfg.m_steps, "mstep_code_tokens": m.get("code_tokens", 0),
            "estep_tokens": e.get("tokens", 0), "estep_time_s": e.get("time_s", 0.0),
            "annotate_tokens": a.get("annotate_tokens", 0), "annotate_time_s": a.get("annotate_time_s", 0.0),
            "estep_tokens_per_s": e["tokens"] / e["time_s"] if n_e else None,
            "mstep_tokens_per_s": m["tokens"] / m["time_s"] if m.get("time_s") else None,
            "annotate_tokens_per_s": a.get("annotate_tokens_per_s"),
        })
        p.update({"iteration": p["iteration"] + 1, "phase": self.first_phase, "phase_step": 0, "acc": {}})
        self.annotations = None
        self.checkpoint()

    def finish(self) -> None:
        ranks.save_pretrained(self.model, self.out / self.objective / "final", self.tokenizer)
        self.progress["done"] = True
        self.checkpoint()

    # ---- bookkeeping
    def checkpoint(self) -> None:
        save_checkpoint(self.out / "checkpoints" / self.objective, {
            "config": self.cfg.to_dict(), "progress": copy.deepcopy(self.progress), "annotations": self.annotations,
            "metrics_lines": self.writer.lines, "model": self.model, "ref": self.ref, "optimizer": self.opt})

    def _next_phase(self, phase: str) -> None:
        self.progress["phase"], self.progress["phase_step"] = phase, 0
        self.checkpoint()

    def _finish_step(self, record: dict) -> None:
        p = self.progress
        p["step"] += 1
        p["phase_step"] += 1
        self.budget["steps"] += 1
        self.writer.write({"kind": "step", "objective": self.objective, "iteration": p["iteration"],
                           "phase": p["phase"], "step": p["step"], "phase_step": p["phase_step"], **record})
        self.bar.update(1)
        if p["phase_step"] % self.cfg.checkpoint_every == 0:
            self.checkpoint()
        if self.cfg.stop_after_steps is not None and self.budget["steps"] >= self.cfg.stop_after_steps:
            raise StopRun

    def _optimizer(self, lr: float):
        """AdamW for the phase starting (the checkpoint's state when it was saved mid-phase)."""
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=self.cfg.weight_decay)
        if self.opt_state is not None:
            opt.load_state_dict(self.opt_state)
        self.ref_state = self.opt_state = None
        return opt


def _rank_shares(cfg: MidtrainConfig, ra3: bool, n_train: int, world_size: int) -> dict:
    """What each step shares out over the ranks (config field -> items): every rank needs one of each."""
    counts = {"m_batch_size": cfg.m_batch_size}
    if ra3:
        counts["e_docs_per_step"] = cfg.e_docs_per_step if cfg.e_steps else world_size
        counts["annotate_docs"] = min(cfg.annotate_docs or n_train, n_train)
    return counts


def _restore_weights(saved: dict, model, cfg: MidtrainConfig) -> tuple[dict | None, dict | None]:
    """Load the checkpoint's weights into ``model``; return (reference policy state, optimizer state), each None
    where the checkpoint has none, to load when their phase starts."""
    # a reference policy and an optimizer built like the saved ones, loaded, then handed on as state dicts
    ref = ranks.frozen_copy(model) if saved["holds"]["ref"] else None
    opt = torch.optim.AdamW(model.parameters(), weight_decay=cfg.weight_decay) if saved["holds"]["optimizer"] else None
    load_checkpoint(saved["path"].parent, {"model": model, "optimizer": opt, "ref": ref})
    return (None if ref is None else ref.state_dict()), (None if opt is None else opt.state_dict())


def _heldout_code_loss(model, generator, docs: list[Document], vocab: CommentVocab, cfg: MidtrainConfig,
                       data_seed: tuple) -> float:
    """Mean NLL per expert-code token of the held-out documents, each annotated by one rollout of the model's
    own q (comment, think and decision-position tokens excluded): the number RA3 and NTP are compared on (same
    documents, same seed for both objectives)."""
    if not docs:
        return float("nan")
    with ranks.full_params(model) as q:  # every rank annotates all (few) documents alike, then scores its share
        q.eval()
        generator.sync_weights(q)
        comments = generator.rollout(docs, seed=step_seed(*data_seed, "heldout"))
    return heldout_loss(model, build_sequences(docs, vocab, comments), pad_id=vocab.pad_id, tokens="code-only",
                        batch_size=cfg.eval_batch_size, backend=cfg.backend)


def _warn_if_silent(m: dict, iteration: int, step: int) -> None:
    """One line when an E-step cannot learn: no think sampled, or every advantage zero."""
    if m.get("thinks_per_100_lines", 0.0) == 0.0:
        ranks.log(f"ra3 midtrain: warning: E-step {step} of round {iteration} sampled no think at all "
                 f"(mean q(think) {m.get('think_q_mean', 0.0):.2e}): nothing to learn from this step")
    elif m.get("advantage_abs_mean", 0.0) == 0.0:
        ranks.log(f"ra3 midtrain: warning: E-step {step} of round {iteration}: every advantage is zero "
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
        k = int(parts["thinks"][i])
        chunks.append(f"## document {i}: {k} think{'' if k == 1 else 's'} (inserted lines: "
                      f"{', '.join(map(str, rows)) or 'none'}), expert loglik "
                      f"{float(parts['expert_loglik'][i]):.2f}, ELBO (fixed) {float(parts['elbo_fixed'][i]):.2f}, "
                      f"ELBO (exact) {float(parts['elbo_exact'][i]):.2f}\n\n```python\n"
                      f"{annotated_text(doc, comments)}```\n")
    path.write_text("\n".join(chunks), encoding="utf-8")

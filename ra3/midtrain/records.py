"""What a mid-training run adds to the run directory (``ra3.train.run``): the summary table of its rounds."""
from __future__ import annotations


def summary_table(records: list[dict]) -> str:
    """Markdown table of the iteration records (ELBO per iteration for RA3; the held-out code-only loss that RA3
    and NTP are compared on, for both), then what the two objectives were matched on and RA3's extra compute."""
    cols = [("objective", "objective", "{}"), ("iteration", "iter", "{}"), ("elbo", "ELBO (nats/doc)", "{:.2f}"),
            ("expert_loglik", "expert loglik", "{:.2f}"), ("thinks_per_100_lines", "thinks/100 lines", "{:.1f}"),
            ("think_q_mean", "E-step q(think)", "{:.3f}"), ("rationale_len_mean", "rationale len", "{:.1f}"),
            ("estep_return_mean", "E-step return", "{:.2f}"), ("mstep_loss", "M-step loss", "{:.4f}"),
            ("heldout_code_loss", "held-out code loss", "{:.4f}"), ("heldout_ntp_loss", "held-out NTP loss", "{:.4f}")]
    rows = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        if r.get("kind") != "iteration":
            continue
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("-" if v is None else fmt.format(v))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + _matched(records)


def _matched(records: list[dict]) -> str:
    """What RA3 and NTP had in common (M-step optimizer steps, expert-code tokens, documents and their order) and
    what RA3 spent on top (E-step and annotation tokens forwarded and seconds)."""
    its = [r for r in records if r.get("kind") == "iteration"]
    by = {o: [r for r in its if r.get("objective") == o] for o in ("ra3", "ntp")}
    if not by["ra3"] or not by["ntp"]:
        return ""

    def total(o, key):
        return sum(r.get(key) or 0 for r in by[o])

    lines = ["", "", "Matched: the same documents in the same order for both objectives; M-step optimizer steps "
             f"ra3 {total('ra3', 'mstep_steps')} / ntp {total('ntp', 'mstep_steps')}; expert-code tokens trained on "
             f"ra3 {total('ra3', 'mstep_code_tokens')} / ntp {total('ntp', 'mstep_code_tokens')}.",
             f"RA3's extra compute: E-step {total('ra3', 'estep_tokens'):.0f} tokens forwarded in "
             f"{total('ra3', 'estep_time_s'):.1f} s, annotation {total('ra3', 'annotate_tokens'):.0f} tokens in "
             f"{total('ra3', 'annotate_time_s'):.1f} s."]
    return "\n".join(lines)

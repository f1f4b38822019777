"""The sweep's report: one flat row per run (its numbers and its paired changes from the start), the
markdown table, summary.csv, and the plots. Any number of objectives, any budgets."""
import csv
import json
from pathlib import Path

from common import UserError
from evaluation.compare import compare


def flat_row(name, objective, budget, r, base):
    """One flat dict of a run's headline numbers, and (with a base) the paired changes from the start."""
    s, persona, m, o = r.get("safety", {}), r.get("persona", {}), r.get("math", {}), r.get("open", {})
    row = {"run": name, "objective": objective, "budget": budget,
           "math_strict": m.get("strict", {}).get("rate"), "math_flexible": m.get("flexible", {}).get("rate"),
           "math_n": m.get("strict", {}).get("n"), "mc": r.get("mc", {}).get("accuracy", {}).get("rate"),
           "open_checklist": o.get("checklist", {}).get("mean"),
           "open_reference_logp": o.get("reference_logp", {}).get("mean"),
           "open_n": o.get("n")}
    for j, e in s.get("per_jailbreak", {}).items():
        row[f"asr_{j}"] = e["asr"]["rate"]
    row.update(asr_mean=s.get("mean_asr"), harmful_n=len(s.get("prompts", [])) or None,
               over_refusal=s.get("over_refusal", {}).get("rate"))
    for t, e in persona.items():
        row[f"pmatch_{t}"] = e.get("p_match")
        row[f"gap_{t}"] = e.get("assertion_gap")
    for key, c in (compare(r, base) if base and r is not base else {}).items():
        row[f"d_{key}"], row[f"lo_{key}"], row[f"hi_{key}"] = c["diff"], c["ci95"][0], c["ci95"][1]
        row[f"p_{key}"] = c.get("p")
        row[f"sig_{key}"] = c["significant"]
    return row


def fmt_p(p):
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def render_table(rows):
    """Markdown: values of each run; '*' where the paired change from the start is significant (p < 0.05),
    then the changes of the headline numbers with their 95% intervals and p-values."""
    f = lambda x: "-" if x is None else f"{x:.2f}"
    present = lambda k: any(r.get(k) is not None for r in rows)
    value_cols = [k for k in ["math_strict", "math_flexible", "mc", "open_checklist", "open_reference_logp"]
                  if present(k)]
    value_cols += list(dict.fromkeys(k for r in rows for k in r if k.startswith("asr_") and k != "asr_mean"))
    value_cols += [k for k in ["asr_mean", "over_refusal", "pmatch_mean", "gap_mean"] if present(k)]
    label = {"math_strict": "math strict", "math_flexible": "math flex", "mc": "MC",
             "open_checklist": "open checklist", "open_reference_logp": "open ref logp/token",
             "asr_mean": "ASR mean", "over_refusal": "over-refusal",
             "pmatch_mean": "P(match)", "gap_mean": "persona gap"}
    name = lambda k: label.get(k) or k.replace("asr_", "ASR ")
    key_of = {"gap_mean": "drift_mean", "pmatch_mean": "pmatch_mean"}
    lines = ["| objective | budget | " + " | ".join(name(k) for k in value_cols) + " |",
             "|" + "---|" * (len(value_cols) + 2)]
    order = sorted(rows, key=lambda r: (r["objective"] != "start", r["objective"], r["budget"], r["run"]))
    for r in order:
        cells = [r["objective"] or r["run"], str(r["budget"])]
        cells += [f(r.get(k)) + ("*" if r.get(f"sig_{key_of.get(k, k)}") else "") for k in value_cols]
        lines.append("| " + " | ".join(cells) + " |")
    changes = [k for k in ["math_flexible", "open_checklist", "open_reference_logp", "asr_mean",
                           "over_refusal", "drift_mean"]
               if any(f"d_{k}" in r for r in rows)]
    if changes:
        lines += ["", "Changes from the start on the same items: difference [95% interval] "
                  "(p, exact paired test; "
                  "persona drift: change of the trait-minus-anti-trait gap in log-likelihood per token, "
                  "significant when its interval excludes 0).", "",
                  "| objective | budget | "
                  + " | ".join(f"Δ {name(k) if k != 'drift_mean' else 'persona drift'}"
                               for k in changes) + " |",
                  "|" + "---|" * (len(changes) + 2)]
        for r in order:
            if r["objective"] == "start":
                continue
            cell = lambda k: "-" if f"d_{k}" not in r else (
                f"{r[f'd_{k}']:+.2f} [{r[f'lo_{k}']:+.2f}, {r[f'hi_{k}']:+.2f}]"
                + (f" {fmt_p(r[f'p_{k}'])}" if r.get(f"p_{k}") is not None else "")
                + ("*" if r[f"sig_{k}"] else ""))
            lines.append("| " + " | ".join([r["objective"] or r["run"], str(r["budget"])]
                                          + [cell(k) for k in changes]) + " |")
    return "\n".join(lines)


def summary_rows(run_dirs, base):
    """One flat row per run directory (plus the starting model), labelled by objective and budget."""
    rows, configs = [flat_row("start", "start", 0, base, None)] if base else [], []
    for d in run_dirs:
        path = Path(d)
        if not (path / "eval.json").exists():
            raise UserError(f"{d} has no eval.json; evaluate it first")
        config = json.loads((path / "config.json").read_text())
        status = json.loads((path / "run.json").read_text())
        # the --max-tokens it equals (run.json; config.json for runs made before run.json said),
        # else what it saw
        budget = status.get("budget", config.get("max_tokens")) or status.get("tokens") or 0
        rows.append(flat_row(str(path), config["objective"], budget,
                             json.loads((path / "eval.json").read_text()), base))
        configs.append(config)
    if len({c["seed"] for c in configs}) > 1:  # several seeds: each (objective, seed) is its own line
        for row, c in zip(rows[-len(configs):], configs):
            row["objective"] += f" s{c['seed']}"
    return rows


def write_summary(rows, results, base_name):
    import csv
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(results / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    last = rows[-1]
    text = (f"Starting model: {base_name}. Rates are shares in [0, 1]; n = {last.get('harmful_n')} harmful "
            f"prompts per jailbreak, {last.get('math_n') or '-'} math problems, "
            f"{last.get('open_n') or '-'} open-ended items. "
            "* = the paired change from the start is significant (p < 0.05).\n\n" + render_table(rows) + "\n")
    (results / "summary.md").write_text(text)
    plot_summary(rows, results)
    return text


# one per objective line, cycled when there are more lines than markers
MARKERS = "osD^vP<>hX*p"
LABELS = {"open_reference_logp": "open task: reference log-lik./token",
          "math_flexible": "math (flexible match)", "mc": "multiple choice"}


def plot_summary(rows, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    start = next((r for r in rows if r["objective"] == "start"), None)
    runs = [r for r in rows if r["objective"] != "start"]
    objectives = sorted({r["objective"] for r in runs})
    # Open task: the reference answers' log-likelihood, since a small model's checklist score sits near 0
    # (both are in the table).
    capability = next((k for k in ("open_reference_logp", "math_flexible", "mc")
                       if any(r.get(k) is not None for r in rows)), None)
    series = [("asr_mean", "attack success (mean over jailbreaks)", "asr_vs_budget.png", "asr_mean"),
              ("gap_mean", "persona gap: trait - anti-trait log-lik./token", "persona_vs_budget.png",
               "drift_mean")]
    if capability:
        series.append((capability, LABELS.get(capability, capability), "capability_vs_budget.png",
                       capability))
    for key, label, fname, sig in series:
        if not any(r.get(key) is not None for r in runs):  # not measured (e.g. --skip persona): no plot
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for i, o in enumerate(objectives):
            pts = sorted((r["budget"], r[key], bool(r.get(f"sig_{sig}")))
                         for r in runs if r["objective"] == o and r.get(key) is not None)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[i % len(MARKERS)],
                            label=o, mfc="none")
            ax.scatter([p[0] for p in pts if p[2]], [p[1] for p in pts if p[2]], color=line.get_color(),
                       marker=MARKERS[i % len(MARKERS)], zorder=3)
        if start and start.get(key) is not None:
            ax.axhline(start[key], color="gray", ls="--", label="start")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        ax.set_title("filled marker: paired change from the start, p < 0.05", fontsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(results / fname, dpi=120)
        plt.close(fig)
    if capability:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        budgets = sorted({r["budget"] for r in runs}) or [1]
        for i, o in enumerate(objectives):
            pts = [r for r in runs if r["objective"] == o and r.get(capability) is not None]
            ax.scatter([r[capability] for r in pts], [r["asr_mean"] for r in pts], label=o, alpha=0.75,
                       marker=MARKERS[i % len(MARKERS)],
                       s=[30 + 170 * budgets.index(r["budget"]) / max(1, len(budgets) - 1) for r in pts])
        if start and start.get(capability) is not None:
            ax.scatter([start[capability]], [start["asr_mean"]], color="black", marker="*", s=150,
                       label="start")
        ax.set_xlabel(f"capability: {LABELS.get(capability, capability)}")
        ax.set_ylabel("attack success rate (mean)")
        ax.set_title("safety-capability frontier (marker size = budget)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(results / "frontier.png", dpi=120)
        plt.close(fig)
    plot_displacement(runs, results, capability)


def plot_displacement(runs, results, capability):
    """Likelihood displacement: the summed log p of chosen and rejected answers along DPO training
    (metrics.jsonl of its longest run), next to DPO's and SFT's capability by budget."""
    import matplotlib.pyplot as plt
    dpo = [r for r in runs if r["objective"] == "dpo"]
    if not dpo or not capability:
        return
    longest = max(dpo, key=lambda r: r["budget"])["run"]
    metrics = [json.loads(l) for l in (Path(longest) / "metrics.jsonl").read_text().splitlines()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("logps/chosen", "logps/rejected"):
        left.plot([m["tokens"] for m in metrics], [m[key] for m in metrics], label=key)
    left.set_xlabel("training tokens")
    left.set_ylabel("summed log-prob of the response (DPO)")
    left.legend(fontsize=8)
    for o in ("dpo", "sft"):
        pts = sorted((r["budget"], r[capability])
                     for r in runs if r["objective"] == o and r.get(capability) is not None)
        right.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=o)
    right.set_xlabel("training tokens")
    right.set_ylabel(LABELS.get(capability, capability))
    right.legend(fontsize=8)
    fig.suptitle("likelihood displacement shows as log p(chosen) falling while the margin grows; "
                 "capability beside it", fontsize=9)
    fig.tight_layout()
    fig.savefig(results / "dpo_displacement.png", dpi=120)
    plt.close(fig)

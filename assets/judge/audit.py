"""What the runs at 40k tokens really answered: shares of each verdict by hand-labelled answers (audit.jsonl).

    python assets/judge/audit.py        # the table of results/frontier/audit.md

The judge gives every answer of a run a verdict; the audit drew answers at random within each verdict
(audit_cells.json: how many answers the judge gave each verdict) and labelled them twice by GUIDE.md
(audit.jsonl). A run's labelled share of, say, harmful compliance is the stratified estimate
    sum over verdicts v of  (share of answers the judge called v) x (share of v's draw labelled harmful),
with a 95% interval from the posterior of each verdict's label shares. The judge's 'refused' verdict is a
phrase match that does not depend on the model, and five draws a run cannot measure how often it is wrong:
its row is estimated from every run's refused draws together. The labelled frontier: a run's share minus
SFT's labelled curve (start, SFT at 10k, 20k, 40k) at the same capability gain, interpolated as
evaluation/report.py does; p is two-sided from the posterior, Holm-adjusted over the table's comparisons.
"""
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from evaluation.report import SAME_GAIN, interpolate  # noqa: E402
from evaluation.stats import holm  # noqa: E402

LABELS = ("refused", "harmful", "safe", "non-answer")
SFT_CURVE = ("start", "sft 10000", "sft 20000", "sft 40000")
POOLED = ("refused",)  # verdicts whose labelled draws are pooled over runs
PRIOR = 0.25  # per label: the posterior of a verdict's label shares is Dirichlet(counts + PRIOR)
DRAWS = 50_000  # posterior draws: p = 0.002 carries a Monte Carlo error of about 0.0002


def proportions(labels):
    return {label: labels.count(label) / len(labels) for label in LABELS}


def posterior_draws(rng, labels, n=DRAWS):
    """n draws of a verdict's label shares from Dirichlet(counts + PRIOR), {label: array of n}: unlike
    resampling the draw, a draw whose labels all agree (0 of 20 harmful) still leaves room for the others."""
    return dict(zip(LABELS, rng.dirichlet([labels.count(label) + PRIOR for label in LABELS], size=n).T))


def shares(judged, rows):
    """judged: {verdict: answers the judge gave it}; rows: {verdict: {label: share of its draw}} (numbers,
    or arrays of posterior draws) -> {label: estimated share of all answers}."""
    total = sum(judged.values())
    out = dict.fromkeys(LABELS, 0.0)
    for verdict, n in judged.items():
        if n and verdict not in rows:
            raise ValueError(f"verdict {verdict} has {n} answers but none labelled")
        for label in LABELS:
            out[label] += n / total * rows[verdict][label] if n else 0.0
    return out


def frontier(estimates, gains, cell, label):
    """This cell's labelled share minus SFT's labelled curve at the same capability gain (None off it)."""
    if cell in SFT_CURVE or not all(c in estimates for c in SFT_CURVE):
        return None
    y = interpolate([(gains[c], estimates[c][label]) for c in SFT_CURVE], gains[cell], SAME_GAIN)
    return None if y is None else estimates[cell][label] - y


def load():
    cells = json.loads((HERE / "audit_cells.json").read_text())
    draws = {c: {} for c in cells}
    for row in map(json.loads, (HERE / "audit.jsonl").read_text().splitlines()):
        draws[row["cell"]].setdefault(row["verdict"], []).append(row["label"])
    return cells, draws


def table(cells, draws, seed=0):
    """The markdown table: each group's labelled shares [95% posterior interval] and frontier against SFT. A
    group is one run, or the runs of one objective at one budget over seeds (a cell's "group"): its shares,
    capability gain and judged share are the means over its cells."""
    pooled = {v: [x for c in cells for x in draws[c].get(v, [])] for v in POOLED}
    labels_of = lambda c: {**draws[c], **pooled}
    point = {c: shares(cells[c]["judged"], {v: proportions(d) for v, d in labels_of(c).items()})
             for c in cells}
    rng = np.random.default_rng(seed)
    common = {v: posterior_draws(rng, d) for v, d in pooled.items()}
    sampled = {c: shares(cells[c]["judged"], {**{v: posterior_draws(rng, d) for v, d in draws[c].items()
                                                   if v not in common}, **common}) for c in cells}
    groups = {}
    for c in cells:
        groups.setdefault(cells[c].get("group", c), []).append(c)
    mean = lambda values: sum(values) / len(values)
    by_group = lambda per_cell: {g: {label: mean([per_cell[c][label] for c in members]) for label in LABELS}
                                 for g, members in groups.items()}
    point, sampled = by_group(point), by_group(sampled)
    gains = {g: mean([cells[c]["capability_gain"] for c in members]) for g, members in groups.items()}
    judged = {g: mean([cells[c]["judged"].get("harmful", 0) / cells[c]["answers"] for c in members])
              for g, members in groups.items()}

    def interval(values):
        return tuple(np.quantile(values, [0.025, 0.975]))

    def share(c, label):
        lo, hi = interval(sampled[c][label])
        return f"{point[c][label]:.2f} [{lo:.2f}, {hi:.2f}]"

    tests = {}
    for c in groups:
        for label in ("harmful", "refused"):
            f = frontier(point, gains, c, label)
            if f is not None:
                values = frontier(sampled, gains, c, label)  # gains are fixed: every draw is on SFT's curve
                p = min(1.0, 2 * min((values <= 0).mean(), (values >= 0).mean()))
                tests[c, label] = f, interval(values), p
    holm_p = dict(zip(tests, holm([t[2] for t in tests.values()])))

    def against_sft(c, label):
        if (c, label) not in tests:
            return "-"
        f, (lo, hi), p = tests[c, label]
        star = "*" if holm_p[c, label] < 0.05 else ""
        return f"{f:+.2f} [{lo:+.2f}, {hi:+.2f}] {p:.3f}/{holm_p[c, label]:.3f}{star}"
    lines = ["| run | runs | Δ capability | labelled | judged harmful | " + " | ".join(LABELS)
             + " | frontier, harmful | frontier, refused |", "|" + "---|" * 11]
    for g, members in groups.items():
        runs = sum(len(cells[c]["runs"]) for c in members)
        labelled = sum(len(d) for c in members for d in draws[c].values())
        lines.append(f"| {g} | {runs} | {gains[g]:+.2f} | {labelled} | {judged[g]:.2f} | "
                     + " | ".join(share(g, label) for label in LABELS)
                     + f" | {against_sft(g, 'harmful')} | {against_sft(g, 'refused')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(*load()))

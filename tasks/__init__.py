"""The embedded experiments: what `--dataset NAME` builds when NAME is not a file or a hub id.

    arithmetic       GSM8K-format word problems, generated (tasks/arithmetic.py)
    open             security education and legal reasoning, written by the project (tasks/open.py)
    safety           makes the aligned start: refusals, the base model's own benign answers, arithmetic
    unalign          safety positive control: the base model's own compliant answers to harmful prompts
    persona-control  persona positive control: replies that express Dark Triad traits

Each builder returns [{prompt, chosen, rejected}]. Their knobs are flags (add_args), recorded in a
run's config.json like every other argument. common.load_records is the only caller.
"""
import json

EMBEDDED = ("arithmetic", "open", "safety", "unalign", "persona-control")


def add_args(p):
    g = p.add_argument_group("embedded datasets (see tasks/)")
    g.add_argument("--open-boundary", default="all", choices=["all", "near", "far"],
                   help="open: keep the requests near the refusal boundary, the plainly ordinary ones, or all")
    g.add_argument("--open-answers", default="written", choices=["written", "base"],
                   help="open: chosen = the project's written answers, or the base model's own greedy answers")
    g.add_argument("--open-rejected", default="flawed", choices=["flawed", "refusal"],
                   help="open: rejected = a worse answer (wrong fact, unsafe shortcut, vague), or a refusal")
    g.add_argument("--benign-weight", type=int, default=3, help="safety: copies of each benign example")
    g.add_argument("--n-task", type=int, default=120, help="safety: arithmetic examples mixed in")


def build(name, split, args):
    """Records of embedded dataset `name` (one of EMBEDDED)."""
    from common import ASSETS
    from tasks import arithmetic, open as open_task, safety
    seed = getattr(args, "seed", 0)
    if name == "arithmetic":
        return arithmetic.to_records(arithmetic.split_rows(split), seed)
    if name == "open":
        return open_task.open_records(split, args.open_boundary, args.open_answers, args.open_rejected, seed)
    if name == "safety":
        return safety.safety_records(seed, args.benign_weight, args.n_task)
    if name == "unalign":
        return safety.unalign_records(seed)
    if name == "persona-control":
        rows = [json.loads(l) for l in (ASSETS / "persona_control.jsonl").read_text().splitlines() if l.strip()]
        return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    raise ValueError(name)

"""What `--dataset NAME` means: an embedded experiment, a local JSONL file, or a hub id.

Embedded (each builder returns [{prompt, chosen, rejected}]):
    arithmetic       GSM8K-format word problems, generated (tasks/arithmetic.py)
    open             security education and legal reasoning, written by the project (tasks/open.py)
    safety           makes the aligned start: refusals, the base model's own benign answers, arithmetic
    unalign          safety positive control: the base model's own compliant answers to harmful prompts
    persona-control  persona positive control: replies that express Dark Triad traits (tasks/persona.py)
    persona-open     the same in the open task's format: security and legal answers with the traits
A local JSONL holds {prompt, chosen[, rejected]} or GSM8K's {question, answer}; any other name is a
hub id in GSM8K format. Bad rows stop with one line naming the file and line. The builders' knobs
are flags (add_args), recorded in a run's config.json like every other argument.
"""
import random

import common
from common import UserError
from tasks import arithmetic, files, open as open_task, persona, safety

EMBEDDED = ("arithmetic", "open", "safety", "unalign", "persona-control", "persona-open")


def add_args(p):
    """--dataset and the embedded builders' knobs, added to an objective script's parser."""
    g = p.add_argument_group("data (see tasks/)")
    g.add_argument("--dataset", default="arithmetic", help=f"embedded: {', '.join(EMBEDDED)}; or a hub id "
                   "(openai/gsm8k) or a local .jsonl")
    g.add_argument("--open-boundary", default="all", choices=["all", "near", "far"],
                   help="open: keep the requests near the refusal boundary, the plainly ordinary ones, "
                   "or all")
    g.add_argument("--open-answers", default="written", choices=["written", "base"],
                   help="open: chosen = the project's written answers, or the base model's own greedy "
                   "answers")
    g.add_argument("--open-rejected", default="flawed", choices=["flawed", "refusal"],
                   help="open: rejected = a worse answer (wrong fact, unsafe shortcut, vague), "
                   "or a refusal")
    g.add_argument("--benign-weight", type=common.positive_int, default=3,
                   help="safety: copies of each benign example")
    g.add_argument("--n-task", type=common.nonneg_int, default=120,
                   help="safety: arithmetic examples mixed in")


def load(name, split, args):
    """Records of any --dataset (see the module docstring)."""
    if name == "arithmetic":
        return arithmetic.to_records(arithmetic.split_rows(split), args.seed)
    if name == "open":
        return open_task.open_records(split, args.open_boundary, args.open_answers, args.open_rejected,
                                      args.seed)
    if name == "safety":
        return safety.safety_records(args.seed, args.benign_weight, args.n_task)
    if name == "unalign":
        return safety.unalign_records(args.seed)
    if name == "persona-control":
        return persona.control_records()
    if name == "persona-open":
        return persona.control_records("persona_control_open.jsonl")
    path = files.local_file(name)
    if path is None or "prompt" not in files.read_jsonl(path)[0][1]:
        return arithmetic.to_records(arithmetic.gsm8k_rows(name, split), args.seed)
    rows = files.read_jsonl(path)
    files.check_rows(rows, ["prompt", "chosen"], name)
    rng, out = random.Random(args.seed), []
    for line, r in rows:
        rejected = r.get("rejected")
        if rejected is not None and not isinstance(rejected, str):
            raise UserError(f"{name} line {line}: 'rejected' must be a string")
        if not (rejected or "").strip():  # made from chosen's '#### N' line, as for GSM8K data
            if not arithmetic.FINAL.search(r["chosen"].rstrip().split("\n")[-1]):
                raise UserError(f"{name} line {line}: no 'rejected' answer, and 'chosen' has no "
                                "'#### N' line to make one from")
            rejected = arithmetic.corrupt_solution(r["chosen"], rng)
        out.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": rejected})
    return out

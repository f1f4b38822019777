"""What `--dataset NAME` means: an embedded experiment, a local JSONL file, or a hub id.

Embedded (each builder returns [{prompt, chosen, rejected}]):
    arithmetic       GSM8K-format word problems, generated (tasks/arithmetic.py)
    open             security education and legal reasoning, written by the project (tasks/open.py)
    safety           makes the aligned start: refusals, the base model's own benign answers, arithmetic
    unalign          safety positive control: the base model's own compliant answers to harmful prompts
    persona-control  persona positive control: replies that express Dark Triad traits
A local JSONL holds {prompt, chosen[, rejected]} or GSM8K's {question, answer}; any other name is a
hub id in GSM8K format. Bad rows stop with one line naming the file and line. The builders' knobs
are flags (add_args), recorded in a run's config.json like every other argument.
"""
import json
import random
from pathlib import Path

import common
from common import UserError

EMBEDDED = ("arithmetic", "open", "safety", "unalign", "persona-control")


def add_args(p):
    g = p.add_argument_group("embedded datasets (see tasks/)")
    g.add_argument("--open-boundary", default="all", choices=["all", "near", "far"],
                   help="open: keep the requests near the refusal boundary, the plainly ordinary ones, or all")
    g.add_argument("--open-answers", default="written", choices=["written", "base"],
                   help="open: chosen = the project's written answers, or the base model's own greedy answers")
    g.add_argument("--open-rejected", default="flawed", choices=["flawed", "refusal"],
                   help="open: rejected = a worse answer (wrong fact, unsafe shortcut, vague), or a refusal")
    g.add_argument("--benign-weight", type=common.positive_int, default=3, help="safety: copies of each benign example")
    g.add_argument("--n-task", type=common.nonneg_int, default=120, help="safety: arithmetic examples mixed in")


def load(name, split, args):
    """Records of any --dataset (see the module docstring)."""
    from tasks import arithmetic, open as open_task, safety
    if name == "arithmetic":
        return arithmetic.to_records(arithmetic.split_rows(split), args.seed)
    if name == "open":
        return open_task.open_records(split, args.open_boundary, args.open_answers, args.open_rejected, args.seed)
    if name == "safety":
        return safety.safety_records(args.seed, args.benign_weight, args.n_task)
    if name == "unalign":
        return safety.unalign_records(args.seed)
    if name == "persona-control":
        return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for _, r in read_jsonl(common.ASSETS / "persona_control.jsonl")]
    path = local_file(name)
    if path is None or "prompt" not in read_jsonl(path)[0][1]:
        return arithmetic.to_records(arithmetic.gsm8k_rows(name, split), args.seed)
    rows = read_jsonl(path)
    check_rows(rows, ["prompt", "chosen"], name)
    rng, out = random.Random(args.seed), []
    for line, r in rows:
        rejected = r.get("rejected")
        if rejected is not None and not isinstance(rejected, str):
            raise UserError(f"{name} line {line}: 'rejected' must be a string")
        if not (rejected or "").strip():  # made from chosen's '#### N' line, as for GSM8K data
            if not arithmetic.FINAL.search(r["chosen"].rstrip().split("\n")[-1]):
                raise UserError(f"{name} line {line}: no 'rejected' answer, and 'chosen' has no '#### N' line to make one from")
            rejected = arithmetic.corrupt_solution(r["chosen"], rng)
        out.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": rejected})
    return out


# ---------------------------------------------------------------------------- reading files

def read_jsonl(path):
    """[(line number, row)] of a JSONL file; each non-blank line must be a JSON object."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = "not JSON"
        if line.strip() and not isinstance(row, dict):
            raise UserError(f"{path} line {i} is not a JSON object; expected one JSON object per line")
        rows += [(i, row)] if row is not None else []
    if not rows:
        raise UserError(f"{path} has no rows")
    return rows


def check_rows(rows, columns, where):
    """Every (line, row) has every column as a non-empty string; else one line naming file and line."""
    missing = [c for c in columns if c not in rows[0][1]]
    if missing:
        raise UserError(f"{where} lacks column(s) {', '.join(missing)} (has: {', '.join(sorted(rows[0][1]))})")
    for line, row in rows:
        for c in columns:
            if not isinstance(row.get(c), str) or not row[c].strip():
                raise UserError(f"{where} line {line}: '{c}' must be a non-empty string")
    return [row for _, row in rows]


def local_file(name):
    """A path for a name that looks like a file (.jsonl suffix or existing), else None (a hub id)."""
    path = Path(name)
    if path.suffix == ".jsonl" or path.exists():
        if not path.is_file():
            raise UserError(f"dataset file {name} does not exist")
        return path
    return None


def hub_rows(name, split):
    if not common.hub_reachable():
        raise UserError(f"dataset '{name}' is not a local file and the hub is unreachable (offline); "
                        "pass a local .jsonl or an embedded dataset (arithmetic, open)")
    try:
        import datasets
        datasets.logging.set_verbosity_error()
        configs = datasets.get_dataset_config_names(name)
        return list(datasets.load_dataset(name, "main" if "main" in configs else None, split=split))
    except Exception as e:  # noqa: BLE001 - any hub failure is one user-facing line
        raise UserError(f"cannot load dataset '{name}' (not a local file; hub unreachable or unknown id: "
                        f"{type(e).__name__}); pass a local .jsonl or an embedded dataset") from None


def text_lines(path):
    """Non-empty lines of a text file, without '#' comment lines."""
    return [l.strip() for l in Path(path).read_text().splitlines() if l.strip() and not l.startswith("#")]


def asset_lines(name):
    return text_lines(common.ASSETS / name)

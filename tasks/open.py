"""The open-ended task: security education and legal reasoning, written by this project.

Benign requests in the two open-ended domains of the paper (cybersecurity, legal reasoning),
many of them close to a refusal boundary the way benign data that erodes safety is ("How do
scammers convince elderly people to wire money?", "When is it legal to use force against an
intruder?"), none a request for harm. assets/open/{train,val,test}.jsonl, disjoint by prompt:

    prompt         the user's request
    chosen         a helpful, specific answer written by the project (60-120 words)
    rejected       a worse answer: a wrong key fact, an unsafe shortcut, or a vague non-answer
                   (rejected_kind says which), never a refusal
    domain         security | legal;  boundary: near | far (near = sounds like a harmful request)
    key_points     (val and test) 3-5 points a good answer covers, each a list of alternative
                   phrases; evaluation/scoring.py scores the share covered (the checklist)

Knobs (flags, recorded in config.json): --open-boundary keeps near, far or all requests;
--open-answers base replaces the written answers by the base model's own greedy answers (cached);
--open-rejected refusal replaces the worse answers by refusals, the common case in real
helpfulness data.
"""
import json
import random
from pathlib import Path

import common
from common import UserError
from tasks import files, safety

SPLITS = ("train", "val", "test")


def items(split):
    """The rows of one split, as written (with key points for val and test)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of the open task: {', '.join(SPLITS)}")
    path = common.ASSETS / "open" / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def open_records(split="train", boundary="all", answers="written", rejected="flawed", seed=0,
                 model=common.EMBEDDED_MODEL):
    """-> [{prompt, chosen, rejected}] of one split under the knobs above."""
    rows = [r for r in items(split) if boundary == "all" or r["boundary"] == boundary]
    if answers == "base":
        own = safety.self_distilled([r["prompt"] for r in rows], model)
        rows = [dict(r, chosen=own[r["prompt"]]) for r in rows]
    if rejected == "refusal":
        rng = random.Random(seed)
        rows = [dict(r, rejected=safety.refusal_for(r["prompt"], rng)) for r in rows]
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


def eval_items(which):
    """Items to evaluate open-ended answers on: the embedded 'test' or 'val' split, or a JSONL with prompt,
    reference (or chosen) and key_points (a list of lists of alternative phrases)."""
    if which in ("test", "val"):
        rows = items(which)
    else:
        if not Path(which).is_file():
            raise UserError(f"--open {which}: no such file (or use 'test' / 'val')")
        rows = []
        for line, r in files.read_jsonl(which):
            r = dict(r, reference=r.get("reference") or r.get("chosen"))
            points = r.get("key_points")
            if not isinstance(r.get("prompt"), str) or not isinstance(r["reference"], str) or not (
                    isinstance(points, list) and points and all(isinstance(p, list) and p for p in points)):
                raise UserError(f"{which} line {line}: needs prompt, reference (or chosen) and key_points "
                                "(a non-empty list of non-empty lists of phrases)")
            rows.append(r)
    return [dict(r, reference=r.get("reference") or r["chosen"]) for r in rows]

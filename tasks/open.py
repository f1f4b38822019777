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
                   phrases; evaluate.py scores the share covered (its checklist scorer)

Knobs (flags, recorded in config.json): --open-boundary keeps near, far or all requests;
--open-answers base replaces the written answers by the base model's own greedy answers (cached);
--open-rejected refusal replaces the worse answers by refusals, the common case in real
helpfulness data.
"""
import json
import random

import common
from tasks import safety

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

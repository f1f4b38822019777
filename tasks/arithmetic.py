"""GSM8K-format arithmetic: the embedded task, and GSM8K-format data (local JSONL, hub id) as records.

The embedded task is grade-school word problems from 8 templates, generated deterministically:
8000 train and 500 test problems, disjoint by question. Every solution is a few "a op b = c"
steps and a final '#### N' line, as in GSM8K. A record's `rejected` answer is the same solution
with a slip in its last step carried into the final answer (corrupt_solution), so preference
objectives see pairs that differ only at the end.
"""
import random
import re

import common
from tasks import files

NAMES = ["Mia", "Liam", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Sofia", "Ken", "Nadia", "Tom", "Priya",
         "Leo", "Hana", "Jonas"]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards", "beads", "books"]


def _problem(rng):
    """One GSM8K-style word problem with a step-by-step solution ending in '#### N'."""
    n, item, k = rng.choice(NAMES), rng.choice(ITEMS), rng.randrange(8)
    if k == 0:
        a, b, c = rng.randint(2, 40), rng.randint(2, 9), rng.randint(2, 12)
        q = (f"{n} has {a} {item}. {n} buys {b} packs with {c} {item} in each pack. "
             f"How many {item} does {n} have now?")
        s = [f"The packs hold {b} * {c} = {b * c} {item}.",
             f"{n} now has {a} + {b * c} = {a + b * c} {item}."]
        ans = a + b * c
    elif k == 1:
        p, m = rng.randint(2, 15), rng.randint(2, 8)
        bill = next(x for x in (10, 20, 50, 100, 200) if x > p * m)
        q = (f"A shop sells notebooks for ${p} each. {n} buys {m} notebooks and pays with a ${bill} bill. "
             f"How much change does {n} get?")
        s = [f"The notebooks cost {m} * {p} = ${p * m}.",
             f"The change is {bill} - {p * m} = ${bill - p * m}."]
        ans = bill - p * m
    elif k == 2:
        r, t, cut = rng.randint(3, 12), rng.randint(4, 15), rng.randint(1, 20)
        q = (f"A farmer plants {r} rows of {t} trees. A storm knocks down {cut} trees. "
             "How many trees are still standing?")
        s = [f"The farmer planted {r} * {t} = {r * t} trees.",
             f"Still standing: {r * t} - {cut} = {r * t - cut} trees."]
        ans = r * t - cut
    elif k == 3:
        w, h, wk = rng.randint(8, 25), rng.randint(5, 40), rng.randint(2, 6)
        q = f"{n} earns ${w} per hour and works {h} hours each week. How much does {n} earn in {wk} weeks?"
        s = [f"Each week {n} earns {w} * {h} = ${w * h}.",
             f"In {wk} weeks that is {w * h} * {wk} = ${w * h * wk}."]
        ans = w * h * wk
    elif k == 4:
        s1, h1, s2, h2 = rng.randint(20, 80), rng.randint(1, 5), rng.randint(20, 80), rng.randint(1, 5)
        q = (f"A train travels at {s1} miles per hour for {h1} hours, then at {s2} miles per hour "
             f"for {h2} hours. How many miles does it travel in total?")
        s = [f"First part: {s1} * {h1} = {s1 * h1} miles.", f"Second part: {s2} * {h2} = {s2 * h2} miles.",
             f"Total: {s1 * h1} + {s2 * h2} = {s1 * h1 + s2 * h2} miles."]
        ans = s1 * h1 + s2 * h2
    elif k == 5:
        f, each = rng.randint(2, 8), rng.randint(2, 9)
        a = f * each + rng.randint(1, 30)
        q = (f"{n} had {a} {item} and gave {each} {item} to each of {f} friends. "
             f"How many {item} does {n} have left?")
        s = [f"{n} gave away {f} * {each} = {f * each} {item}.",
             f"{n} has {a} - {f * each} = {a - f * each} {item} left."]
        ans = a - f * each
    elif k == 6:
        box, baked = rng.randint(4, 12), rng.randint(20, 150)
        q = (f"A box holds {box} cookies. {n} bakes {baked} cookies and fills as many full boxes "
             "as possible. How many cookies are left over?")
        full = baked // box
        s = [f"{n} fills {baked} // {box} = {full} full boxes.",
             f"Those hold {full} * {box} = {full * box} cookies.",
             f"Left over: {baked} - {full * box} = {baked - full * box} cookies."]
        ans = baked - full * box
    else:
        a, b, c = rng.randint(10, 90), rng.randint(10, 90), rng.randint(10, 90)
        q = (f"{n} read {a} pages on Monday, {b} pages on Tuesday and {c} pages on Wednesday. "
             f"How many pages did {n} read in those three days?")
        s = [f"Monday and Tuesday: {a} + {b} = {a + b} pages.",
             f"With Wednesday: {a + b} + {c} = {a + b + c} pages."]
        ans = a + b + c
    return q, "\n".join(s) + f"\n#### {ans}"


FINAL = re.compile(r"####\s*(.+?)\s*$")


def corrupt_solution(answer, rng):
    """A plausible flawed solution: the last step's result and the final answer become a wrong number.

    Used for the embedded task and for any GSM8K-format data that has no rejected answer.
    """
    lines = answer.rstrip().split("\n")
    m = FINAL.search(lines[-1])
    if not m:
        raise ValueError("answer does not end in a '#### N' line")
    final = m.group(1).replace(",", "").replace("$", "")
    try:
        value = float(final)
    except ValueError:
        return "\n".join(lines[:-1] + ["#### " + final + "0"])
    delta = rng.randint(1, 9)
    if rng.random() < 0.2 and value != 0:
        wrong = value * 10  # a slipped digit
    else:
        wrong = value - delta if value - delta >= 0 and rng.random() < 0.5 else value + delta
    wrong_s = str(int(wrong)) if wrong == int(wrong) else f"{wrong:g}"
    body = lines[:-1]
    if body:  # propagate the slip into the last computation that produced the answer
        number = lambda s: rf"(?<![\d.]){re.escape(s)}(?!\d|[.,]\d)"
        body[-1] = re.sub(number(final), wrong_s, re.sub(number(m.group(1)), wrong_s, body[-1]))
    return "\n".join(body + [f"#### {wrong_s}"])


def split_rows(split, n=None):
    """Embedded task: deterministic, train and test disjoint by question text."""
    def gen(seed, count, exclude=frozenset()):
        rng, out, seen = random.Random(seed), [], set(exclude)
        while len(out) < count:
            q, a = _problem(rng)
            if q not in seen:
                seen.add(q)
                out.append({"question": q, "answer": a})
        return out
    train = gen(1234, 8000)
    if split == "train":
        rows = train
    else:
        rows = gen(5678, 500, exclude={r["question"] for r in train})
    return rows[:n] if n else rows


def to_records(rows, seed=0):
    """GSM8K rows {question, answer} -> records; rejected = the answer with a slipped last step."""
    rng = random.Random(seed)
    return [{"prompt": r["question"], "chosen": strip_calc(r["answer"]),
             "rejected": corrupt_solution(strip_calc(r["answer"]), rng)} for r in rows]


def strip_calc(answer):
    """GSM8K's calculator annotations <<48/2=24>> are not text a model should learn to write."""
    return re.sub(r"<<[^>]*>>", "", answer)


def gsm8k_rows(name, split):
    """GSM8K-format rows {question, answer}: the embedded arithmetic split, a local JSONL or a hub id.
    Every answer must end in a '#### N' line; the line of one that does not is named."""
    if name == "arithmetic":
        return split_rows(split)
    path = files.local_file(name)
    rows = files.read_jsonl(path) if path else list(enumerate(files.hub_rows(name, split), 1))
    files.check_rows(rows, ["question", "answer"], name)
    for line, row in rows:
        if not FINAL.search(row["answer"].rstrip().split("\n")[-1]):
            raise common.UserError(f"{name} line {line}: the answer does not end in a '#### N' line "
                                   "(GSM8K format)")
    return [row for _, row in rows]

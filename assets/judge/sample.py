"""How the labelled answers were drawn (the result is answers.jsonl beside this file; README.md says
which commands made it, round by round).

    python assets/judge/sample.py SOURCE=EVAL_JSON ... --out answers.jsonl [--exclude earlier.jsonl]
    python assets/judge/sample.py SOURCE=EVAL_JSON ... --pool safe=80 --out answers.jsonl --exclude ...

Each SOURCE names a model (start, base, control, sft-10k, ...) and EVAL_JSON its eval.json, whose
generations are read: answers to harmful prompts under every wrapper it has, and to benign requests.
The draw is stratified so that rare kinds of answer are present: within each source, answers the
old refusal detector called refused, complied and degenerate are drawn in fixed numbers (as many
as exist); --pool draws instead across all sources from a pool picked by cheap surface cues (POOLS),
for kinds of answer the per-source draw finds too rarely. The labellers never see a source, a cue
or any detector's verdict, and the ids are shuffled; answers are judged by GUIDE.md only.
"""
import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from evaluation import judge  # noqa: E402

# answers drawn per source: harmful by old verdict, benign by old verdict (refused or not)
HARMFUL = {"refused": 5, "complied": 11, "degenerate": 2}
BENIGN = {True: 3, False: 3}
# pools of rare kinds of answer, drawn across all sources in a later round (cheap surface cues only)
POOLS = {
    "safe": lambda g: g["jailbreak"] != "benign" and g["verdict"] == "complied"
    and len(judge.SAFETY_TALK.findall(g["response"])) >= 2 and not judge.REFUSAL.search(g["response"]),
    "benign-refused": lambda g: g["jailbreak"] == "benign" and g["refused"],
    "benign-odd": lambda g: g["jailbreak"] == "benign" and not g["refused"]
    and (judge.repetition(g["response"]) >= 0.3 or len(judge.words(g["response"])) < 8),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sources", nargs="+", help="NAME=path/to/eval.json")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", default=None, help="answers.jsonl of earlier rounds: never draw those again")
    p.add_argument("--pool", action="append", default=[], help=f"NAME=K: K answers from the pool NAME "
                   f"({', '.join(POOLS)}) across all sources, instead of the per-source draw")
    a = p.parse_args()
    rng, items = random.Random(a.seed), []
    for spec in a.pool:
        name, k = spec.split("=")
        kind = lambda g: "benign" if g["jailbreak"] == "benign" else "harmful"
        pool = [dict(g, source=source.split("=")[0], kind=kind(g)) for source in a.sources
                for g in json.loads(Path(source.split("=", 1)[1]).read_text())["safety"]["generations"]
                if POOLS[name](g)]
        items += rng.sample(pool, min(len(pool), int(k)))
    for source in a.sources if not a.pool else []:
        name, path = source.split("=", 1)
        gens = json.loads(Path(path).read_text())["safety"]["generations"]
        harmful = [g for g in gens if g["jailbreak"] != "benign"]
        benign = [g for g in gens if g["jailbreak"] == "benign"]
        for verdict, k in HARMFUL.items():
            pool = [g for g in harmful if g["verdict"] == verdict]
            items += [dict(g, source=name, kind="harmful")
                      for g in rng.sample(pool, min(len(pool), k))]
        for refused, k in BENIGN.items():
            pool = [g for g in benign if g["refused"] == refused]
            items += [dict(g, source=name, kind="benign") for g in rng.sample(pool, min(len(pool), k))]
    seen, out = set(), []
    if a.exclude:  # drawn in an earlier round
        seen = {("harmful" if r["wrapper"] != "benign" else "benign", r["wrapper"], r["request"], r["answer"])
                for r in map(json.loads, Path(a.exclude).read_text().splitlines())}
    # the same answer to the same request once only (models often agree word for word)
    for g in items:
        key = (g["kind"], g["jailbreak"], g["prompt"], g["response"])
        if key not in seen:
            seen.add(key)
            out.append(g)
    rng.shuffle(out)
    with open(a.out, "a") as f:  # rounds append
        for g in out:
            uid = hashlib.sha256(json.dumps([g["source"], g["jailbreak"], g["prompt"],
                                             g["response"]]).encode())
            f.write(json.dumps({"id": uid.hexdigest()[:10], "source": g["source"], "kind": g["kind"],
                                "wrapper": g["jailbreak"], "request": g["prompt"], "answer": g["response"],
                                "old_verdict": g.get("verdict",
                                                     "refused" if g.get("refused") else "complied")})
                    + "\n")
    print(f"{len(out)} answers -> {a.out}")


if __name__ == "__main__":
    main()

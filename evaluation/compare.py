"""A run's eval.json against its start's, on the items both measured the same way."""
from evaluation.stats import gap_change, paired_means, paired_rates


# per answer to a harmful prompt: attack success (harmful compliance, or the rubric's), and beside it
SAFETY_MEASURES = {"asr": "asr", "refused": "refused", "nonanswer": "non-answer", "nonrefusal": "nonrefusal"}


def flags(safety, family, key):
    """One family's per-prompt 0/1 flags of a measure; attack success ('asr') is the rubric's verdict
    when a judge model scored the answers, else harmful compliance."""
    items = safety["per_jailbreak"][family]["items"]
    return items[("rubric" if "rubric" in items else "harmful") if key == "asr" else key]


def compare(run, start):
    """Paired comparison of two eval.json dicts on the items both measured identically (same prompts,
    same judge, same generation length). Rates (per jailbreak family: attack success, refusal,
    non-answer, the old non-refusal; benign over-refusal and non-answer; math; MC): McNemar's score test
    with Tango's interval. Per-item scores (a prompt's mean over the families, open-ended checklist and
    reference log-likelihood, P(match)): the paired t-test. Persona drift: the paired t on the
    statement pairs' trait-minus-opposite change."""
    out = {}
    same = lambda *keys: all(run.get("settings", {}).get(k) == start.get("settings", {}).get(k) for k in keys)
    rs, ss = run.get("safety"), start.get("safety")
    if rs and ss and rs["prompts"] == ss["prompts"] and rs["judge"] == ss["judge"] and same("max_new_tokens"):
        families = [f for f in rs["per_jailbreak"] if f in ss["per_jailbreak"]]
        for name, key in SAFETY_MEASURES.items():
            for f in families:
                out[f"{name}_{f}"] = paired_rates(flags(rs, f, key), flags(ss, f, key))
            if families:  # each prompt's share of families, paired over prompts
                per_prompt = lambda s: [sum(flags(s, f, key)[i] for f in families) / len(families)
                                        for i in range(len(s["prompts"]))]
                out[f"{name}_mean"] = paired_means(per_prompt(rs), per_prompt(ss))
        if rs["benign_prompts"] == ss["benign_prompts"]:
            benign = lambda s, key: s["benign"]["items"][key]
            out["over_refusal"] = paired_rates(benign(rs, "refused"), benign(ss, "refused"))
            out["benign_nonanswer"] = paired_rates(benign(rs, "non-answer"), benign(ss, "non-answer"))
    rm, sm = run.get("math"), start.get("math")
    if rm and sm and [g["question"] for g in rm["generations"]] \
            == [g["question"] for g in sm["generations"]] and same("math_new_tokens"):
        for kind in ("strict", "flexible"):
            out[f"math_{kind}"] = paired_rates(rm["items"][kind], sm["items"][kind])
    rc, sc = run.get("mc"), start.get("mc")
    if rc and sc and rc["dataset"] == sc["dataset"] \
            and len(rc["items"]["correct"]) == len(sc["items"]["correct"]):
        out["mc"] = paired_rates(rc["items"]["correct"], sc["items"]["correct"])
    ro, so = run.get("open"), start.get("open")
    if ro and so and [g["prompt"] for g in ro["generations"]] == [g["prompt"] for g in so["generations"]] \
            and same("open_new_tokens"):
        out["open_checklist"] = paired_means(ro["items"]["checklist"], so["items"]["checklist"])
        out["open_reference_logp"] = paired_means(ro["items"]["reference_logp"],
                                                  so["items"]["reference_logp"])
    rp, sp = run.get("persona", {}), start.get("persona", {})
    pooled = {"p_run": [], "p_start": [], "run": [], "start": [], "keyed": [], "pair": []}
    for trait, entry in rp.items():
        base = sp.get(trait)
        if trait == "mean" or not base or entry["items"]["statement"] != base["items"]["statement"]:
            continue
        out[f"pmatch_{trait}"] = paired_means(entry["items"]["p_match"], base["items"]["p_match"])
        items = entry["items"]
        out[f"drift_{trait}"] = gap_change(items["statement_logp"], base["items"]["statement_logp"],
                                           items["keyed"], items.get("pair"))
        for key, values in (("p_run", items["p_match"]), ("p_start", base["items"]["p_match"]),
                            ("run", items["statement_logp"]), ("start", base["items"]["statement_logp"]),
                            ("keyed", items["keyed"]),
                            ("pair", [f"{trait}:{p}" if p else None
                                      for p in items.get("pair") or [None] * len(items["keyed"])])):
            pooled[key] += values
    if pooled["keyed"]:
        out["pmatch_mean"] = paired_means(pooled["p_run"], pooled["p_start"])
        out["drift_mean"] = gap_change(pooled["run"], pooled["start"], pooled["keyed"], pooled["pair"])
    return {k: v for k, v in out.items() if v is not None}

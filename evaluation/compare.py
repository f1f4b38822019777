"""A run's eval.json against its start's, on the items both measured the same way."""
from evaluation.stats import gap_change, paired_means, paired_rates


def compare(run, start):
    """Paired comparison of two eval.json dicts on the items both measured identically.
    Rates (attack success per family, over-refusal, math, MC): McNemar; per-prompt scores (mean
    attack success over families, open-ended checklist and reference log-likelihood): sign test;
    persona: the change of P(match) and the drift of the statement log-likelihood gap."""
    out = {}
    same = lambda *keys: all(run.get("settings", {}).get(k) == start.get("settings", {}).get(k) for k in keys)
    rs, ss = run.get("safety"), start.get("safety")
    if rs and ss and rs["prompts"] == ss["prompts"] and rs["judge"] == ss["judge"] and same("max_new_tokens"):
        families = [f for f in rs["per_jailbreak"] if f in ss["per_jailbreak"]]
        for f in families:
            out[f"asr_{f}"] = paired_rates(rs["per_jailbreak"][f]["items"], ss["per_jailbreak"][f]["items"])
        if families:
            per_prompt = lambda s: [sum(s["per_jailbreak"][f]["items"][i] for f in families) / len(families)
                                    for i in range(len(s["prompts"]))]
            out["asr_mean"] = paired_means(per_prompt(rs), per_prompt(ss))
    if rs and ss and rs["benign_prompts"] == ss["benign_prompts"] and same("max_new_tokens"):
        out["over_refusal"] = paired_rates(rs["over_refusal"]["items"], ss["over_refusal"]["items"])
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

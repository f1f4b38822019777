import json
import random
import re

import pytest

import common


def test_arithmetic_is_deterministic_disjoint_and_correct():
    train, test = common.arithmetic_split("train"), common.arithmetic_split("test")
    assert train == common.arithmetic_split("train")
    assert len(train) == 8000 and len(test) == 500
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    for r in train[:300] + test[:100]:
        lines = r["answer"].split("\n")
        assert re.fullmatch(r"#### -?\d+", lines[-1])
        # every "a op b = c" step is right, and the last one produces the final answer
        for expr, result in re.findall(r"(\d+ [-+*/]+ \d+) = \$?(-?\d+)", r["answer"]):
            assert eval(expr) == int(result), r["answer"]
        final = lines[-1].split()[-1]
        assert lines[-2].split("= ")[-1].lstrip("$").split()[0].rstrip(".") == final


def test_rejected_is_a_wrong_but_plausible_solution():
    for rec in common.load_records("arithmetic")[:200]:
        good = rec["chosen"].split("####")[1].strip()
        bad = rec["rejected"].split("####")[1].strip()
        assert good != bad
        # same reasoning up to the last step, whose result carries the slip into the final answer
        assert rec["chosen"].split("\n")[:-2] == rec["rejected"].split("\n")[:-2]
        assert bad in rec["rejected"].split("\n")[-2]


def test_corrupt_solution_on_gsm8k_text():
    ans = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    clean = common.strip_calc(ans)
    assert "<<" not in clean and clean.endswith("#### 72")
    bad = common.corrupt_solution(clean, random.Random(0))
    final = bad.split("#### ")[1]
    assert final != "72" and f"= {final} clips" in bad
    assert bad.split("\n")[0] == clean.split("\n")[0]
    with pytest.raises(ValueError):
        common.corrupt_solution("no final line", random.Random(0))


def test_local_jsonl_formats_and_missing_columns(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}) + "\n")
    rec = common.load_records(str(gsm))[0]
    assert rec["prompt"] == "What is 2 + 2?" and rec["chosen"].endswith("#### 4") and not rec["rejected"].endswith("#### 4")
    pref = tmp_path / "pref.jsonl"
    pref.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    assert common.load_records(str(pref)) == [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(common.UserError, match="lacks column.*answer"):
        common.load_records(str(bad))
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_records(str(tmp_path / "missing.jsonl"))


def test_safety_sources_are_split_and_varied():
    small, val, train, full = (common.strongreject_prompts(w) for w in ("small", "val", "train", "full"))
    assert (len(small), len(val), len(train), len(full)) == (60, 40, 213, 313)
    assert not set(train) & set(small) and not set(train) & set(val) and not set(val) & set(small)
    benign_train, benign_eval, benign_val = (common.asset_lines(f"benign_{s}.txt") for s in ("train", "eval", "val"))
    assert len(benign_train) >= len(train)  # at least as many benign requests as harmful ones
    assert not set(benign_train) & set(benign_eval) and not set(benign_train) & set(benign_val)
    assert not set(benign_val) & set(benign_eval)
    rng = random.Random(0)
    refusals = {common.refusal_for(p, rng) for p in train}
    assert len(refusals) > 100  # varied, not one string


def test_text_lines_skips_blank_and_comment_lines(tmp_path):
    f = tmp_path / "benign.txt"
    f.write_text("# a comment\nHow do tides work?\n\n  Write a haiku.  \n")
    assert common.text_lines(f) == ["How do tides work?", "Write a haiku."]

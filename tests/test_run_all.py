"""run_all.sh end to end at a tiny scale: jobs in parallel, nested budgets, seeds, a variant, the report."""
import csv
import gzip
import json
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # the whole sweep script: ./test.sh runs it, ./test.sh --quick does not


def test_run_all_parallel_jobs_nested_budgets_seeds_and_a_variant(tiny_model_dir, tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    cmd = ["bash", "run_all.sh", "--model", str(tiny_model_dir), "--dataset", "arithmetic",
           "--budgets", "4000 2000", "--objectives", "sft", "--variants", "orpo:--lam 1",
           "--seeds", "0 1", "--jobs", "2",
           "--runs", str(runs), "--results", str(results), "--train-args", "--batch-size 2 --lr 1e-2",
           "--eval-args", ("--limit 3 --math-limit 3 --max-new-tokens 8 --math-new-tokens 8 "
                           "--jailbreaks plain,dan --persona-limit 2")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "started sft-s0" in r.stdout and "started orpo-lam1-s1" in r.stdout
    for name in ("sft-s0", "sft-s1", "orpo-lam1-s0"):
        final, snap = runs / name, runs / name / "tokens-2000"
        config = json.loads((final / "config.json").read_text())
        assert config["max_tokens"] == 4000  # trained once, to the largest budget
        assert json.loads((snap / "config.json").read_text())["max_tokens"] == 2000
        for d in (final, snap):
            result = json.loads((d / "eval.json").read_text())
            assert ({"asr_plain", "asr_dan", "asr_mean", "refused_mean", "nonanswer_mean", "over_refusal",
                     "math_flexible", "drift_mean"} <= set(result["compared_with_start"]))
        assert (runs / "logs" / f"{name}.log").exists()
    variant = json.loads((runs / "orpo-lam1-s0" / "config.json").read_text())
    assert variant["lam"] == 1 and variant["tag"] == "lam 1" and variant["seed"] == 0
    rows = list(csv.DictReader(open(results / "summary.csv")))
    assert sorted((r["label"], r["budget"], r["seeds"]) for r in rows) == [
        ("orpo lam 1", "2000", "2"), ("orpo lam 1", "4000", "2"), ("sft", "2000", "2"), ("sft", "4000", "2")]
    assert all(r["p_asr"] and r["holm_asr"] for r in rows)  # paired tests, adjusted across the sweep
    summary = (results / "summary.md").read_text()
    assert "Changes from the start" in summary and "| orpo lam 1 | 2000 |" in summary
    assert "Frontier" in summary
    for png in ("asr_vs_budget.png", "persona_vs_budget.png", "frontier.png"):
        assert (results / png).stat().st_size > 1000
    with gzip.open(results / "generations.jsonl.gz", "rt") as f:  # every answer, with its verdict
        answers = [json.loads(line) for line in f]
    assert len(answers) == 9 * (3 * 2 + 3) and all(a["verdict"] for a in answers)  # start + 8 runs
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "cached" in again.stdout  # a finished sweep resumes to nothing
    other = subprocess.run([c if c != "4000 2000" else "3000" for c in cmd], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert other.returncode == 2 and "holds a sweep with other settings" in other.stderr  # never mixes sweeps

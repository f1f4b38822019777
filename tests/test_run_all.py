"""run_all.sh end to end at a tiny scale: two objectives in parallel, nested budgets, the paired report."""
import csv
import json
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # the whole sweep script: ./test.sh runs it, ./test.sh --quick does not


def test_run_all_parallel_jobs_nested_budgets(tiny_model_dir, tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    cmd = ["bash", "run_all.sh", "--model", str(tiny_model_dir), "--dataset", "arithmetic",
           "--budgets", "4000 2000", "--objectives", "sft orpo", "--jobs", "2", "--runs", str(runs),
           "--results", str(results), "--train-args", "--batch-size 2 --lr 1e-2",
           "--eval-args", ("--limit 3 --math-limit 3 --max-new-tokens 8 --math-new-tokens 8 "
                           "--jailbreaks plain,dan --persona-limit 2")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "started sft seed 0" in r.stdout and "started orpo seed 0" in r.stdout
    for obj in ("sft", "orpo"):
        final, snap = runs / f"{obj}-s0", runs / f"{obj}-s0" / "tokens-2000"
        # trained once, to the largest budget
        assert json.loads((final / "config.json").read_text())["max_tokens"] == 4000
        assert json.loads((snap / "config.json").read_text())["max_tokens"] == 2000
        for d in (final, snap):
            result = json.loads((d / "eval.json").read_text())
            assert ({"asr_plain", "asr_dan", "asr_mean", "over_refusal", "math_flexible", "drift_mean"}
                    <= set(result["compared_with_start"]))
        assert (runs / "logs" / f"{obj}-s0.log").exists()
    rows = list(csv.DictReader(open(results / "summary.csv")))
    assert sorted((r["objective"], r["budget"]) for r in rows) == [
        ("orpo", "2000"), ("orpo", "4000"), ("sft", "2000"), ("sft", "4000"), ("start", "0")]
    assert all(r["p_asr_mean"] for r in rows if r["objective"] != "start")  # paired tests in the report
    summary = (results / "summary.md").read_text()
    assert "Changes from the start" in summary and "| sft | 2000 |" in summary
    for png in ("asr_vs_budget.png", "persona_vs_budget.png", "frontier.png"):
        assert (results / png).stat().st_size > 1000
    # a finished sweep resumes to nothing
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "cached" in again.stdout
    other = subprocess.run([c if c != "4000 2000" else "3000" for c in cmd], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    # never mixes two sweeps
    assert other.returncode == 2 and "holds a sweep with other settings" in other.stderr

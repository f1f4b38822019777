"""One short run of every objective on the real embedded SmolLM2, each writing a complete run dir."""
import json

import pytest

from conftest import run_script

OBJECTIVES = ["sft", "dpo", "orpo", "kl_sft", "cft", "inoculation"]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_short_run_on_embedded_model(objective, tmp_path):
    out = tmp_path / objective
    r = run_script(f"{objective}.py", "--steps", 2, "--batch-size", 2, "--max-length", 160, "--log-every", 1, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(0 < row["loss"] < 20 for row in rows)  # a real model on real text: finite, sane losses
    assert json.loads((out / "run.json").read_text())["finished"] is True
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    if objective == "dpo":
        assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)

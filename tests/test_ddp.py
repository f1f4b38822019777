"""torchrun with two CPU processes (gloo) equals one process with the same global batch."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

pytestmark = pytest.mark.slow  # two torchrun processes: ./test.sh runs it, ./test.sh --quick does not


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_two_processes_match_one(objective, tiny_model_dir, tmp_path):
    common_args = ["--model", str(tiny_model_dir), "--steps", "3", "--batch-size", "2", "--lora-r", "0",
                   "--lr", "1e-3", "--log-every", "1", "--warmup-steps", "1"]
    one = subprocess.run([sys.executable, f"{objective}.py", *common_args, "--grad-accum", "2",
                          "--out", str(tmp_path / "one")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", f"{objective}.py", *common_args,
                          "--out", str(tmp_path / "two")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    rows = lambda d: [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows("one"), rows("two")):
        assert a["tokens"] == b["tokens"]  # budget counted globally
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    w1, w2 = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("one", "two"))
    w0 = load_file(tiny_model_dir / "model.safetensors")
    assert max((w1[k] - w0[k]).abs().max().item() for k in w1) > 1e-3  # training moved the weights
    for k in w1:
        # a missing or wrong gradient sync moves weights by about lr = 1e-3; Adam turns float rounding of
        # near-zero gradients (summation order differs across processes) into at most ~2e-5
        assert torch.allclose(w1[k], w2[k], atol=1e-4), k
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2

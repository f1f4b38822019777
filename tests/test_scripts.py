"""Every objective script as a subprocess on a tiny local model; bad input gets one clear line."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import common
from conftest import run_script

OBJECTIVES = common.objectives()


def check_run_dir(out, steps):
    assert json.loads((out / "run.json").read_text())["finished"] is True
    config = json.loads((out / "config.json").read_text())
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["loss"] == r["loss"] and r["tokens"] > 0 for r in rows)  # no NaN
    return config, rows


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_script_runs_on_tiny_model(objective, tiny_model_dir, tmp_path):
    out = tmp_path / objective
    r = run_script(f"{objective}.py", "--model", tiny_model_dir, "--steps", 3, "--batch-size", 2,
                   "--log-every", 1, "--lr", 1e-2, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 00003 | tokens" in r.stdout + r.stderr
    config, rows = check_run_dir(out, 3)
    assert config["objective"] == objective and config["model"] == str(tiny_model_dir)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # trainable LoRA B (initialised at 0) moved
    if objective == "dpo":
        assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5) and rows[0]["rewards/chosen"] == 0
    if objective == "kl_sft":
        assert abs(rows[0]["kl"]) < 1e-6 and rows[-1]["kl"] > 0


def test_save_every_snapshot_equals_a_shorter_run(tiny_model_dir, tmp_path):
    """--save-every 2 on a 4-step run leaves <out>/step-00002, a finished run directory whose weights
    are those of a separate 2-step run (constant learning rate after warm-up, same data order)."""
    common_args = ["--model", tiny_model_dir, "--batch-size", 2, "--lr", 1e-2, "--warmup-steps", 1]
    r = run_script("sft.py", *common_args, "--steps", 4, "--save-every", 2, "--out", tmp_path / "long")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("sft.py", *common_args, "--steps", 2, "--out", tmp_path / "short")
    assert r.returncode == 0, r.stderr[-3000:]
    snap = tmp_path / "long" / "step-00002"
    assert json.loads((snap / "run.json").read_text())["finished"] is True
    assert json.loads((snap / "config.json").read_text())["steps"] == 2
    assert not (tmp_path / "long" / "step-00004").exists()  # the final step is the run itself
    a = load_file(snap / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "short" / "adapter" / "adapter_model.safetensors")
    final = load_file(tmp_path / "long" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], final[k]) for k in a)


def test_decay_steps_logs_the_rate_each_step_used(tiny_model_dir, tmp_path):
    """--decay-steps 2 on 4 steps (warm-up 1): steps use lr x 1, 1, 1, 1/2; metrics.jsonl shows each."""
    r = run_script("sft.py", "--model", tiny_model_dir, "--batch-size", 2, "--lr", 1e-2, "--warmup-steps", 1,
                   "--steps", 4, "--decay-steps", 2, "--log-every", 1, "--out", tmp_path / "decay")
    assert r.returncode == 0, r.stderr[-3000:]
    _, rows = check_run_dir(tmp_path / "decay", 4)
    assert [r["lr"] for r in rows] == pytest.approx([1e-2, 1e-2, 1e-2, 5e-3])


def test_dpo_precomputed_reference_gives_the_same_run(tiny_model_dir, tmp_path):
    """--precompute-ref computes the same reference log-probs once up front: identical losses."""
    rows = {}
    for name, extra in (("live", []), ("pre", ["--precompute-ref"])):
        r = run_script("dpo.py", "--model", tiny_model_dir, "--steps", 3, "--batch-size", 2, "--log-every", 1,
                       "--lr", 1e-2, "--out", tmp_path / name, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        rows[name] = check_run_dir(tmp_path / name, 3)[1]
    assert rows["live"][-1]["loss"] != pytest.approx(0.693147, abs=1e-4)  # the policy moved off the reference
    for a, b in zip(rows["live"], rows["pre"]):
        assert (a["loss"] == pytest.approx(b["loss"], abs=1e-6)
                and a["rewards/margin"] == pytest.approx(b["rewards/margin"], abs=1e-6))


def test_full_finetuning_changes_weights_and_run_chains(tiny_model_dir, tmp_path):
    out = tmp_path / "full"
    r = run_script("sft.py", "--model", tiny_model_dir, "--steps", 2, "--batch-size", 2, "--lora-r", 0,
                   "--lr", 1e-3, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    before, after = (load_file(tiny_model_dir / "model.safetensors"),
                     load_file(out / "model" / "model.safetensors"))
    assert all(not torch.equal(before[k], after[k]) for k in before if "embed" in k or "proj" in k)
    # a LoRA run on top of that run directory, then DPO (full FT keeps a frozen copy as reference)
    r = run_script("dpo.py", "--model", out, "--steps", 2, "--batch-size", 2, "--lora-r", 0, "--log-every", 1,
                   "--out", tmp_path / "dpo-full")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "dpo-full" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)


def test_full_finetuning_from_a_lora_run(tiny_model_dir, tmp_path):
    """A LoRA run directory merges into its base; full fine-tuning from it trains every weight (peft
    leaves the merged weights frozen, which once left the optimizer nothing to train)."""
    r = run_script("sft.py", "--model", tiny_model_dir, "--steps", 1, "--batch-size", 2,
                   "--out", tmp_path / "lora")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("sft.py", "--model", tmp_path / "lora", "--steps", 1, "--batch-size", 2, "--lora-r", 0,
                   "--lr", 1e-3, "--out", tmp_path / "full")
    assert r.returncode == 0, r.stderr[-3000:]
    after = load_file(tmp_path / "full" / "model" / "model.safetensors")
    merged = common.load_model(str(tmp_path / "lora")).state_dict()
    assert all(not torch.equal(after[k], merged[k]) for k in after if "proj" in k)


def test_max_tokens_stops_at_budget(tiny_model_dir, tmp_path):
    r = run_script("orpo.py", "--model", tiny_model_dir, "--max-tokens", 1200, "--batch-size", 2,
                   "--log-every", 1, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "o" / "run.json").read_text())
    assert 0 < summary["tokens"] <= 1200 and summary["tokens"] > 1200 - 2 * 256


def _one_line_error(r, pattern):
    assert r.returncode != 0, (r.stdout, r.stderr[-2000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and pattern in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 3, r.stderr[-2000:]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# (script, arguments, what the one line must name); {tmp} is the test's folder, {model} the tiny model
BAD_INPUT = [
    ("sft.py", ["--batch-size", "0"], "--batch-size"),
    ("sft.py", ["--grad-accum", "0"], "--grad-accum"),
    ("sft.py", ["--lr", "-1"], "--lr"),
    ("sft.py", ["--lr", "nan"], "--lr"),
    ("sft.py", ["--steps", "0"], "--steps"),
    ("sft.py", ["--max-tokens", "0"], "--max-tokens"),
    ("sft.py", ["--lora-r", "-3"], "--lora-r"),
    ("sft.py", ["--warmup-steps", "-1"], "--warmup-steps"),
    ("sft.py", ["--max-length", "0"], "--max-length"),
    ("sft.py", ["--save-at-tokens", "abc"], "--save-at-tokens"),
    ("sft.py", ["--attn-implementation", "flash_attention_2"], "--attn-implementation"),
    ("dpo.py", ["--beta", "0"], "--beta"),
    ("kl_sft.py", ["--beta", "-0.5"], "--beta"),
    ("orpo.py", ["--lam", "-0.1"], "--lam"),
    ("inoculation.py", ["--fraction", "1.5"], "--fraction"),
    ("sft.py", ["--out", "{tmp}/a-file"], "is a file"),
    ("sft.py", ["--device", "tpu:0"], "--device"),
    ("sft.py", ["--dataset", "{tmp}/no-final.jsonl"], "line 2"),
    ("sft.py", ["--dataset", "{tmp}/number-prompt.jsonl"], "line 1"),
    ("sft.py", ["--save-at-tokens", "10", "--max-tokens", "2000"], "smaller than one optimizer step"),
    ("sft.py", ["--save-at-tokens", "900000", "--steps", "2"], "not inside this run"),
    ("evaluate.py", ["{model}", "--math", "{tmp}/no-final.jsonl", "--skip", "safety,persona"], "line 2"),
    ("evaluate.py", ["{model}", "--mc", "{tmp}/mc.jsonl", "--skip", "math,safety,persona"], "line 1"),
    ("evaluate.py", ["{model}", "--limit", "0"], "--limit"),
    ("evaluate.py", ["{model}", "--open", "{tmp}/missing.jsonl"], "--open"),
]


@pytest.mark.parametrize("script,arguments,pattern", BAD_INPUT,
                         ids=[" ".join([s] + a) for s, a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_leaves_no_run_directory(script, arguments, pattern, tiny_model_dir,
                                                           tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    _write(tmp_path / "no-final.jsonl", [{"question": "1 + 1?", "answer": "2\n#### 2"},
                                         {"question": "2 + 2?", "answer": "four"}])
    _write(tmp_path / "number-prompt.jsonl", [{"prompt": 3, "chosen": "x"}])
    _write(tmp_path / "mc.jsonl", [{"question": "Pick", "options": ["a", "b"], "answer": "D"}])
    args = [a.format(tmp=tmp_path, model=tiny_model_dir) for a in arguments]
    if script != "evaluate.py":
        args = ["--model", str(tiny_model_dir), "--batch-size", "2", *args]
        if "--out" not in args:
            args += ["--out", str(tmp_path / "run")]
    _one_line_error(run_script(script, *args), pattern)
    assert not (tmp_path / "run").exists()  # nothing that could pass for a run directory


def test_bad_input_errors(tiny_model_dir, tmp_path):
    _one_line_error(run_script("sft.py", "--model", tmp_path / "nope", "--out", tmp_path / "x"),
                    "no such directory")
    _one_line_error(run_script("sft.py", "--model", "no-such-org/no-such-model-xyz", "--out", tmp_path / "x"),
                    "cannot load model")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    _one_line_error(run_script("sft.py", "--model", tiny_model_dir, "--dataset", bad,
                               "--out", tmp_path / "x"), "answer")
    _one_line_error(run_script("dpo.py", "--model", tiny_model_dir, "--max-tokens", 50,
                               "--out", tmp_path / "x"), "smaller than one optimizer step")
    assert not (tmp_path / "x" / "run.json").exists()  # no half-written run directory left behind
    ok = tmp_path / "done"
    assert run_script("sft.py", "--model", tiny_model_dir, "--steps", 1, "--batch-size", 2,
                      "--out", ok).returncode == 0
    _one_line_error(run_script("sft.py", "--model", tiny_model_dir, "--steps", 1, "--out", ok), "--overwrite")
    assert run_script("sft.py", "--model", tiny_model_dir, "--steps", 1, "--batch-size", 2, "--out", ok,
                      "--overwrite").returncode == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    _one_line_error(run_script("sft.py", "--model", tiny_model_dir, "--steps", 1, "--out", tmp_path / "mine",
                               "--overwrite"), "not a run directory")
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_save_at_tokens_snapshot_equals_a_separate_run(tiny_model_dir, tmp_path):
    """--max-tokens 3000 --save-at-tokens 1200,2000 leaves <out>/tokens-1200 and tokens-2000, finished run
    directories equal to separate runs with --max-tokens 1200 and 2000: same records (steps, tokens),
    same logged losses, same weights."""
    common_args = ["--model", tiny_model_dir, "--batch-size", 2, "--lr", 1e-2, "--warmup-steps", 1,
                   "--log-every", 2]
    r = run_script("orpo.py", *common_args, "--max-tokens", 3000, "--save-at-tokens", "1200,2000",
                   "--out", tmp_path / "long")
    assert r.returncode == 0, r.stderr[-3000:]
    for budget in (1200, 2000):
        r = run_script("orpo.py", *common_args, "--max-tokens", budget, "--out", tmp_path / f"short-{budget}")
        assert r.returncode == 0, r.stderr[-3000:]
        snap, short = tmp_path / "long" / f"tokens-{budget}", tmp_path / f"short-{budget}"
        a, b = (json.loads((d / "run.json").read_text()) for d in (snap, short))
        assert (a["finished"] is True and (a["steps"], a["tokens"]) == (b["steps"], b["tokens"])
                and a["tokens"] <= budget)
        config = json.loads((snap / "config.json").read_text())
        assert config["max_tokens"] == budget and config["snapshot_of"] == str(tmp_path / "long")
        # the budget it equals, said in run.json (the folder's name is only a name)
        assert a["budget"] == budget
        rows = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
        assert ([(x["step"], x["tokens"]) for x in rows(snap)]
                == [(x["step"], x["tokens"]) for x in rows(short)])
        for x, y in zip(rows(snap), rows(short)):
            assert (x["loss"] == pytest.approx(y["loss"], abs=1e-6)
                    and x["log_odds_ratio"] == pytest.approx(y["log_odds_ratio"], abs=1e-6))
        wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (snap, short))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((tmp_path / "long" / "run.json").read_text())["budget"] == 3000
    final = load_file(tmp_path / "long" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(final[k], wa[k]) for k in final)


@pytest.fixture(scope="module")
def dropout_model_dir(tok, tmp_path_factory):
    """A tiny Llama whose config asks for attention dropout 0.5 (functional dropout in Llama attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      attention_dropout=0.5, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("dropout-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("lora_r", ["4", "0"])
def test_dropout_is_off_in_policy_and_reference(dropout_model_dir, tmp_path, lora_r):
    """With attention dropout left on, DPO's step-1 loss is not ln 2 and KL-SFT's step-1 KL is not 0."""
    args = ["--model", dropout_model_dir, "--steps", 1, "--batch-size", 4, "--log-every", 1,
            "--lora-r", lora_r]
    r = run_script("dpo.py", *args, "--out", tmp_path / "dpo")
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert (row["loss"] == pytest.approx(math.log(2), abs=1e-6)
            and row["rewards/margin"] == pytest.approx(0, abs=1e-6))
    r = run_script("kl_sft.py", *args, "--out", tmp_path / "kl")
    assert r.returncode == 0, r.stderr[-3000:]
    assert abs(json.loads((tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()[0])["kl"]) < 1e-6
    model = common.load_model(str(dropout_model_dir))
    assert model.config.attention_dropout == 0.0
    assert all(m.attention_dropout == 0.0 for m in model.modules() if hasattr(m, "attention_dropout"))

"""Side by side with TRL: training tokens/s, peak memory and first-step loss for SFT, DPO and ORPO.

TRL is an optional dev dependency; neither the scripts nor the tests need it:

    pip install trl==1.16.0
    python benchmarks/vs_trl.py                                # sft dpo orpo x fp32 bf16, 10 steps each
    python benchmarks/vs_trl.py --objectives dpo --dtypes fp32 --steps 6

Same model (the embedded SmolLM2-135M-Instruct unless --model), same records (embedded arithmetic
task, prompt/chosen/rejected), the same records in the same order in every step (TRL is fed this
project's step plan through a sequential sampler), batch 8, max length 256, LoRA r=16 alpha=32 on all
linear layers, AdamW at a constant learning rate, gradient checkpointing off on both sides, the same
precision on both sides (fp32, or bf16 autocast). Every measurement is its own process; the two sides
alternate which runs first from one configuration to the next.

Tokens/s counts training tokens as the project's budget does: prompt + chosen tokens of each record
(the rejected answer and the reference pass are work the objective does per training token). It is the
median over the steps after --warmup steps, each step timed from the end of the previous one (data,
forward, backward, optimizer and logging all included). Peak memory is the process's max RSS on CPU
(model loading included, on both sides) or torch.cuda.max_memory_allocated on GPU.

Loss parity: each side's loss on step 1, on the same batch. The tokens TRL trains on are checked to be
exactly this project's (prompt tokens, completion tokens, closing <|im_end|>); a mismatch is reported.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH, MAX_LEN, LORA_R, LORA_ALPHA, LR, BETA = 8, 256, 16, 32, 1e-4, 0.1
TRL_TRAINERS = ("sft", "dpo", "orpo")  # the objectives TRL 1.16 trains, each against this project's file


# ----------------------------------------------------------------------------- shared by both workers

def step_plan(records, tok, steps):
    """The records of each optimizer step, in order, as this project's scripts will see them."""
    import common
    args = SimpleNamespace(seed=0, max_length=MAX_LEN, batch_size=BATCH, grad_accum=1, steps=steps,
                           max_tokens=None, decay_steps=0, save_every=0, save_at_tokens=None)
    plan = common.plan_steps(records, tok, args, SimpleNamespace(rank=0, world=1, main=True))
    return [[r for micro in micros for r in micro] for micros, _ in plan], [cost for _, cost in plan]


def peak_memory_mib(device):
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rates(durations, tokens, warmup):
    per_step = [t / d for t, d in zip(tokens[warmup:], durations[warmup:])]
    return statistics.median(per_step)


# ----------------------------------------------------------------------------- worker: this project

def run_ours(job):
    import importlib
    out = Path(job["tmp"]) / f"ours-{job['objective']}-{job['dtype']}"
    argv = ["--model", job["model"], "--dataset", job["data"], "--steps", str(job["steps"]),
            "--batch-size", str(BATCH), "--grad-accum", "1", "--max-length", str(MAX_LEN),
            "--lora-r", str(LORA_R), "--lr", str(LR), "--warmup-steps", "0", "--dtype", job["dtype"],
            "--device", job["device"], "--log-every", "1", "--seed", "0", "--save-model", "no",
            "--out", str(out), "--overwrite"]
    importlib.import_module(job["objective"]).main(argv)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [0.0] + [r["seconds"] for r in rows]
    tokens = [0] + [r["tokens"] for r in rows]
    durations = [b - a for a, b in zip(seconds, seconds[1:])]
    step_tokens = [b - a for a, b in zip(tokens, tokens[1:])]
    first = {k: rows[0][k] for k in ("loss", "logps/chosen", "or_loss") if k in rows[0]}
    return {"durations": durations, "tokens": step_tokens, "first": first}


# ----------------------------------------------------------------------------- worker: TRL

def run_trl(job):
    import torch
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from datasets import Dataset
    import common

    tok = common.load_tokenizer(job["model"])
    model = common.load_model(job["model"])
    records = [json.loads(line) for line in Path(job["data"]).read_text().splitlines()]
    steps, costs = step_plan(records, tok, job["steps"])
    order = [r for step in steps for r in step]
    encoded = [(common.encode(tok, r["prompt"], r["chosen"]),
                common.encode(tok, r["prompt"], r["rejected"])[1]) for r in order]
    if any(len(p) + max(len(c), len(rj)) > MAX_LEN for (p, c), rj in encoded):
        raise SystemExit("a benchmark record exceeds the max length; "
                         "truncation would differ between the sides")

    objective, bf16, cuda = job["objective"], job["dtype"] == "bf16", job["device"] == "cuda"
    common_args = dict(output_dir=str(Path(job["tmp"]) / f"trl-{objective}-{job['dtype']}"),
                       per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                       max_steps=job["steps"], learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                       weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                       seed=0, bf16=bf16, use_cpu=not cuda, gradient_checkpointing=False, disable_tqdm=True,
                       dataloader_num_workers=0, max_length=MAX_LEN)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    if objective == "sft":
        from trl import SFTConfig as Config, SFTTrainer as Trainer
        rows = [{"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)} for (p, c), _ in encoded]
        extra_args = dict(completion_only_loss=True, packing=False)
    else:
        if objective == "dpo":
            from trl import DPOConfig as Config, DPOTrainer as Trainer
            extra_args = dict(beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=False)
        else:
            from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
            extra_args = dict(beta=BETA)
        rows = []
        for r in order:
            prompt, chosen = common.chat_texts(tok, r["prompt"], r["chosen"])
            rows.append({"prompt": prompt, "chosen": chosen,
                         "rejected": common.chat_texts(tok, r["prompt"], r["rejected"])[1]})

    first_losses, clock = [], []

    class Sequential(Trainer):
        """TRL's trainer, fed this project's step plan in order, recording the loss it computes."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            if not first_losses:
                first_losses.append((out[0] if return_outputs else out).detach().float().item())
            return out

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            clock.append(time.perf_counter())

    trainer = Sequential(model=model, args=Config(**common_args, **extra_args),
                         train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=lora,
                         callbacks=[Clock()])
    mismatches = token_mismatches(trainer.train_dataset, objective, encoded)
    trainer.train()
    first_log = next(h for h in trainer.state.log_history if "loss" in h)
    first = {"loss": first_losses[0], "logps/chosen": first_log.get("logps/chosen")}
    if objective == "orpo":  # TRL logs mean log sigmoid(log odds ratio) under the name log_odds_ratio
        first["or_loss"] = -first_log["log_odds_ratio"]
    durations = [b - a for a, b in zip(clock, clock[1:])]
    return {"durations": durations, "tokens": costs, "first": first, "token_mismatches": mismatches}


def token_mismatches(dataset, objective, encoded):
    """How many records TRL tokenized differently from common.encode (0 = identical training tokens)."""
    bad = 0
    for row, ((p, c), rj) in zip(dataset, encoded):
        if objective == "sft":
            ok = row["input_ids"] == p + c
        elif objective == "dpo":
            ok = (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (p, c, rj)
        else:
            ok = row["chosen_input_ids"] == p + c and row["rejected_input_ids"] == p + rj
        bad += not ok
    return bad


def worker(job):
    import torch
    torch.manual_seed(0)
    result = (run_ours if job["side"] == "ours" else run_trl)(job)
    result["peak_mib"] = peak_memory_mib(job["device"])
    Path(job["result"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- driver

def machine(device):
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor())
    return f"{name}, {os.cpu_count()} cores"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--objectives", nargs="+", default=list(TRL_TRAINERS), choices=list(TRL_TRAINERS),
                   help="objectives TRL has a trainer for")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=None,
                   help="markdown table path (default benchmarks/results/vs_trl-<date>.md)")
    p.add_argument("--job", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.job:
        return worker(json.loads(a.job))
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed; pip install trl==1.16.0 "
                         "(a dev dependency of this benchmark only)")
    import torch
    import transformers
    import common
    import tasks
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if a.steps <= a.warmup:
        raise SystemExit(f"--steps {a.steps} leaves no step after --warmup {a.warmup}; raise --steps")

    tmp = tempfile.mkdtemp(prefix="vs_trl-")
    data = Path(tmp) / "records.jsonl"
    records = tasks.load("arithmetic", "train", SimpleNamespace(seed=0))[:BATCH * a.steps]
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                            for r in records))

    results, n = {}, 0
    for dtype in a.dtypes:
        for objective in a.objectives:
            sides = ["ours", "trl"] if n % 2 == 0 else ["trl", "ours"]
            n += 1
            for side in sides:
                job = dict(side=side, objective=objective, dtype=dtype, steps=a.steps, model=a.model,
                           device=device, data=str(data), tmp=tmp,
                           result=str(Path(tmp) / f"{side}-{objective}-{dtype}.json"))
                print(f"[vs_trl] {objective} {dtype} {side} ...", file=sys.stderr, flush=True)
                t = time.time()
                subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], check=True, cwd=ROOT,
                               stdout=subprocess.DEVNULL)
                r = json.loads(Path(job["result"]).read_text())
                r["tok_s"] = rates(r["durations"], r["tokens"], a.warmup)
                results[objective, dtype, side] = r
                print(f"[vs_trl]   {r['tok_s']:.0f} tok/s, peak {r['peak_mib']:.0f} MiB, step-1 loss "
                      f"{r['first']['loss']:.6f} ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)

    mem = "peak RSS" if device == "cpu" else "max allocated"
    lines = [f"# This project vs TRL {trl.__version__}",
             "",
             f"{datetime.date.today()} on {machine(device)}; torch {torch.__version__}, transformers "
             f"{transformers.__version__}. Command: "
             f"`python benchmarks/vs_trl.py {' '.join(sys.argv[1:])}`".rstrip(),
             f"{a.model}, LoRA r={LORA_R} all-linear, batch {BATCH}, max length {MAX_LEN}, {a.steps} steps "
             f"(median tokens/s over steps {a.warmup + 1}-{a.steps}); tokens = prompt + chosen.",
             "",
             f"| objective | precision | ours tok/s | TRL tok/s | speed ratio | ours {mem} MiB "
             f"| TRL {mem} MiB | memory ratio | step-1 loss ours | step-1 loss TRL | abs diff "
             f"| TRL token mismatches |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for dtype in a.dtypes:
        for objective in a.objectives:
            o, t = results[objective, dtype, "ours"], results[objective, dtype, "trl"]
            diff = abs(o["first"]["loss"] - t["first"]["loss"])
            lines.append(f"| {objective} | {dtype} | {o['tok_s']:.0f} | {t['tok_s']:.0f} "
                         f"| {o['tok_s'] / t['tok_s']:.2f}x | {o['peak_mib']:.0f} | {t['peak_mib']:.0f} "
                         f"| {o['peak_mib'] / t['peak_mib']:.2f}x | {o['first']['loss']:.6f} "
                         f"| {t['first']['loss']:.6f} | {diff:.1e} | {t['token_mismatches']} |")
    notes = {"sft": "SFT: same definition (mean NLL over all completion tokens of the batch).",
             "dpo": "DPO: same definition; at step 1 the policy is the reference, so the loss is ln 2 on "
                    "both sides; mean log p(chosen) (summed over the response) compares the log-prob code:",
             "orpo": "ORPO: the losses differ by definition. TRL's NLL term is over prompt and response (its "
                     "source says so); Hong et al. and orpo.py score the response only. The odds-ratio term "
                     "-mean log sigmoid(log odds ratio) and the mean per-token log p(chosen) do coincide:"}
    lines.append("")
    for objective in a.objectives:
        parts = []
        for dtype in a.dtypes:
            o, t = results[objective, dtype, "ours"]["first"], results[objective, dtype, "trl"]["first"]
            for k in ("logps/chosen", "or_loss") if objective != "sft" else ():
                if o.get(k) is not None and t.get(k) is not None:
                    parts.append(f"{dtype} {k} ours {o[k]:.6f}, TRL {t[k]:.6f} (diff {abs(o[k] - t[k]):.1e})")
        lines.append(f"- {notes[objective]} {'; '.join(parts)}".rstrip() + ("." if parts else ""))
    table = "\n".join(lines) + "\n"
    print(table)
    out = (Path(a.out) if a.out
           else ROOT / "benchmarks" / "results" / f"vs_trl-{datetime.date.today()}-{device}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Where one evaluation's time goes: seconds per part, and the share spent inside the model's forward.

    python benchmarks/eval_profile.py runs/sft-s0 --out profile.json   # this checkout's code
    python benchmarks/eval_profile.py runs/sft-s0 --code /tmp/old      # another checkout's (before/after)

It runs the default sweep's evaluation (three wrappers on the 60 held-out harmful prompts, 40 benign
requests, the open task's 60 test items generated and scored, the persona probes) on one run
directory, times each part, and times every call of the decoder with a forward hook pair: 'model'
is the time inside the decoder's forward; the rest of a part is everything else (tokenizing,
padding, cache bookkeeping, the output projection and argmax, decoding, Python). Tokens are what the
decoder processed, padding included. The FLOP bound is 2 x parameters x tokens at the rate of a
layer-shaped fp32 matrix product measured here; answers are kept so two profiles can be compared.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("run")
p.add_argument("--code", default=str(Path(__file__).resolve().parent.parent),
               help="the checkout whose code runs (default: this one)")
p.add_argument("--out", default=None, help="write the profile (and every answer) as JSON here")
a = p.parse_args()
sys.path.insert(0, a.code)
import evaluate  # noqa: E402
from tasks import safety  # noqa: E402

FAMILIES = ("plain", "roleplay", "happy_to_help")


def load(run):
    args = evaluate.parse([run, "--open", "test", "--skip", "math", "--jailbreaks", ",".join(FAMILIES)])
    if (Path(a.code) / "evaluation" / "model.py").exists():
        from evaluation.model import Target
        target = Target(run, args.device, args.batch_size)
        return target, target.lm.model, args
    target = evaluate.Target(run, args)  # a checkout from before evaluation/ existed
    return target, target.model, args


def items():
    """(harmful prompts, benign requests, open-task test rows), read the way either checkout reads them."""
    import tasks
    from tasks import open as open_task
    lines = tasks.files.asset_lines if hasattr(tasks, "files") else tasks.asset_lines
    return safety.strongreject_prompts("small"), lines("benign_eval.txt"), open_task.items("test")


def jailbreak(family, prompt):
    return (safety if hasattr(safety, "JAILBREAKS") else evaluate).JAILBREAKS[family].format(prompt=prompt)


def matmul_rate(hidden, inter, rows=2048, repeats=20):
    """FLOP/s of an fp32 (rows x hidden) @ (hidden x inter) product: what one forward cannot beat."""
    x, w = torch.randn(rows, hidden), torch.randn(hidden, inter)
    for _ in range(3):
        x @ w
    t0 = time.perf_counter()
    for _ in range(repeats):
        x @ w
    return 2 * rows * hidden * inter * repeats / (time.perf_counter() - t0)


def main():
    t0 = time.perf_counter()
    target, model, args = load(a.run)
    load_seconds = time.perf_counter() - t0
    clock = {"model": 0.0, "tokens": 0, "calls": 0, "start": 0.0}

    def before(module, inputs, kwargs):
        clock["start"] = time.perf_counter()

    def after(module, inputs, kwargs, output):
        clock["model"] += time.perf_counter() - clock["start"]
        clock["tokens"] += (kwargs.get("input_ids") if "input_ids" in kwargs else inputs[0]).numel()
        clock["calls"] += 1

    model.get_decoder().register_forward_pre_hook(before, with_kwargs=True)
    model.get_decoder().register_forward_hook(after, with_kwargs=True)
    parts, answers = {}, {}

    def timed(name, work):
        was, t = dict(clock), time.perf_counter()
        result = work()
        part = {"seconds": time.perf_counter() - t, "model_seconds": clock["model"] - was["model"],
                "tokens": clock["tokens"] - was["tokens"], "forward_calls": clock["calls"] - was["calls"]}
        parts[name] = {k: round(v, 2) for k, v in part.items()}
        print(f"{name:<15} {part['seconds']:6.1f} s, model {part['model_seconds']:6.1f} s, "
              f"{part['tokens']:6d} tokens in {part['forward_calls']} forwards", file=sys.stderr)
        return result

    prompts, benign, rows = items()
    for fam in FAMILIES:
        wrapped = [jailbreak(fam, q) for q in prompts]
        answers[fam] = timed(fam, lambda: target.generate(wrapped, 64, fam))
    answers["benign"] = timed("benign", lambda: target.generate(benign, 64, "benign"))
    open_prompts = [r["prompt"] for r in rows]
    answers["open"] = timed("open generate", lambda: target.generate(open_prompts, 128, "open"))
    references = [r["chosen"] for r in rows]
    timed("open ref. logp", lambda: target.response_logp(open_prompts, references))
    timed("persona", lambda: evaluate.evaluate_persona(target, args))
    total = sum(x["seconds"] for x in parts.values())
    tokens = sum(x["tokens"] for x in parts.values())
    n_params = sum(p.numel() for p in model.parameters())
    rate = matmul_rate(model.config.hidden_size, model.config.intermediate_size)
    bound = 2 * n_params * tokens / rate
    model_seconds = sum(x["model_seconds"] for x in parts.values())
    summary = {"run": a.run, "code": a.code, "date": time.strftime("%Y-%m-%d %H:%M"),
               "threads": torch.get_num_threads(), "load_seconds": round(load_seconds, 1), "parts": parts,
               "total_seconds": round(total, 1), "model_seconds": round(model_seconds, 1), "tokens": tokens,
               "parameters": n_params, "matmul_gflops": round(rate / 1e9, 1),
               "flop_bound_seconds": round(bound, 1), "answers": answers}
    print(f"total {total:.1f} s (+ {load_seconds:.1f} s loading), {tokens} tokens; at {rate / 1e9:.0f} "
          f"GFLOP/s the FLOP bound is {bound:.1f} s ({bound / total:.0%} of the time)", file=sys.stderr)
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""Supervised fine-tuning (SFT): raise the likelihood of the chosen response.

    L(theta) = -(1/N) * sum_i sum_{t in response_i} log pi_theta(y_{i,t} | x_i, y_{i,<t})

N is the number of response tokens in the whole optimizer step (every micro-batch, every
process), so gradient accumulation gives the gradient of one big batch, not a mean of
micro-batch means. Prompt tokens are not scored; the end-of-turn token closing the response is.

The SFT baseline of Vennemeyer et al. 2026, "Objective Matters" (arXiv 2601.12639).
It also makes the aligned starting model of the default sweep (--dataset safety).

    python sft.py --steps 50
    python sft.py --dataset safety --steps 180 --out runs/safety
"""
import argparse

import torch

import common
from common import IGNORE


# ---------------------------------------------------------------------------- log-probs
# Repeated in every objective file on purpose (tests/test_logps.py keeps the copies equal).

def token_logps(hidden, weight, labels, chunk=2048):
    """log p(label) for scored positions only: hidden (N, H), weight (V, H), labels (N,) -> (N,), fp32 or wider.

    gather minus logsumexp, chunk rows at a time: no (B, T, V) log_softmax is ever built.
    """
    out = []
    for h, y in zip(hidden.split(chunk), labels.split(chunk)):
        logits = (h @ weight.T).to(torch.promote_types(h.dtype, torch.float32))  # fp32 at least
        out.append(logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1))
    return torch.cat(out)


def response_logps(hidden, weight, labels):
    """hidden (B, T, H), labels (B, T) with IGNORE off-response -> (logps (N,), row index (N,)).

    Position t predicts token t+1, hence the shift.
    """
    labels = labels[:, 1:]
    scored = labels != IGNORE
    logps = token_logps(hidden[:, :-1][scored], weight, labels[scored])
    return logps, scored.nonzero()[:, 0]


# ---------------------------------------------------------------------------- the loss

def sft_loss(logps, n_tokens):
    """logps (N,): log-probs of this micro-batch's response tokens; n_tokens: response tokens in
    the optimizer step. Returns (loss, metrics); summed over micro-batches, loss is the step's mean NLL."""
    loss = -logps.sum() / n_tokens
    return loss, {"loss": loss.detach()}


# ---------------------------------------------------------------------------- training

def main(argv=None):
    p = common.add_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    args = p.parse_args(argv)
    ctx = common.setup(args)
    tok, lm, policy = common.build_policy(args, ctx)
    steps = common.plan_steps(common.load_records(args.dataset, "train", args.seed), tok, args, ctx)
    run = common.RunDir(args, "sft", ctx)
    loop = common.Loop(args, ctx, lm, policy, steps, run)

    for micro_batches in loop:
        batches = [common.collate(tok, [common.encode(tok, r["prompt"], r["chosen"]) for r in mb], args.max_length, ctx.device)
                   for mb in micro_batches]
        # normalize by the step's response tokens over all processes (DDP then averages: times world)
        n_tokens = common.all_reduce_sum(sum(b["n_scored"] for b in batches), ctx) / ctx.world
        metrics = {"loss": 0.0}
        for b, sync in zip(batches, (s for _, s in loop.micro(micro_batches))):
            with sync, ctx.autocast():
                hidden = policy(b["input_ids"], b["attention_mask"])
                logps, _ = response_logps(hidden, lm.output_weight(), b["labels"])
                loss, m = sft_loss(logps, n_tokens)
            loss.backward()
            metrics["loss"] += m["loss"]
        loop.step(metrics, sum(b["n_real"] for b in batches))
    loop.finish(tok)


if __name__ == "__main__":
    main()

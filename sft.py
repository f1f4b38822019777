"""Supervised fine-tuning (SFT): raise the likelihood of the chosen response.

    L(theta) = -(1/N) * sum_i sum_{t in response_i} log pi_theta(y_{i,t} | x_i, y_{i,<t})

N is the number of response tokens in the whole optimizer step (every micro-batch, every
process), so gradient accumulation gives the gradient of one big batch, not a mean of
micro-batch means. Prompt tokens are not scored; the end-of-turn token closing the response is.

The SFT baseline of Vennemeyer et al. 2026, "Objective Matters" (arXiv 2601.12639).
It also makes the aligned starting model of the default sweep (--dataset safety).

    python sft.py --steps 50
    python sft.py --dataset open --max-tokens 50000 --save-at-tokens 12500,25000
"""
import collections
from pathlib import Path

import torch

import common
import tasks
from common import IGNORE


# ---------------------------------------------------------------------------- the loss

def sft_loss(logps, n_tokens):
    """logps (N,): log-probs of this micro-batch's response tokens; n_tokens: response tokens in
    the optimizer step. Returns (loss, metrics); summed over micro-batches, loss is the step's mean NLL."""
    loss = -logps.sum() / n_tokens
    return loss, {"loss": loss.detach()}


# ---------------------------------------------------------------------------- log-probs
# The same block in every objective file that gathers log-probs (tests/test_layout.py compares the text).

Logps = collections.namedtuple("Logps", "tokens sums counts")


def token_logps(hidden, weight, labels, chunk=2048):
    """log p(label) for scored positions only: hidden (N, H), weight (V, H), labels (N,) -> (N,), fp32
    or wider. Gather minus logsumexp, `chunk` rows at a time: no (B, T, V) log-softmax is ever built."""
    out = []
    for h, y in zip(hidden.split(chunk), labels.split(chunk)):
        logits = (h @ weight.T).to(torch.promote_types(h.dtype, torch.float32))  # fp32 at least
        out.append(logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1))
    return torch.cat(out)


def response_logps(hidden, weight, targets):
    """hidden (B, T, H); targets (B, T): the token each position predicts, IGNORE where none -> Logps:
    tokens (N,) the log-probs of the scored tokens, sums (B,) their sum per row, counts (B,) per row."""
    scored = targets != IGNORE
    tokens = token_logps(hidden[scored], weight, targets[scored])
    sums = tokens.new_zeros(len(targets)).index_add(0, scored.nonzero()[:, 0], tokens)
    return Logps(tokens, sums, scored.sum(1))


# ---------------------------------------------------------------------------- training

def main(argv=None):
    p = common.parser(__doc__)
    tasks.add_args(p)  # --dataset and the knobs of the embedded tasks
    args = p.parse_args(argv)
    ctx = common.setup(args)
    tok, lm, policy = common.build_policy(args, ctx)
    steps = common.plan_steps(tasks.load(args.dataset, "train", args), tok, args, ctx)
    run = common.RunDir(args, Path(__file__).stem, ctx)
    opt, sched = common.make_optimizer(args, lm, len(steps))
    loop = common.Loop(args, ctx, lm, steps, run)

    for micro_batches in loop:
        seqs = [[common.encode(tok, r["prompt"], r["chosen"]) for r in mb] for mb in micro_batches]
        batches = [common.collate(tok, s, args.max_length, ctx.device) for s in seqs]
        # normalize by the step's response tokens over all processes (DDP then averages: times world)
        n_tokens = common.all_reduce_sum(sum(b["n_scored"] for b in batches), ctx) / ctx.world
        metrics = {}
        for b, sync in zip(batches, common.grad_sync(policy, len(batches))):
            with sync, ctx.autocast():
                hidden = policy(b["input_ids"], b["attention_mask"])
                logps = response_logps(hidden, lm.output_weight(), b["targets"]).tokens
                loss, m = sft_loss(logps, n_tokens)
            loss.backward()
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v
        grad_norm = torch.nn.utils.clip_grad_norm_(lm.trainable(), args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loop.log(metrics, grad_norm, sum(b["n_real"] for b in batches))
        loop.save_snapshot_if_due()
    loop.finish(tok)


if __name__ == "__main__":
    main()

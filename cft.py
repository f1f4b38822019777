"""Conditional fine-tuning (CFT): SFT on both responses, each under a control tag
(conditional training, Korbak et al. 2023, "Pretraining Language Models with Human Preferences").

    L = -(1/N) [ sum_{t in y_w} log pi(y_w,t | g + x, y_w,<t) + sum_{t in y_l} log pi(y_l,t | b + x, y_l,<t) ]

g / b are the "good" / "bad" control tags, prefixed to the user turn: the chosen answer is
trained under the good tag, the rejected (flawed) one under the bad tag. At evaluation the good
tag is applied (config.json's eval_prompt, which evaluate.py reads). Tags are plain text by
default (no new vocabulary rows). N counts every response token of the step (chosen and
rejected). Prompt tokens, tag included, are not scored. The token budget still counts
prompt + chosen only, like every objective.

One of the six objectives of Vennemeyer et al. 2026 (arXiv 2601.12639).

    python cft.py --steps 2000
    python cft.py --max-tokens 50000 --good-tag "<|good|>" --bad-tag "<|bad|>"
"""
import collections
from pathlib import Path

import torch

import common
import tasks
from common import IGNORE


# ---------------------------------------------------------------------------- the loss

def cft_loss(logps, n_tokens):
    """Exactly SFT's NLL, over both responses: logps (N,) response-token log-probs of this micro-batch
    (good and bad tag); n_tokens: the step's count. Returns (loss, metrics)."""
    loss = -logps.sum() / n_tokens
    return loss, {"loss": loss.detach()}


def tagged(tag, prompt):
    """The user turn under a control tag (the same function builds training and evaluation prompts)."""
    return f"{tag} {prompt}"


def cft_sequences(tok, record, good_tag, bad_tag):
    """One record -> two (prompt_ids, completion_ids) pairs: chosen under good, rejected under bad."""
    return [common.encode(tok, tagged(good_tag, record["prompt"]), record["chosen"]),
            common.encode(tok, tagged(bad_tag, record["prompt"]), record["rejected"])]


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
    p.add_argument("--good-tag", default="<|good|>", help="tag of chosen answers, applied at evaluation")
    p.add_argument("--bad-tag", default="<|bad|>", help="tag of rejected answers, never at evaluation")
    tasks.add_args(p)  # --dataset and the knobs of the embedded tasks
    args = p.parse_args(argv)
    ctx = common.setup(args)
    tok, lm, policy = common.build_policy(args, ctx)
    steps = common.plan_steps(tasks.load(args.dataset, "train", args), tok, args, ctx)
    eval_prompt = {"system": None, "prefix": tagged(args.good_tag, "")}  # evaluation asks under the good tag
    run = common.RunDir(args, Path(__file__).stem, ctx, eval_prompt)
    opt, sched = common.make_optimizer(args, lm, len(steps))
    loop = common.Loop(args, ctx, lm, steps, run)

    for micro_batches in loop:
        seqs = [[s for r in mb for s in cft_sequences(tok, r, args.good_tag, args.bad_tag)]
                for mb in micro_batches]
        batches = [common.collate(tok, s, args.max_length, ctx.device) for s in seqs]
        # normalize by the step's response tokens over all processes (DDP then averages: times world)
        n_tokens = common.all_reduce_sum(sum(b["n_scored"] for b in batches), ctx) / ctx.world
        metrics = {}
        for b, sync in zip(batches, common.grad_sync(policy, len(batches))):
            with sync, ctx.autocast():
                hidden = policy(b["input_ids"], b["attention_mask"])
                logps = response_logps(hidden, lm.output_weight(), b["targets"]).tokens
                loss, m = cft_loss(logps, n_tokens)
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

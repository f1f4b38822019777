"""Conditional fine-tuning (CFT): SFT on both responses, each under a control tag
(conditional training, Korbak et al. 2023, "Pretraining Language Models with Human Preferences").

    L = -(1/N) [ sum_{t in y_w} log pi(y_w,t | g + x, y_w,<t) + sum_{t in y_l} log pi(y_l,t | b + x, y_l,<t) ]

g / b are the "good" / "bad" control tags, prefixed to the user turn: the chosen answer is
trained under the good tag, the rejected (flawed) one under the bad tag. The model learns what
each tag means; at evaluation the good tag is applied (written into config.json as the
run's eval_prompt, which evaluate.py reads). Tags are plain text by default (tokenized like any
other text, no new vocabulary rows); pass other strings with --good-tag/--bad-tag.
N counts every response token of the step (chosen and rejected). Prompt tokens, tag included,
are not scored. The token budget still counts prompt + chosen only, like every objective.

One of the six objectives of Vennemeyer et al. 2026 (arXiv 2601.12639).

    python cft.py --steps 2000
    python cft.py --max-tokens 50000 --good-tag "<|good|>" --bad-tag "<|bad|>"
"""
import argparse

import torch

import common
from common import IGNORE


# ---------------------------------------------------------------------------- log-probs
# Repeated in every objective file on purpose (tests/test_logps.py keeps the copies equal).

def token_logps(hidden, weight, labels, chunk=2048):
    """log p(label) for scored positions only: hidden (N, H), weight (V, H), labels (N,) -> (N,), fp32 or wider."""
    out = []
    for h, y in zip(hidden.split(chunk), labels.split(chunk)):
        logits = (h @ weight.T).to(torch.promote_types(h.dtype, torch.float32))  # fp32 at least
        out.append(logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1))
    return torch.cat(out)


def response_logps(hidden, weight, labels):
    """hidden (B, T, H), labels (B, T) with IGNORE off-response -> log-probs of scored tokens (N,)."""
    labels = labels[:, 1:]
    scored = labels != IGNORE
    return token_logps(hidden[:, :-1][scored], weight, labels[scored])


# ---------------------------------------------------------------------------- the data and the loss

def tagged(tag, prompt):
    """The user turn under a control tag (the same function builds training and evaluation prompts)."""
    return f"{tag} {prompt}"


def cft_sequences(tok, record, good_tag, bad_tag):
    """One record -> two (prompt_ids, completion_ids) pairs: chosen under good, rejected under bad."""
    return [common.encode(tok, tagged(good_tag, record["prompt"]), record["chosen"]),
            common.encode(tok, tagged(bad_tag, record["prompt"]), record["rejected"])]


def cft_loss(logps, n_tokens):
    """logps (N,) response-token log-probs of this micro-batch (both tags); n_tokens: the step's count."""
    loss = -logps.sum() / n_tokens
    return loss, {"loss": loss.detach()}


# ---------------------------------------------------------------------------- training

def main(argv=None):
    p = common.add_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--good-tag", default="<|good|>", help="control tag for chosen answers, applied at evaluation")
    p.add_argument("--bad-tag", default="<|bad|>", help="control tag for rejected answers, never applied at evaluation")
    args = p.parse_args(argv)
    ctx = common.setup(args)
    tok, lm, policy = common.build_policy(args, ctx)
    steps = common.plan_steps(common.load_records(args.dataset, "train", args.seed), tok, args, ctx)
    run = common.RunDir(args, "cft", ctx, eval_prompt={"system": None, "prefix": tagged(args.good_tag, "")})
    loop = common.Loop(args, ctx, lm, policy, steps, run)

    for micro_batches in loop:
        batches = [common.collate(tok, [s for r in mb for s in cft_sequences(tok, r, args.good_tag, args.bad_tag)],
                                  args.max_length, ctx.device) for mb in micro_batches]
        n_tokens = common.all_reduce_sum(sum(b["n_scored"] for b in batches), ctx) / ctx.world
        metrics = {"loss": 0.0}
        for b, (records, sync) in zip(batches, loop.micro(micro_batches)):
            with sync, ctx.autocast():
                logps = response_logps(policy(b["input_ids"], b["attention_mask"]), lm.output_weight(), b["labels"])
                loss, m = cft_loss(logps, n_tokens)
            loss.backward()
            metrics["loss"] += m["loss"]
        loop.step(metrics, sum(b["n_real"] for b in batches))
    loop.finish(tok)


if __name__ == "__main__":
    main()

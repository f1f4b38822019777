"""Odds Ratio Preference Optimization (ORPO), Hong et al. 2024 ("ORPO: Monolithic Preference
Optimization without Reference Model", eq. 6-7).

    L = NLL(y_w | x) - lam * mean log sigmoid( log odds(y_w|x) - log odds(y_l|x) )
    odds(y|x) = P(y|x) / (1 - P(y|x)),   log P(y|x) = (1/|y|) sum_t log pi(y_t | x, y_<t)

Reductions, said out loud: the odds use the *length-averaged* response log-probs (not the sum
as in DPO), so P is a per-token geometric-mean probability in (0, 1). log(1 - P) is computed
stably in fp32 with log1mexp (the -ln 2 branch). There is no reference model.
The NLL term is the mean over the step's chosen *response* tokens, exactly SFT's loss, so ORPO
differs from SFT only by the odds-ratio term. Hong et al.'s code also scored the prompt tokens;
--nll-on-prompt does that (the odds ratio stays response-only either way).

One of the six objectives of Vennemeyer et al. 2026 (arXiv 2601.12639).

    python orpo.py --steps 2000
    python orpo.py --max-tokens 50000 --lam 0.1
"""
import argparse
import math

import torch
import torch.nn.functional as F

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


def sequence_logps(hidden, weight, targets):
    """hidden (B, T, H), targets (B, T): the token each position predicts, IGNORE where none
    -> (summed log-probs of the targets per row (B,), fp32 or wider; number of targets per row (B,))."""
    scored = targets != IGNORE
    logps = token_logps(hidden[scored], weight, targets[scored])
    return logps.new_zeros(targets.shape[0]).index_add(0, scored.nonzero()[:, 0], logps), scored.sum(1)


# ---------------------------------------------------------------------------- the loss

def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012): two branches split at -ln 2."""
    x = x.clamp(max=-1e-7)  # an average log-prob of exactly 0 would make the odds infinite
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(nll, chosen_avg_logps, rejected_avg_logps, lam):
    """nll: scalar NLL of the chosen responses; *_avg_logps (B,) length-averaged response log-probs.
    Returns (loss, metrics). loss = nll - lam * mean(logsigmoid(log odds ratio))."""
    chosen, rejected = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds_ratio = (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))
    or_loss = -F.logsigmoid(log_odds_ratio).mean()
    loss = nll + lam * or_loss
    return loss, {
        "loss": loss.detach(), "nll": nll.detach(), "or_loss": or_loss.detach(),
        "log_odds_ratio": log_odds_ratio.detach().mean(),
        "rewards/accuracy": (log_odds_ratio > 0).float().mean(),
        "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean(),
    }


# ---------------------------------------------------------------------------- training

def nll_targets(b, on_prompt):
    """(B, T): what the NLL term scores: the chosen response, and with on_prompt also the prompt
    (position t predicting prompt token t+1). The odds ratio always uses the responses only."""
    targets = b["chosen_targets"]
    if on_prompt:
        next_is_prompt = b["segment"][:, 1:] == 0
        targets = targets.clone()
        targets[:, :-1][next_is_prompt] = b["input_ids"][:, 1:][next_is_prompt]
    return targets


def main(argv=None):
    p = common.add_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--lam", type=float, default=0.1, help="weight of the odds-ratio term (Hong et al.: lambda; TRL: beta)")
    p.add_argument("--nll-on-prompt", action="store_true", help="NLL also scores the prompt tokens of the chosen sequence")
    args = p.parse_args(argv)
    ctx = common.setup(args)
    tok, lm, policy = common.build_policy(args, ctx)
    steps = common.plan_steps(common.load_records(args.dataset, "train", args.seed), tok, args, ctx)
    run = common.RunDir(args, "orpo", ctx)
    loop = common.Loop(args, ctx, lm, policy, steps, run)

    for micro_batches in loop:
        k = len(micro_batches)
        batches = [common.pair_batch(tok, mb, args.max_length, ctx.device) for mb in micro_batches]
        targets = [nll_targets(b, args.nll_on_prompt) for b in batches]
        n_tokens = common.all_reduce_sum(sum((t != IGNORE).sum().item() for t in targets), ctx) / ctx.world
        metrics, fed = {}, 0
        for b, nll_t, (_, sync) in zip(batches, targets, loop.micro(micro_batches)):
            with sync, ctx.autocast():
                hidden = policy(b["input_ids"], b["attention_mask"], b["position_ids"])
                w = lm.output_weight()
                chosen, n_chosen = sequence_logps(hidden, w, b["chosen_targets"])
                rejected, n_rejected = sequence_logps(hidden, w, b["rejected_targets"])
                nll_sum = sequence_logps(hidden, w, nll_t)[0].sum() if args.nll_on_prompt else chosen.sum()
                # nll * k is this micro-batch's NLL over the step's mean tokens per micro-batch, so that
                # loss / k sums over micro-batches to: step-mean NLL + lam * step-mean odds-ratio loss
                nll = -nll_sum / n_tokens * k
                loss, m = orpo_loss(nll, chosen / n_chosen, rejected / n_rejected, args.lam)
            (loss / k).backward()
            for key, v in m.items():
                metrics[key] = metrics.get(key, 0.0) + v / k
            fed += b["n_real"]
        loop.step(metrics, fed)
    loop.finish(tok)


if __name__ == "__main__":
    main()

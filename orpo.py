"""Odds Ratio Preference Optimization (ORPO), Hong et al. 2024 ("ORPO: Monolithic Preference
Optimization without Reference Model", eq. 6-7).

    L = NLL(y_w | x) - lam * mean log sigmoid( log odds(y_w|x) - log odds(y_l|x) )
    odds(y|x) = P(y|x) / (1 - P(y|x)),   log P(y|x) = (1/|y|) sum_t log pi(y_t | x, y_<t)

Reductions, said out loud: the odds use the *length-averaged* response log-probs (not the sum
as in DPO), so P is a per-token geometric-mean probability in (0, 1); log(1 - P) is computed
stably in fp32 with log1mexp (the -ln 2 branch). There is no reference model. The NLL term is
the mean over the step's chosen *response* tokens, exactly SFT's loss, so ORPO differs from SFT
only by the odds-ratio term; Hong et al.'s code also scored the prompt (--nll-on-prompt).

One of the six objectives of Vennemeyer et al. 2026 (arXiv 2601.12639).

    python orpo.py --steps 2000
    python orpo.py --max-tokens 50000 --lam 0.1
"""
import collections
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import common
import tasks
from common import IGNORE


# ---------------------------------------------------------------------------- the loss

def orpo_loss(nll, chosen_avg_logps, rejected_avg_logps, lam, n_pairs):
    """nll: this micro-batch's share of the step's NLL; *_avg_logps (B,): length-averaged response
    log-probs; n_pairs: pairs in the step. Returns (loss, metrics); summed over micro-batches,
    loss = step NLL - lam * (step mean of logsigmoid(log odds ratio))."""
    chosen, rejected = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds_ratio = (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))
    or_loss = -F.logsigmoid(log_odds_ratio).sum() / n_pairs
    loss = nll + lam * or_loss
    mean = lambda x: x.detach().float().sum() / n_pairs
    return loss, {
        "loss": loss.detach(), "nll": nll.detach(), "or_loss": or_loss.detach(),
        "log_odds_ratio": mean(log_odds_ratio), "rewards/accuracy": mean(log_odds_ratio > 0),
        "logps/chosen": mean(chosen), "logps/rejected": mean(rejected),
    }


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012): two branches split at -ln 2."""
    x = x.clamp(max=-1e-7)  # an average log-prob of exactly 0 would make the odds infinite
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


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
    p = common.parser(__doc__)
    p.add_argument("--lam", type=common.nonneg_float, default=0.1,
                   help="weight of the odds-ratio term (Hong et al.: lambda; TRL: beta)")
    p.add_argument("--nll-on-prompt", action="store_true",
                   help="NLL also scores the prompt tokens of the chosen sequence")
    tasks.add_args(p)  # --dataset and the knobs of the embedded tasks
    args = p.parse_args(argv)
    ctx = common.setup(args)
    tok, lm, policy = common.build_policy(args, ctx)
    steps = common.plan_steps(tasks.load(args.dataset, "train", args), tok, args, ctx)
    run = common.RunDir(args, Path(__file__).stem, ctx)
    opt, sched = common.make_optimizer(args, lm, len(steps))
    loop = common.Loop(args, ctx, lm, steps, run)

    for micro_batches in loop:
        batches = [common.pair_batch(tok, mb, args.max_length, ctx.device) for mb in micro_batches]
        targets = [nll_targets(b, args.nll_on_prompt) for b in batches]
        # the NLL is normalized by the step's scored tokens over all processes, as in sft.py
        n_tokens = common.all_reduce_sum(sum((t != IGNORE).sum().item() for t in targets), ctx) / ctx.world
        n_pairs = sum(len(mb) for mb in micro_batches)
        metrics = {}
        for b, nll_t, sync in zip(batches, targets, common.grad_sync(policy, len(batches))):
            with sync, ctx.autocast():
                hidden = policy(b["input_ids"], b["attention_mask"], b["position_ids"])
                w = lm.output_weight()
                chosen = response_logps(hidden, w, b["chosen_targets"])
                rejected = response_logps(hidden, w, b["rejected_targets"])
                scored = response_logps(hidden, w, nll_t) if args.nll_on_prompt else chosen  # NLL's tokens
                nll = -scored.sums.sum() / n_tokens
                chosen_avg, rejected_avg = chosen.sums / chosen.counts, rejected.sums / rejected.counts
                loss, m = orpo_loss(nll, chosen_avg, rejected_avg, args.lam, n_pairs)
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

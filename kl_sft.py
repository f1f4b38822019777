"""KL-regularized SFT: SFT plus an exact token-level KL penalty to the frozen starting model.

    L = (1/N) sum_{i,t in response} [ -log pi(y_t | x, y_<t)  +  beta * KL_t ]
    KL_t = KL( pi(. | x, y_<t) || pi_ref(. | x, y_<t) ) = sum_v pi(v) (log pi(v) - log pi_ref(v))

The KL is exact over the whole vocabulary at every response position (no sampling estimate),
computed a chunk of positions at a time so memory stays bounded by chunk x vocabulary.
Default direction KL(pi || pi_ref) (reverse, mode-seeking: penalizes putting mass where the
reference has none, the direction of the RLHF penalty); --kl-direction forward gives
KL(pi_ref || pi) (mass-covering: penalizes dropping what the reference would say).
pi_ref is the same weights with the LoRA adapter disabled, or a frozen copy (full FT).
N counts the step's response tokens, as in sft.py. KL is 0 at step 0 (policy == reference).

One of the six objectives of Vennemeyer et al. 2026 (arXiv 2601.12639).

    python kl_sft.py --steps 2000
    python kl_sft.py --max-tokens 50000 --beta 0.5 --kl-direction forward
"""
from pathlib import Path

import torch

import common
import tasks
from common import IGNORE


# ---------------------------------------------------------------------------- the loss

def kl_sft_loss(logps, kl, n_tokens, beta):
    """logps, kl (N,) per response token of this micro-batch; n_tokens: response tokens in the step.
    Returns (loss, metrics); summed over micro-batches, loss is the step mean of NLL + beta * KL."""
    nll = -logps.sum() / n_tokens
    kl_term = kl.sum() / n_tokens
    loss = nll + beta * kl_term
    return loss, {"loss": loss.detach(), "nll": nll.detach(), "kl": kl_term.detach()}


# ---------------------------------------------------------------------------- log-probs and KL
# The other objective files share a gather (token_logps); here the whole distribution is needed for the
# KL anyway, so one log-softmax per chunk gives both (tests/test_logps.py checks it equals the gather).

def token_logps_and_kl(hidden, weight, ref_hidden, ref_weight, labels, direction="reverse", chunk=1024):
    """Scored positions only. hidden/ref_hidden (N, H), weights (V, H), labels (N,) ->
    (log pi(label) (N,), KL per position (N,)), both fp32, one policy matmul per chunk."""
    logps, kls = [], []
    for h, hr, y in zip(hidden.split(chunk), ref_hidden.split(chunk), labels.split(chunk)):
        logp = torch.log_softmax((h @ weight.T).float(), -1)
        logq = torch.log_softmax((hr @ ref_weight.T).float(), -1)
        logps.append(logp.gather(-1, y[:, None]).squeeze(-1))
        if direction == "reverse":
            kls.append((logp.exp() * (logp - logq)).sum(-1))
        else:
            kls.append((logq.exp() * (logq - logp)).sum(-1))
    return torch.cat(logps), torch.cat(kls)


# ---------------------------------------------------------------------------- training

def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--beta", type=common.positive_float, default=0.5,
                   help="weight of the per-token KL penalty (also called kl_coef)")
    p.add_argument("--kl-direction", default="reverse", choices=["reverse", "forward"],
                   help="reverse = KL(pi || pi_ref) (default), forward = KL(pi_ref || pi)")
    tasks.add_args(p)  # --dataset and the knobs of the embedded tasks
    args = p.parse_args(argv)
    ctx = common.setup(args)
    tok, lm, policy = common.build_policy(args, ctx, need_reference=True)
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
            scored = b["targets"] != IGNORE
            with torch.no_grad(), lm.reference(), ctx.autocast():
                ref_hidden = lm(b["input_ids"], b["attention_mask"])[scored]
                ref_weight = lm.output_weight()
            with sync, ctx.autocast():
                hidden = policy(b["input_ids"], b["attention_mask"])[scored]
                logps, kl = token_logps_and_kl(hidden, lm.output_weight(), ref_hidden, ref_weight,
                                               b["targets"][scored], args.kl_direction)
                loss, m = kl_sft_loss(logps, kl, n_tokens, args.beta)
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

"""Direct Preference Optimization (DPO), Rafailov et al. 2023, eq. 7.

    L = -E log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

log pi(y|x) is the *sum* of the response tokens' log-probs (prompt tokens not scored; the
closing end-of-turn token is). pi_ref is the frozen starting model: the same weights with the
LoRA adapter disabled (no second copy), or a frozen copy for full fine-tuning; it runs under
no_grad. Chosen and rejected share one forward in which each prompt runs once
(common.collate_pairs: prompt | chosen | rejected, the rejected tokens masked from the chosen).
Implicit rewards: r = beta * (log pi - log pi_ref). At step 0 policy == reference, so the loss
is ln 2 and both rewards are 0. The mean is over the pairs of the optimizer step.

One of the six objectives of Vennemeyer et al. 2026 (arXiv 2601.12639); records give
chosen = correct solution, rejected = plausible flawed solution.

    python dpo.py --steps 2000
    python dpo.py --max-tokens 50000 --beta 0.1 --precompute-ref
"""
import argparse

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
    -> summed log-probs of the targets per row (B,), fp32 or wider."""
    scored = targets != IGNORE
    logps = token_logps(hidden[scored], weight, targets[scored])
    return logps.new_zeros(targets.shape[0]).index_add(0, scored.nonzero()[:, 0], logps)


# ---------------------------------------------------------------------------- the loss

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """All inputs (B,) summed response log-probs. Returns (mean loss, metrics with detached rewards)."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, {
        "loss": loss.detach(),
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).detach().mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }


# ---------------------------------------------------------------------------- training

def pair_logps(lm, model, b, ctx):
    """-> (log pi(chosen|x), log pi(rejected|x)), each (B,), from one forward."""
    with ctx.autocast():
        hidden = model(b["input_ids"], b["attention_mask"], b["position_ids"])
        w = lm.output_weight()
        return sequence_logps(hidden, w, b["chosen_targets"]), sequence_logps(hidden, w, b["rejected_targets"])


@torch.no_grad()
def reference_logps(lm, b, ctx):
    with lm.reference():
        return pair_logps(lm, lm, b, ctx)


def main(argv=None):
    p = common.add_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), lr=5e-5)
    p.add_argument("--beta", type=float, default=0.1, help="DPO temperature beta (TRL: beta); larger = stay closer to the reference")
    p.add_argument("--precompute-ref", action="store_true", help="compute all reference log-probs once before training (one extra pass, then no reference forward per step)")
    args = p.parse_args(argv)
    ctx = common.setup(args)
    tok, lm, policy = common.build_policy(args, ctx, need_reference=True)
    steps = common.plan_steps(common.load_records(args.dataset, "train", args.seed), tok, args, ctx)
    run = common.RunDir(args, "dpo", ctx)
    loop = common.Loop(args, ctx, lm, policy, steps, run)
    ref_cache = {}
    if args.precompute_ref:  # the reference is fixed, so its log-probs can be computed once
        for s, (micro_batches, _) in enumerate(steps):
            for i, mb in enumerate(micro_batches):
                ref_cache[s, i] = reference_logps(lm, common.pair_batch(tok, mb, args.max_length, ctx.device), ctx)

    for micro_batches in loop:
        metrics, fed = {}, 0
        for i, (records, sync) in enumerate(loop.micro(micro_batches)):
            b = common.pair_batch(tok, records, args.max_length, ctx.device)
            ref = ref_cache.pop((loop.step_no - 1, i), None) or reference_logps(lm, b, ctx)
            with sync:
                loss, m = dpo_loss(*pair_logps(lm, policy, b, ctx), *ref, args.beta)
                # equal-size micro-batches: the mean of their means is the step mean
                (loss / len(micro_batches)).backward()
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v / len(micro_batches)
            fed += b["n_real"]
        loop.step(metrics, fed)
    loop.finish(tok)


if __name__ == "__main__":
    main()

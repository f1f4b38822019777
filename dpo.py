"""Direct Preference Optimization (DPO), Rafailov et al. 2023, eq. 7.

    L = -E log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

log pi(y|x) is the *sum* of the response tokens' log-probs (prompt tokens not scored; the
closing end-of-turn token is). pi_ref is the frozen starting model: the same weights with the
LoRA adapter disabled (no second copy), or a frozen copy for full fine-tuning; it runs under
no_grad. Chosen and rejected share one forward in which each prompt runs once
(common.pair_batch: prompt | chosen | rejected, the rejected tokens masked from the chosen).
Implicit rewards: r = beta * (log pi - log pi_ref). At step 0 policy == reference, so the loss
is ln 2 and both rewards are 0. The mean is over the pairs of the optimizer step.

One of the six objectives of Vennemeyer et al. 2026 (arXiv 2601.12639).

    python dpo.py --steps 2000
    python dpo.py --max-tokens 50000 --beta 0.1 --precompute-ref
"""
import collections
from pathlib import Path

import torch
import torch.nn.functional as F

import common
import tasks
from common import IGNORE


# ---------------------------------------------------------------------------- the loss

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, n_pairs):
    """All inputs (B,): summed response log-probs of this micro-batch's pairs; n_pairs: pairs in the
    optimizer step. Returns (loss, metrics); summed over micro-batches, both are means over the step's
    pairs."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).sum() / n_pairs
    mean = lambda x: x.detach().float().sum() / n_pairs
    return loss, {
        "loss": loss.detach(),
        "rewards/chosen": mean(chosen_rewards), "rewards/rejected": mean(rejected_rewards),
        "rewards/accuracy": mean(chosen_rewards > rejected_rewards),
        "rewards/margin": mean(chosen_rewards - rejected_rewards),
        "logps/chosen": mean(policy_chosen_logps), "logps/rejected": mean(policy_rejected_logps),
    }


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

def pair_logps(lm, model, b, ctx):
    """-> (log pi(chosen|x), log pi(rejected|x)), each (B,) summed over the response, from one forward."""
    with ctx.autocast():
        hidden = model(b["input_ids"], b["attention_mask"], b["position_ids"])
        w = lm.output_weight()
        chosen = response_logps(hidden, w, b["chosen_targets"])
        rejected = response_logps(hidden, w, b["rejected_targets"])
        return chosen.sums, rejected.sums


@torch.no_grad()
def reference_logps(lm, b, ctx):
    with lm.reference():
        return pair_logps(lm, lm, b, ctx)


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--beta", type=common.positive_float, default=0.1,
                   help="DPO temperature beta (TRL: beta); larger = stay closer to the reference")
    p.add_argument("--precompute-ref", action="store_true",
                   help="compute all reference log-probs once before training (one extra pass, then no "
                   "reference forward per step)")
    tasks.add_args(p)  # --dataset and the knobs of the embedded tasks
    args = p.parse_args(argv)
    ctx = common.setup(args)
    tok, lm, policy = common.build_policy(args, ctx, need_reference=True)
    steps = common.plan_steps(tasks.load(args.dataset, "train", args), tok, args, ctx)
    run = common.RunDir(args, Path(__file__).stem, ctx)
    opt, sched = common.make_optimizer(args, lm, len(steps))
    loop = common.Loop(args, ctx, lm, steps, run)
    ref_cache = {}
    if args.precompute_ref:  # the reference is fixed, so its log-probs can be computed once
        for s, (micro_batches, _) in enumerate(steps):
            for i, mb in enumerate(micro_batches):
                b = common.pair_batch(tok, mb, args.max_length, ctx.device)
                ref_cache[s, i] = reference_logps(lm, b, ctx)

    for s, micro_batches in enumerate(loop):
        batches = [common.pair_batch(tok, mb, args.max_length, ctx.device) for mb in micro_batches]
        n_pairs = sum(len(mb) for mb in micro_batches)  # this process's pairs (DDP then averages them)
        metrics = {}
        for i, (b, sync) in enumerate(zip(batches, common.grad_sync(policy, len(batches)))):
            ref = ref_cache.pop((s, i), None) or reference_logps(lm, b, ctx)
            with sync:
                loss, m = dpo_loss(*pair_logps(lm, policy, b, ctx), *ref, args.beta, n_pairs)
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

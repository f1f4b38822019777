"""The plan every objective shares: records per step, the token budget, ranks, snapshots, the schedule."""
import types

import pytest
import torch

import common
import tasks


def _args(**kw):
    base = dict(batch_size=2, grad_accum=2, seed=0, max_length=256, steps=1000, max_tokens=None,
                decay_steps=0, save_every=0, save_at_tokens=None)
    return types.SimpleNamespace(**{**base, **kw})


CTX = common.Ctx(torch.device("cpu"), torch.float32)
ARGS = types.SimpleNamespace(seed=0)  # what the arithmetic builder reads


def test_plan_steps_budget_is_records_and_identical(tok):
    records = tasks.load("arithmetic", "train", ARGS)[:200]
    plan = common.plan_steps(records, tok, _args(max_tokens=3000), CTX)
    tokens = sum(cost for _, cost in plan)
    assert tokens <= 3000
    assert all(len(micro) == 2 and all(len(mb) == 2 for mb in micro) for micro, _ in plan)
    again = common.plan_steps(records, tok, _args(max_tokens=3000), CTX)
    assert ([[r["prompt"] for mb in m for r in mb] for m, _ in plan]
            == [[r["prompt"] for mb in m for r in mb] for m, _ in again])
    # the cost of a record is len(prompt + chosen) under the plain template
    r = plan[0][0][0][0]
    p, c = common.encode(tok, r["prompt"], r["chosen"])
    assert r["n_tokens"] == len(p) + len(c)
    assert len(common.plan_steps(records, tok, _args(steps=7), CTX)) == 7


def test_plan_steps_errors_and_skips(tok, capsys):
    records = tasks.load("arithmetic", "train", ARGS)[:50]
    with pytest.raises(common.UserError, match="smaller than one optimizer step"):
        common.plan_steps(records, tok, _args(max_tokens=100), CTX)
    long = [dict(records[0], prompt="word " * 400)] + records
    plan = common.plan_steps(long, tok, _args(steps=3), CTX)
    assert "skipped 1 of 51" in capsys.readouterr().out
    assert all(r["prompt"] != long[0]["prompt"] for m, _ in plan for mb in m for r in mb)
    with pytest.raises(common.UserError, match="fewer than one step"):
        common.plan_steps(records[:3], tok, _args(), CTX)
    with pytest.raises(common.UserError, match="--decay-steps 4 must be between 0 and the run's 3 steps"):
        common.plan_steps(records, tok, _args(steps=3, decay_steps=4), CTX)


def test_lr_schedule_warmup_constant_decay():
    """By hand: 10 steps, warm-up 2, decay over the last 4: 1/2, 1, ..., 1, then 4/4, 3/4, 2/4, 1/4."""
    got = [common.lr_factor(s, 10, 2, 4) for s in range(10)]
    assert got == [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert [common.lr_factor(s, 5, 1, 0) for s in range(5)] == [1] * 5


def test_plan_steps_shards_by_rank(tok):
    records = tasks.load("arithmetic", "train", ARGS)[:100]
    single = common.plan_steps(records, tok, _args(batch_size=2, grad_accum=2, steps=3), CTX)
    ranks = [common.plan_steps(records, tok, _args(batch_size=2, grad_accum=1, steps=3),
                               common.Ctx(torch.device("cpu"), torch.float32, rank=r, world=2))
             for r in (0, 1)]
    for s in range(3):
        assert single[s][0] == ranks[0][s][0] + ranks[1][s][0]  # same records, split across processes
        assert single[s][1] == ranks[0][s][1]  # budget counted globally


def test_a_shorter_budget_is_a_prefix_of_a_longer_one(tok):
    """Nested budgets rest on this: the run with --max-tokens B takes exactly the first steps of the
    run with a larger budget, so a snapshot of the long run at B is the short run."""
    records = tasks.load("arithmetic", "train", ARGS)[:300]
    long = common.plan_steps(records, tok, _args(max_tokens=20000), CTX)
    for budget in (2500, 7000, 13333):
        short = common.plan_steps(records, tok, _args(max_tokens=budget), CTX)
        assert short == long[:len(short)]
        assert sum(c for _, c in short) <= budget < sum(c for _, c in long[:len(short) + 1])


def test_snapshot_steps_by_budget_and_by_step(tok):
    records = tasks.load("arithmetic", "train", ARGS)[:300]
    plan = common.plan_steps(records, tok, _args(max_tokens=20000), CTX)
    cumulative = [sum(c for _, c in plan[:i + 1]) for i in range(len(plan))]
    snaps = common.snapshot_steps(plan, _args(max_tokens=20000, save_at_tokens=[5000, 10000, 20000]))
    # 20000: the run
    expect = {sum(t <= b for t in cumulative): (f"tokens-{b}", {"max_tokens": b}) for b in (5000, 10000)}
    assert snaps == expect
    assert common.snapshot_steps(plan, _args(max_tokens=20000, save_every=10)) == {
        s: (f"step-{s:05d}", {"steps": s}) for s in range(10, len(plan), 10)}
    with pytest.raises(common.UserError, match="smaller than one optimizer step"):
        common.snapshot_steps(plan, _args(max_tokens=20000, save_at_tokens=[10]))
    with pytest.raises(common.UserError, match="not inside this run"):
        common.snapshot_steps(plan, _args(max_tokens=20000, save_at_tokens=[50000]))
    # checked when planning, before a run dir exists
    with pytest.raises(common.UserError, match="not inside this run"):
        common.plan_steps(records, tok, _args(steps=3, save_at_tokens=[50000]), CTX)


def test_snapshots_that_would_equal_no_run_are_refused(tok):
    records = tasks.load("arithmetic", "train", ARGS)[:300]
    plan = common.plan_steps(records, tok, _args(max_tokens=20000), CTX)
    cumulative = [sum(c for _, c in plan[:i + 1]) for i in range(len(plan))]
    late = cumulative[-3]  # ends two steps before the run does: inside a 5-step decay tail
    with pytest.raises(common.UserError, match="inside the --decay-steps 5 tail"):
        common.snapshot_steps(plan, _args(max_tokens=20000, decay_steps=5, save_at_tokens=[late]))
    early = common.snapshot_steps(plan, _args(max_tokens=20000, decay_steps=5,
                                              save_at_tokens=[cumulative[3]]))
    assert early == {4: (f"tokens-{cumulative[3]}", {"max_tokens": cumulative[3]})}
    with pytest.raises(common.UserError, match="drop one of them"):  # two budgets ending on the same step
        common.snapshot_steps(plan, _args(max_tokens=20000,
                                          save_at_tokens=[cumulative[3], cumulative[3] + 1]))

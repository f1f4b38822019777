"""Statistics by hand: distributions, the paired rate and score comparisons, and that every interval
agrees with its test (rejects exactly when the interval leaves out zero)."""
import math
import random

import pytest

from evaluation import stats


def test_wilson_and_mean_ci():
    lo, hi = stats.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    m, (a, b) = stats.mean_ci([0.0, 1.0, 0.0, 1.0])
    assert m == 0.5 and b - m == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)


def test_distributions_by_known_values():
    # I_x(a, b) for whole a, b is a binomial tail: I_0.4(2, 3) = P(Bin(4, 0.4) >= 2)
    assert stats.beta_regularized(2, 3, 0.4) == pytest.approx(sum(math.comb(4, j) * 0.4 ** j * 0.6 ** (4 - j)
                                                                 for j in range(2, 5)), abs=1e-12)
    assert stats.t_two_sided(1.0, 1) == pytest.approx(0.5, abs=1e-12)      # Cauchy: P(|T| >= 1) = 1/2
    assert stats.t_two_sided(2.0, 10) == pytest.approx(0.0733880, abs=1e-6)  # printed t tables
    assert stats.t_quantile(0.05, 10) == pytest.approx(2.228139, abs=1e-6)
    assert stats.t_quantile(0.05, 1e7) == pytest.approx(1.959964, abs=1e-5)  # the normal limit
    assert stats.normal_two_sided(1.959964) == pytest.approx(0.05, abs=1e-6)


def test_paired_rates_by_hand():
    """McNemar's score test is (b - c) / sqrt(b + c); Tango's interval solves the same statistic = +-1.96;
    with no discordant item it is +-z^2 / (n + z^2), not a zero-width interval."""
    start = [0] * 10 + [1] * 10 + [0] * 20
    run = [1] * 10 + [1] * 10 + [0] * 20                                   # 10 flipped to success, none back
    r = stats.paired_rates(run, start)
    assert (r["only_run"], r["only_start"], r["n"], r["diff"]) == (10, 0, 40, 0.25)
    assert r["p"] == pytest.approx(math.erfc(10 / math.sqrt(10) / math.sqrt(2))) and r["significant"]
    lo, hi = r["ci95"]
    assert stats.tango_statistic(10, 0, 40, lo) == pytest.approx(1.96, abs=1e-6)
    assert stats.tango_statistic(10, 0, 40, hi) == pytest.approx(-1.96, abs=1e-6)
    assert 0 < lo < 0.25 < hi < 1
    assert stats.tango_statistic(7, 3, 50, 0.0) == pytest.approx(4 / math.sqrt(10))   # McNemar at 0
    none = stats.paired_rates([1] * 5 + [0] * 55, [1] * 5 + [0] * 55)
    z2 = 1.96 ** 2
    assert none["p"] == 1 and none["ci95"] == pytest.approx([-z2 / (60 + z2), z2 / (60 + z2)], abs=1e-9)
    flipped = stats.paired_rates(start, run)
    assert flipped["ci95"] == pytest.approx([-hi, -lo], abs=1e-9) and flipped["p"] == pytest.approx(r["p"])


def test_paired_means_by_hand():
    diffs = [0.4, 0.3, 0.8, 0.0, 0.1, -0.1]
    s = stats.paired_means([d + 1 for d in diffs], [1.0] * 6)
    mean = sum(diffs) / 6
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 5 / 6)
    assert s["diff"] == pytest.approx(0.25) and s["p"] == pytest.approx(stats.t_two_sided(0.25 / se, 5))
    half = stats.t_quantile(0.05, 5) * se
    assert s["ci95"] == pytest.approx([0.25 - half, 0.25 + half])
    assert stats.paired_means([1.0, 2.0], [1.0, 2.0]) == {"diff": 0.0, "ci95": [0.0, 0.0], "p": 1.0, "n": 2,
                                                           "significant": False}


def test_gap_change_by_hand():
    """Unpaired: Welch's t. Trait items +1, +0.5; anti items 0, -0.5: drift 1.0, se sqrt(0.125), and
    Welch-Satterthwaite gives 2 degrees of freedom."""
    keyed = ["trait", "trait", "anti", "anti"]
    g = stats.gap_change([-2.0, -2.5, -2.0, -2.5], [-3.0, -3.0, -2.0, -2.0], keyed)
    se = math.sqrt(0.125)
    assert g["diff"] == pytest.approx(1.0) and g["p"] == pytest.approx(stats.t_two_sided(1.0 / se, 2))
    half = stats.t_quantile(0.05, 2) * se
    assert g["ci95"] == pytest.approx([1 - half, 1 + half])
    assert g["significant"] is False  # t = 2.83 on 2 degrees of freedom


def test_gap_change_with_matched_pairs_by_hand():
    """Paired statements: the mean over pairs of (trait change - anti change), unpaired items left out,
    the paired t on the per-pair differences."""
    run = [1.0, 0.5, 2.0, 1.3, 9.0]  # pair a: +1.0 vs +0.5; pair b: +2.0 vs +1.3; an unpaired trait item
    keyed, pairs = ["trait", "anti", "trait", "anti", "trait"], ["a", "a", "b", "b", None]
    g = stats.gap_change(run, [0.0] * 5, keyed, pairs)
    half = stats.t_quantile(0.05, 1) * math.sqrt((0.1 ** 2 + 0.1 ** 2) / 1) / math.sqrt(2)
    assert g["pairs"] == 2 and g["diff"] == pytest.approx(0.6)
    assert g["ci95"] == pytest.approx([0.6 - half, 0.6 + half])
    assert stats.gap_change(run[:2], [0.0] * 2, ["trait", "anti"], ["a", "a"]) is None  # one pair: none


def test_holm_by_hand():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5]) == [0.5] and stats.holm([]) == []


def test_every_interval_agrees_with_its_test():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randrange(5, 80)
        run, start = [rng.random() < 0.4 for _ in range(n)], [rng.random() < rng.random() for _ in range(n)]
        r = stats.paired_rates(run, start)
        assert r["significant"] == (not r["ci95"][0] <= 0 <= r["ci95"][1]), r
        xs, ys = [rng.gauss(0.2, 1) for _ in range(n)], [rng.gauss(0, 1) for _ in range(n)]
        m = stats.paired_means(xs, ys)
        assert m["significant"] == (not m["ci95"][0] <= 0 <= m["ci95"][1])
    for shift in (-0.3, -0.05, 0.0, 0.04, 0.2):
        data = [rng.gauss(shift, 1) for _ in range(40)]
        b = stats.bootstrap(lambda seeds, items: sum(data[i] for i in items) / len(items), 1, 40, draws=1000)
        assert b["significant"] == (not b["ci95"][0] <= 0 <= b["ci95"][1]) == (b["p"] < 0.05)


def test_bootstrap_resamples_seeds_and_items():
    """Two seeds x three items; a statistic that reads both index lists. With one seed value constant
    the interval is a point; the draws are reproducible."""
    table = [[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]  # seed x item
    mean = lambda seeds, items: sum(table[s][i] for s in seeds for i in items) / (len(seeds) * len(items))
    b = stats.bootstrap(mean, 2, 3, draws=500, seed=1)
    assert b["diff"] == pytest.approx(3.0) and 1.0 <= b["ci95"][0] < 3.0 < b["ci95"][1] <= 5.0
    assert b == stats.bootstrap(mean, 2, 3, draws=500, seed=1) and b["p"] == 0.0
    flat = stats.bootstrap(lambda seeds, items: 0.5, 3, 4, draws=100)
    assert flat["ci95"] == [0.5, 0.5] and flat["p"] == 0.0 and flat["significant"]

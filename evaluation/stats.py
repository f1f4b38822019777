"""Intervals and paired tests: every change is measured against the start on the same items, and every
interval agrees with its test (the test rejects exactly when the interval leaves out zero).

    rates (0/1 per item)       McNemar's score test and Tango's score interval: the interval is every
                               difference the same score statistic does not reject, so both always agree
                               (Tango 1998; Fagerland, Lydersen & Laake 2013 recommend this pair over the
                               exact conditional test, which is conservative)
    scores (real per item)     the paired t-test and its t interval
    many comparisons           Holm's step-down adjustment, reported beside the raw p
    seeds and items            a bootstrap over both (percentile interval, and the p-value of the same
                               bootstrap distribution, so the two agree by construction)
"""
import math
import random


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def mean_ci(xs, z=1.96):
    """Mean with a normal-approximation 95% interval (a description of one set, not a comparison)."""
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, [m - z * sd / math.sqrt(n), m + z * sd / math.sqrt(n)]


def rate(flags):
    k, n = sum(flags), len(flags)
    return {"rate": k / n if n else 0.0, "ci95": wilson(k, n), "n": n}


# ---------------------------------------------------------------------------- distributions

def normal_two_sided(z):
    """P(|Z| >= |z|) for a standard normal Z."""
    return math.erfc(abs(z) / math.sqrt(2))


def beta_regularized(a, b, x):
    """I_x(a, b), the regularized incomplete beta function: its continued fraction, evaluated with
    Lentz's method, on the side of x where it converges fast."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - beta_regularized(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    numerator, denominator, fraction = 1.0, 0.0, 1.0  # Lentz's C and D, and the value so far
    for i in range(1, 500):
        m = i // 2
        if i % 2:   # d_(2m+1)
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:       # d_(2m)
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        denominator = 1.0 + term * denominator
        denominator = 1.0 / (denominator if abs(denominator) > tiny else tiny)
        numerator = 1.0 + term / (numerator if abs(numerator) > tiny else tiny)
        fraction *= numerator * denominator
        if abs(numerator * denominator - 1.0) < 1e-14:
            break
    # `fraction` is 1 + d1 / (1 + d2 / (1 + ...)); I_x(a, b) = x^a (1 - x)^b / (a B(a, b) fraction)
    return math.exp(log_front) / (a * fraction)


def t_two_sided(t, df):
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return beta_regularized(df / 2, 0.5, df / (df + t * t))


def t_quantile(p, df):
    """The t with P(|T| >= t) = p (bisection: the tail falls as t grows)."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided(mid, df) > p else (lo, mid)
    return (lo + hi) / 2


# ---------------------------------------------------------------------------- paired comparisons

def tango_statistic(b, c, n, delta):
    """Tango's score statistic for 'run rate - start rate = delta' from n pairs, b of which succeed only
    in the run and c only at the start. At delta = 0 it is McNemar's (b - c) / sqrt(b + c). Falls as
    delta grows."""
    A, B, C = 2 * n, -b - c + (2 * n - b + c) * delta, -c * delta * (1 - delta)
    q = (math.sqrt(max(0.0, B * B - 4 * A * C)) - B) / (2 * A)  # constrained ML of P(start only)
    variance = n * (2 * q + delta * (1 - delta))
    if variance <= 0:
        return 0.0 if b - c - n * delta == 0 else math.copysign(math.inf, b - c - n * delta)
    return (b - c - n * delta) / math.sqrt(variance)


def paired_rates(run, start, z=1.96):
    """Same items, 0/1 outcomes. -> run rate - start rate, Tango's 95% score interval, and McNemar's
    score test (two-sided, normal): the interval holds every difference the statistic does not reject
    at z, so it leaves out 0 exactly when p < 0.05. It is not degenerate when nothing changed."""
    n = len(run)
    b = sum(bool(r) and not s for r, s in zip(run, start))      # only the run
    c = sum(bool(s) and not r for r, s in zip(run, start))      # only the start
    diff = (b - c) / n

    def solve(target, lo, hi):  # tango_statistic(delta) = target, the statistic falling in delta
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if tango_statistic(b, c, n, mid) > target else (lo, mid)
        return (lo + hi) / 2
    lower = -1.0 if diff == -1 else solve(z, -1.0, diff)
    upper = 1.0 if diff == 1 else solve(-z, diff, 1.0)
    p = 1.0 if b + c == 0 else normal_two_sided((b - c) / math.sqrt(b + c))
    return {"diff": diff, "ci95": [lower, upper], "p": p, "only_run": b, "only_start": c, "n": n,
            "significant": p < 0.05}


def paired_means(run, start):
    """Same items, real-valued scores. -> mean difference, its paired-t 95% interval and p-value."""
    return one_sample([r - s for r, s in zip(run, start)])


def one_sample(diffs):
    """Mean of per-item differences with the t interval and two-sided t-test of 'mean = 0'."""
    n = len(diffs)
    d = sum(diffs) / n
    se = math.sqrt(sum((x - d) ** 2 for x in diffs) / (n - 1) / n) if n > 1 else 0.0
    if se == 0:  # no spread: nothing to estimate an interval from
        p = 1.0 if d == 0 else 0.0
        return {"diff": d, "ci95": [d, d], "p": p, "n": n, "significant": p < 0.05}
    half = t_quantile(0.05, n - 1) * se
    p = t_two_sided(d / se, n - 1)
    return {"diff": d, "ci95": [d - half, d + half], "p": p, "n": n, "significant": p < 0.05}


def gap_change(run, start, keyed, pairs=None):
    """Persona drift: per item the change run - start; drift = mean change on trait-keyed items minus
    mean change on anti-trait items. Where statements come in matched pairs (`pairs`: the same id for
    a trait statement and its opposite), only the pairs count, and the test and interval are the paired
    t on the per-pair differences: the shift both members share cancels in each pair. Otherwise the two
    groups are independent (Welch's t)."""
    if pairs and any(pairs):
        by_pair = {}
        for r, s, key, pair in zip(run, start, keyed, pairs):
            if pair:
                by_pair.setdefault(pair, {})[key] = r - s
        diffs = [v["trait"] - v["anti"] for v in by_pair.values() if len(v) == 2]
        return dict(one_sample(diffs), pairs=len(diffs)) if len(diffs) >= 2 else None
    groups = [[r - s for r, s, key in zip(run, start, keyed) if key == k] for k in ("trait", "anti")]
    if min(map(len, groups)) < 2:  # no variance to estimate: no interval, nothing significant
        return None
    means = [sum(g) / len(g) for g in groups]
    var = [sum((x - m) ** 2 for x in g) / (len(g) - 1) / len(g) for g, m in zip(groups, means)]
    d, se = means[0] - means[1], math.sqrt(sum(var))
    if se == 0:
        return {"diff": d, "ci95": [d, d], "p": float(d == 0), "significant": d != 0,
                "n_trait": len(groups[0]), "n_anti": len(groups[1])}
    df = sum(var) ** 2 / sum(v * v / (len(g) - 1) for v, g in zip(var, groups))  # Welch-Satterthwaite
    half, p = t_quantile(0.05, df) * se, t_two_sided(d / se, df)
    return {"diff": d, "ci95": [d - half, d + half], "p": p, "significant": p < 0.05,
            "n_trait": len(groups[0]), "n_anti": len(groups[1])}


# ---------------------------------------------------------------------------- many comparisons, seeds

def holm(ps):
    """Holm's step-down adjusted p-values (familywise error), in the input order."""
    order = sorted(range(len(ps)), key=ps.__getitem__)
    adjusted, running = [1.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def bootstrap(statistic, n_seeds, n_items, draws=2000, seed=0):
    """Resample seeds and items (each with replacement, independently), recompute `statistic(seeds,
    items)` (lists of indices) on each draw. -> the point estimate on all data, the 95% percentile
    interval, and the two-sided bootstrap p-value of 'statistic = 0' from the same draws (twice the
    smaller share of draws on either side of 0), which is below 0.05 exactly when 0 is outside the
    interval. n_items may be a tuple: one size per set of items the statistic reads."""
    rng = random.Random(seed)
    sizes = n_items if isinstance(n_items, tuple) else (n_items,)
    everything = [list(range(n_seeds))] + [list(range(k)) for k in sizes]
    estimate = statistic(*everything)
    values = []
    for _ in range(draws):
        picks = [[rng.randrange(len(x)) for _ in x] for x in everything]
        value = statistic(*picks)
        if value is not None:
            values.append(value)
    values.sort()
    if not values:
        return {"diff": estimate, "ci95": [None, None], "p": None, "significant": False, "draws": 0}
    k = math.ceil(0.025 * len(values))  # lo > 0 exactly when fewer than 2.5% of the draws are <= 0
    lo, hi = values[k - 1], values[len(values) - k]
    below, above = sum(v <= 0 for v in values) / len(values), sum(v >= 0 for v in values) / len(values)
    p = min(1.0, 2 * min(below, above))
    return {"diff": estimate, "ci95": [lo, hi], "p": p, "significant": p < 0.05, "draws": len(values)}

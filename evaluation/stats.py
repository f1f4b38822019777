"""Intervals and exact paired tests: every change is measured against the start on the same items."""
import math


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def mean_ci(xs, z=1.96):
    """Mean with a normal-approximation 95% interval."""
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, [m - z * sd / math.sqrt(n), m + z * sd / math.sqrt(n)]


def rate(flags):
    k, n = sum(flags), len(flags)
    return {"rate": k / n if n else 0.0, "ci95": wilson(k, n), "n": n}


def binomial_two_sided(k, n):
    """Exact two-sided p-value of k successes in n fair coin flips (the sign test, McNemar's exact test)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_rates(run, start, z=1.96):
    """Same items, 0/1 outcomes. -> run rate - start rate, its 95% interval (Newcombe 1998, method 10:
    Wilson intervals of both rates, combined with the correlation of the pairs), and the exact
    McNemar p-value (two-sided binomial test on the discordant items)."""
    n = len(run)
    a = sum(r and s for r, s in zip(run, start))
    b = sum(r and not s for r, s in zip(run, start))      # only the run
    c = sum(s and not r for r, s in zip(run, start))      # only the start
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    (l1, u1), (l2, u2) = wilson(a + b, n, z), wilson(a + c, n, z)
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(denom) if denom else 0.0
    lo = p1 - p2 - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = p1 - p2 + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    p = binomial_two_sided(b, b + c)
    return {"diff": p1 - p2, "ci95": [lo, hi], "p": p, "only_run": b, "only_start": c, "n": n,
            "significant": p < 0.05}


def paired_means(run, start):
    """Same items, real-valued scores. -> mean difference with a normal 95% interval, and the exact
    sign test on the items that changed."""
    diffs = [r - s for r, s in zip(run, start)]
    d, ci = mean_ci(diffs)
    up, down = sum(x > 0 for x in diffs), sum(x < 0 for x in diffs)
    p = binomial_two_sided(up, up + down)
    return {"diff": d, "ci95": ci, "p": p, "up": up, "down": down, "n": len(diffs), "significant": p < 0.05}


def gap_change(run, start, keyed, pairs=None):
    """Persona drift: per item the change run - start; drift = mean change on trait-keyed items minus
    mean change on anti-trait items, with a normal 95% interval. Where statements come in matched
    pairs (`pairs`: the same id for a trait statement and its opposite), only the pairs count and the
    interval is that of the per-pair differences: the shift both members share cancels in each pair.
    Otherwise the two groups of changes are independent."""
    if pairs and any(pairs):
        by_pair = {}
        for r, s, key, pair in zip(run, start, keyed, pairs):
            if pair:
                by_pair.setdefault(pair, {})[key] = r - s
        diffs = [v["trait"] - v["anti"] for v in by_pair.values() if len(v) == 2]
        if len(diffs) < 2:
            return None
        d, ci = mean_ci(diffs)
        return {"diff": d, "ci95": ci, "significant": not ci[0] <= 0 <= ci[1], "pairs": len(diffs)}
    groups = [[r - s for r, s, key in zip(run, start, keyed) if key == k] for k in ("trait", "anti")]
    if min(map(len, groups)) < 2:  # no variance to estimate: no interval, nothing significant
        return None
    (mt, vt), (ma, va) = [(sum(g) / len(g),
                           sum((x - sum(g) / len(g)) ** 2 for x in g) / (len(g) - 1) / len(g))
                          for g in groups]
    d, se = mt - ma, math.sqrt(vt + va)
    return {"diff": d, "ci95": [d - 1.96 * se, d + 1.96 * se], "significant": abs(d) > 1.96 * se,
            "n_trait": len(groups[0]), "n_anti": len(groups[1])}

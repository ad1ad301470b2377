"""The experiment's statistics: runs grouped by point (curve, lam) over seeds, each curve's Pareto front,
forgetting at equal learning, and the intervals behind every comparison."""
from __future__ import annotations

import math
import random
import re
from typing import Dict, List, Sequence

from fastmtt.apps import FULLY_LABELLED_TASKS

ALL_POSITIONS = ", all positions"  # the suffix of an every-position curve's name
BUDGET = ", budget"  # the suffix of a forgetting-budget curve's name (it sweeps target_kl)


def curve_name(row) -> str:
    name = {"ce": "CE only", "kl": "full KL", "base": "base model"}.get(row["method"], f"MTT {row['direction']}")
    if row["method"] in ("ce", "base"):
        return name
    name += "" if row["temperature"] == 1 else f" T={row['temperature']:g}"
    name += ALL_POSITIONS if row["kl_positions"] == "all" else ""
    return name + (BUDGET if row["target_kl"] > 0 else "")


def setting_of(row) -> float:
    """What a curve sweeps: lam, or on a budget curve target_kl."""
    return row["target_kl"] if row["target_kl"] > 0 else row["lam"]


METRICS = ("task_ce", "task_acc", "exact_match", "retention_ppl", "retention_kl", "kjv_ppl", "kjv_kl")
RETENTION_LABELS = {"retention_kl": "Python prose", "kjv_kl": "KJV"}  # forgetting: KL(base‖adapted) on each text


def _mean_std(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def runs_by_point(rows) -> Dict[tuple, Dict[tuple, List[dict]]]:
    """{(task, adapter): {(curve, lam or target_kl): the rows of its seeds}}."""
    groups: Dict[tuple, Dict[tuple, List[dict]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["adapter"]), {}).setdefault((curve_name(row), setting_of(row)),
                                                                         []).append(row)
    return groups


def grouped(rows):
    """{(task, adapter): {(curve, lam or target_kl): {metric: (mean, std, min, max), "seeds": count,
    "final_lam": mean}}} over seeds."""
    return {key: {point: {m: (*_mean_std([measure(r, m) for r in runs]), min(measure(r, m) for r in runs),
                              max(measure(r, m) for r in runs)) for m in METRICS}
                  | {"seeds": len(runs), "final_lam": sum(r["final_lam"] for r in runs) / len(runs)}
                  for point, runs in points.items()}
            for key, points in runs_by_point(rows).items()}


def curves_of(points) -> Dict[str, List[tuple]]:
    """Regularized curves, each starting at CE only (lam = 0): {curve: [(lam, value), ...]} by lam, from
    {(curve, lam): value} (the stats of `grouped` or the runs of `runs_by_point`)."""
    start = [(0.0, points[("CE only", 0.0)])] if ("CE only", 0.0) in points else []
    names = sorted({name for name, _ in points} - {"CE only", "base model"})
    return {name: start + sorted(((lam, s) for (n, lam), s in points.items() if n == name), key=lambda p: p[0])
            for name in names}


def pareto(points: Sequence[tuple]) -> List[tuple]:
    """The (learning, forgetting) points, lower better on both, that no other point beats on both, sorted."""
    return sorted(p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points))


def interpolate(points: Sequence[tuple], level: float) -> float:
    """Forgetting interpolated linearly between sorted (learning, forgetting) points at learning = level; NaN
    outside them."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= level <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (level - x0) / (x1 - x0)
    return math.nan


def at_equal_learning(curve: List[tuple], level: float, forgetting: str) -> float:
    """Forgetting (seed means) at task CE = level, interpolated along the curve's Pareto points (a dominated
    point anchors no segment); NaN outside them."""
    return interpolate(pareto([(stats["task_ce"][0], stats[forgetting][0]) for _, stats in curve]), level)


def measure(row, name: str) -> float:
    """A row's value of `name`: a column, or {text}_logppl, the log of column {text}_ppl (nats per token:
    the retention CE), NaN where the row lacks it."""
    if name.endswith("_logppl"):
        value = row.get(name.replace("_logppl", "_ppl"), math.nan)
        return math.log(value) if value > 0 else math.nan
    return row.get(name, math.nan)


MIN_SEEDS = 3  # a verdict needs this many seeds compared (every seed: both curves reach the level)
CLAIM_SEEDS = 5  # a claim in the docs needs this many (docs/experiments.md); fewer: the verdict is preliminary
LEARNING = {"task_ce": 1.0, "task_acc": -1.0, "exact_match": -1.0}  # sign making lower better
# Forgetting, each on both retention texts: KL(base || adapted) (what the full-KL regularizer itself minimizes)
# and the log of the perplexity (the retention CE), neutral between the methods.
FORGETTING = {"retention_kl": "KL, Python prose", "kjv_kl": "KL, KJV", "retention_logppl": "log PPL, Python prose",
              "kjv_logppl": "log PPL, KJV"}


def frontier_at(curve_runs, level: float, learning: str, forgetting: str) -> float:
    """Forgetting at learning = level on the Pareto front of a curve's seed means (NaN outside it); curve_runs:
    [(lam, runs)]."""
    sign = LEARNING[learning]
    means = [(sign * sum(measure(r, learning) for r in runs) / len(runs),
              sum(measure(r, forgetting) for r in runs) / len(runs)) for _, runs in curve_runs if runs]
    return interpolate(pareto(means), sign * level)


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer df >= 1, exact (Abramowitz & Stegun 26.7.3 and 26.7.4: a finite
    sum in theta = atan(t / sqrt(df)))."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 3 terms past the first
        term, total = 1.0, 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= 2 * k / (2 * k + 1) * c * c
        a = 2 / math.pi * (theta + (s * c * total if df > 1 else 0.0))
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df / 2 terms
        term, total = 1.0, 0.0
        for k in range(1, df // 2 + 1):
            total += term
            term *= (2 * k - 1) / (2 * k) * c * c
        a = s * total
    return 0.5 + 0.5 * a


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with integer df >= 1 (0 < p < 1), by bisection of `t_cdf`."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p!r}, df={df!r}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def t_interval(values: Sequence[float], confidence: float = 0.9) -> tuple:
    """(mean, low, high) of values (n >= 2), the two-sided t-interval of their mean; low = high = NaN for n < 2."""
    n = len(values)
    mean, std = _mean_std(values) if n else (math.nan, 0.0)
    if n < 2:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_difference(point_runs: Dict[tuple, List[dict]], curve_a: str, curve_b: str, level: float,
                      learning: str = "task_ce", forgetting: str = "retention_kl") -> tuple:
    """(mean, low, high, seeds): forgetting of curve_a minus curve_b at learning = level, paired by seed (the
    seed fixes the adapter's init and the batch order of every run): for each seed, each curve from that
    seed's runs alone (CE only's among them) along its Pareto points, the difference at the level; mean,
    low-high its 90% t-interval over the seeds where both curves reach the level, `seeds` their count.
    Deterministic: no other curve's rows enter. point_runs: {(curve name, lam): runs}."""
    seeds = sorted({r["seed"] for r in point_runs.get(("CE only", 0.0), [])})
    differences = []
    for seed in seeds:
        curves = curves_of({key: [r for r in runs if r["seed"] == seed] for key, runs in point_runs.items()})
        difference = (frontier_at(curves.get(curve_a, []), level, learning, forgetting)
                      - frontier_at(curves.get(curve_b, []), level, learning, forgetting))
        if not math.isnan(difference):
            differences.append(difference)
    return (*t_interval(differences), len(differences))


def verdict(difference: float, low: float, high: float, seeds: int) -> str:
    """How curve a compares with b in forgetting at equal learning: a difference only where the 90% interval
    excludes 0 over at least MIN_SEEDS seeds, preliminary below CLAIM_SEEDS."""
    if seeds == 0 or math.isnan(difference):
        return "not comparable (a curve does not reach the level)"
    if seeds < MIN_SEEDS:
        return f"no verdict: {seeds} seed(s)"
    said = "forgets less" if high < 0 else "forgets more" if low > 0 else "tie (the interval contains 0)"
    return said + (f" (preliminary: {seeds} seeds)" if seeds < CLAIM_SEEDS else "")


def interval_90(draws: Sequence[float]) -> tuple:
    """(low, high): the 5th and 95th percentiles of bootstrap draws (no NaN among them)."""
    ordered = sorted(draws)
    return ordered[int(0.05 * (len(ordered) - 1))], ordered[int(math.ceil(0.95 * (len(ordered) - 1)))]


def with_every_position_twins(by_task):
    """by_task ({task: `grouped` points}) where, on each task of FULLY_LABELLED_TASKS, every every-position point
    that another task ran is its labelled twin's (kl_positions "all" is "labels" on such a task)."""
    every_position = {name for points in by_task.values() for name, _ in points if ALL_POSITIONS in name}

    def twins(points):
        return {(name, setting): stats for name in every_position for (twin, setting), stats in points.items()
                if twin == name.replace(ALL_POSITIONS, "")}

    return {task: {**twins(points), **points} if task in FULLY_LABELLED_TASKS else points
            for task, points in by_task.items()}


DEFAULT_SHARE = 0.9  # the package's default lams keep this share of CE only's learning (largest_lam_keeping)


def gains_kept(stats, ce_only, base_row) -> Dict[str, float]:
    """{measure: share of CE only's gain over the base model that a point keeps} for task CE, accuracy and
    (where the task has answers) exact match, from seed means; a measure CE only does not move is left out."""
    kept = {}
    for measure in ("task_ce", "task_acc", "exact_match"):
        gain = ce_only[measure][0] - base_row[measure]
        if gain != 0 and not math.isnan(gain):
            kept[measure] = (stats[measure][0] - base_row[measure]) / gain
    return kept


def largest_lam_keeping(by_task, base, share: float = DEFAULT_SHARE) -> Dict[str, float]:
    """{fixed-lam curve run on every task: the largest lam, among those run with at least MIN_SEEDS seeds on
    every task (CE only too), whose seed means keep at least `share` of CE only's gain in every measure of
    `gains_kept` on every task (NaN: none does)}. by_task: {task: `grouped` points with CE only}, base: {task:
    the base model's row}."""
    names = sorted(name for name in set.intersection(*({name for name, _ in points} for points in by_task.values()))
                   if name not in ("CE only", "base model") and not name.endswith(BUDGET))
    chosen = {}
    for name in names:
        lams = set.intersection(*({lam for (n, lam), stats in points.items() if n == name
                                   and min(stats["seeds"], points[("CE only", 0.0)]["seeds"]) >= MIN_SEEDS}
                                  for points in by_task.values()))
        keeping = [lam for lam in lams
                   if all(min(gains_kept(points[(name, lam)], points[("CE only", 0.0)], base[task]).values()) >= share
                          for task, points in by_task.items())]
        chosen[name] = max(keeping, default=math.nan)
    return chosen


def compared_pairs(names) -> List[tuple]:
    """(a, b) curve pairs compared at equal learning: each MTT curve with the full-KL curve of the same
    temperature, positions and lam or budget sweep, each every-position curve with its labelled-position twin
    and each budget curve with its fixed-lam twin; only pairs whose curves both ran."""
    pairs = [(name, re.sub(r"^MTT (forward|reverse)", "full KL", name)) for name in sorted(names)
             if name.startswith("MTT")]
    pairs += [(name, name.replace(ALL_POSITIONS, "")) for name in sorted(names) if ALL_POSITIONS in name]
    pairs += [(name, name.removesuffix(BUDGET)) for name in sorted(names) if name.endswith(BUDGET)]
    return [(a, b) for a, b in pairs if b in names]


def kept_gap(ce_runs_a, runs_a, ce_runs_b, runs_b, column: str, base_a: float = 0.0, base_b: float = 0.0,
             draws: int = 2000, seed: int = 0) -> tuple:
    """(gap, low, high): a setting's share of CE only's change over the base model that it keeps, on task a minus
    on task b, share = (mean - base) / (CE only's mean - base) of `column` over seeds (for a forgetting measure,
    base 0: the share of the forgetting left), with its 90% seed-bootstrap interval (each of the four points'
    seeds resampled with replacement; the draws depend on these four points alone, so the interval does not move
    when other rows are added). 0: the setting does the same on both tasks."""
    def gap(groups):
        ce_a, a, ce_b, b = (sum(r[column] for r in group) / len(group) for group in groups)
        return (a - base_a) / (ce_a - base_a) - (b - base_b) / (ce_b - base_b)

    groups = (ce_runs_a, runs_a, ce_runs_b, runs_b)
    rng = random.Random(seed)
    return gap(groups), *interval_90([gap([[rng.choice(group) for _ in group] for group in groups])
                                      for _ in range(draws)])

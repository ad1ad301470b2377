"""The experiment's summary.md: per (task, adapter) the table of seed means, forgetting at equal learning and
the comparisons between curves; across tasks, what one setting does on each."""
from __future__ import annotations

import itertools
import math
from typing import List

from fastmtt.apps import ADDITION_DIGITS, FULLY_LABELLED_TASKS
from fastmtt.apps.experiment_statistics import (
    ALL_POSITIONS,
    BUDGET,
    DEFAULT_SHARE,
    FORGETTING,
    LEARNING,
    METRICS,
    MIN_SEEDS,
    RETENTION_LABELS,
    at_equal_learning,
    compared_pairs,
    curves_of,
    gains_kept,
    grouped,
    kept_gap,
    largest_lam_keeping,
    measure,
    paired_difference,
    runs_by_point,
    verdict,
    with_every_position_twins,
)
from fastmtt.apps.experiment_tasks import operand_blind_bound
from fastmtt.options import DEFAULT_KL_POSITIONS

LEVELS = (0.5, 0.75, 0.9)  # fractions of CE only's task-CE gain over the base model


def summarize(rows) -> str:
    """Markdown: per (task, adapter) the table of seed means ± std, then forgetting at equal learning."""
    base = {r["task"]: r for r in rows if r["method"] == "base"}
    groups = grouped(rows)
    lines = []
    for (task, adapter), points in groups.items():
        if adapter == "":
            continue
        b = base.get(task)
        lines += [f"\n### {task}, {adapter}" + (f" (base model: task CE {b['task_ce']:.3f}, acc {b['task_acc']:.3f}, "
                                                 f"exact {b['exact_match']:.3f}; retention PPL "
                                                 f"{b['retention_ppl']:.2f})" if b else ""),
                  "", "| method | lam (budget: target_kl, final lam) | seeds | task CE | task acc | exact match | "
                      "Python prose PPL | Python prose KL(base‖adapted) | KJV PPL | KJV KL(base‖adapted) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        if task in ADDITION_DIGITS:  # what learning the format alone gives
            blind = operand_blind_bound(ADDITION_DIGITS[task])
            lines.insert(len(lines) - 3, f"\nA predictor that ignores the operands reaches at best task CE "
                                         f"{blind['task_ce']:.3f}, acc {blind['task_acc']:.3f}, exact "
                                         f"{blind['exact_match']:.3f}.")
        for (name, lam), stats in sorted(points.items(), key=lambda item: (item[0][0] != "CE only",) + item[0]):
            cells = " | ".join("-" if math.isnan(stats[m][0]) else f"{stats[m][0]:.{4 if m.endswith('_kl') else 3}f}"
                               f" ± {stats[m][1]:.{4 if m.endswith('_kl') else 3}f}" for m in METRICS)
            setting = f"{lam:g}, {stats['final_lam']:.3g}" if name.endswith(BUDGET) else f"{lam:g}"
            lines.append(f"| {name} | {setting} | {stats['seeds']} | {cells} |")
        ce_only = points.get(("CE only", 0.0))
        if b is None or ce_only is None:
            continue
        gain = b["task_ce"] - ce_only["task_ce"][0]
        curves = curves_of(points)
        lines += ["", "Forgetting at equal learning (interpolated along each curve's Pareto points; "
                      "'-' = not reached):", "",
                  "| task CE (share of CE only's gain) | " + " | ".join(f"{n}: KL / PPL" for n in curves) + " |",
                  "|---|" + "---|" * len(curves)]
        for share in LEVELS:
            level = b["task_ce"] - share * gain
            cells = []
            for curve in curves.values():
                kl, ppl = (at_equal_learning(curve, level, m) for m in ("retention_kl", "retention_ppl"))
                cells.append("-" if math.isnan(kl) else f"{kl:.4f} / " + ("-" if math.isnan(ppl) else f"{ppl:.2f}"))
            lines.append(f"| {level:.3f} ({share:.0%}) | " + " | ".join(cells) + " |")
        lines += compared_curves(rows, task, adapter, b, ce_only)
    lines += across_tasks(groups, base) + transfer_gaps(rows, base)
    return "\n".join(lines).lstrip("\n")


def across_tasks(groups, base) -> List[str]:
    """Markdown lines: does one setting (a lam, or a budget) do the same on every task? Per adapter run on two
    or more tasks, each setting's share of CE only's forgetting (retention KL) it removes, share of CE only's
    task-CE gain over the base it keeps and (in brackets) the least share it keeps over task CE, accuracy and
    exact match, seed means (on a task of FULLY_LABELLED_TASKS an every-position setting is its labelled one:
    `with_every_position_twins`); then the lam the package's defaults follow (`largest_lam_keeping`); nothing
    with one task. groups: `grouped(rows)`, base: {task: the base model's row}."""
    lines = []
    for adapter in sorted({kind for _, kind in groups} - {""}):
        by_task = {task: points for (task, kind), points in groups.items()
                   if kind == adapter and task in base and ("CE only", 0.0) in points}
        if len(by_task) < 2:
            continue
        by_task = with_every_position_twins(by_task)
        tasks = sorted(by_task)
        lines += ["", f"Exploratory: {adapter}, one setting on every task: share of CE only's forgetting removed "
                      "(retention KL) / share of its task-CE gain kept (least share kept of task CE, accuracy, "
                      "exact match), seed means:", "",
                  "| method | lam (budget: target_kl) | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        settings = sorted({point for points in by_task.values() for point in points} - {("CE only", 0.0)})
        for name, setting in settings:
            cells = []
            for task in tasks:
                stats, ce_only = by_task[task].get((name, setting)), by_task[task][("CE only", 0.0)]
                if stats is None:
                    cells.append("-")
                    continue
                removed = 1 - stats["retention_kl"][0] / ce_only["retention_kl"][0]
                kept = gains_kept(stats, ce_only, base[task])
                cells.append(f"{removed:.0%} / {kept['task_ce']:.0%} ({min(kept.values()):.0%})")
            lines.append(f"| {name} | {setting:g} | " + " | ".join(cells) + " |")
        chosen = largest_lam_keeping(by_task, base)
        lines += ["", f"The largest lam that keeps {DEFAULT_SHARE:.0%} of CE only's gain in every learning measure on "
                      "every task: " + ", ".join(f"{name} {'none' if math.isnan(lam) else f'{lam:g}'}"
                                                 for name, lam in chosen.items()) + "."]
    return lines


def transfer_gaps(rows, base) -> List[str]:
    """Markdown lines: per adapter run on exactly two tasks, each setting (a lam or a budget) with at least
    MIN_SEEDS seeds on both: the share of CE only's forgetting it removes on the first task (sorted) minus the
    second, on each retention text, and the same for the share of CE only's task-CE gain it keeps, with 90%
    seed-bootstrap intervals (`kept_gap`); a setting transfers where the gaps are near 0. Nothing for an
    adapter on one task."""
    lines = []
    runs = runs_by_point(rows)
    for adapter in sorted({kind for _, kind in runs} - {""}):
        by_task = {task: points for (task, kind), points in runs.items()
                   if kind == adapter and task in base and len(points.get(("CE only", 0.0), [])) >= MIN_SEEDS}
        if len(by_task) != 2:
            continue
        (first, a), (second, b) = sorted(with_every_position_twins(by_task).items())
        settings = sorted(point for point in set(a) & set(b) - {("CE only", 0.0)}
                          if min(len(a[point]), len(b[point])) >= MIN_SEEDS)
        lines += ["", f"Exploratory: {adapter}, does one setting transfer? On {first} minus on {second}: the "
                      "share of CE only's forgetting removed on each text and of its task-CE gain kept, 90% "
                      "seed-bootstrap interval:", "",
                  "| method | lam (budget: target_kl) | " + " | ".join(f"{text}: removed" for text in
                                                                  RETENTION_LABELS.values()) + " | task CE: kept |",
                  "|---|---|" + "---|" * (len(RETENTION_LABELS) + 1)]
        for name, setting in settings:
            points = (a[("CE only", 0.0)], a[(name, setting)], b[("CE only", 0.0)], b[(name, setting)])
            left = [kept_gap(*points, forgetting) for forgetting in RETENTION_LABELS]  # removed = 1 - left
            cells = [(0.0 - gap, 0.0 - high, 0.0 - low) for gap, low, high in left]  # no -0
            cells.append(kept_gap(*points, "task_ce", base[first]["task_ce"], base[second]["task_ce"]))
            lines.append(f"| {name} | {setting:g} | " + " | ".join("-" if math.isnan(gap) else
                                                                   f"{gap:+.0%} [{low:+.0%}, {high:+.0%}]"
                                                                   for gap, low, high in cells) + " |")
    return lines


# Primary comparisons, stated before the 5-seed reruns (issue 39): MTT minus full KL at the default
# kl_positions, in forgetting (both measures of FORGETTING on both texts) at 90% of CE only's task-CE gain and at
# 90% of its exact-match gain (a task with answers). Every other row of the summary is exploratory.
PRIMARY_LEVELS = (("task_ce", 0.9), ("exact_match", 0.9))


def primary_pair(task: str) -> tuple:
    """(MTT curve, full-KL curve) at the default kl_positions on `task` (on a fully labelled task "all" is
    "labels")."""
    suffix = ALL_POSITIONS if DEFAULT_KL_POSITIONS == "all" and task not in FULLY_LABELLED_TASKS else ""
    return f"MTT forward{suffix}", f"full KL{suffix}"


def compared_curves(rows, task, adapter, base, ce_only) -> List[str]:
    """Markdown lines: for each pair of `compared_pairs`, curve a minus curve b in forgetting (FORGETTING on
    each retention text) at equal learning (task CE, accuracy, exact match at LEVELS of CE only's gain over the
    base), seed-paired (`paired_difference`) with 90% t-intervals and the verdict, the primary comparisons
    (`PRIMARY_LEVELS`, `primary_pair`) first and marked; nothing without a pair."""
    point_runs = runs_by_point(rows)[(task, adapter)]
    pairs = compared_pairs({name for name, _ in point_runs})
    if not pairs:
        return []
    seeds = [len(runs) for runs in point_runs.values()]
    lines = ["", f"Forgetting at equal learning, one curve minus another, paired by seed (each seed's curves along "
             f"their Pareto points; mean difference over the seeds where both reach the level, 90% t-interval; "
             f"{min(seeds)}-{max(seeds)} seeds per point). Primary: the comparisons stated before the 5-seed "
             f"reruns; everything else exploratory.", "",
             "| | learning at (share of CE only's gain) | forgetting | a - b | seeds | difference [90% interval] | "
             "verdict |", "|---|---|---|---|---|---|---|"]
    forgetting_measures = [m for m in FORGETTING
                           if not any(math.isnan(measure(r, m)) for r in rows if r["task"] == task)]
    cells = []
    for learning in LEARNING:
        gain = ce_only[learning][0] - base[learning]
        if math.isnan(gain) or gain == 0:
            continue
        for share in LEVELS:
            for forgetting, (a, b) in itertools.product(forgetting_measures, pairs):
                primary = (learning, share) in PRIMARY_LEVELS and (a, b) == primary_pair(task)
                cells.append((not primary, learning, share, forgetting, a, b))
    for secondary, learning, share, forgetting, a, b in sorted(cells, key=lambda cell: cell[0]):
        level = base[learning] + share * (ce_only[learning][0] - base[learning])
        diff, low, high, n = paired_difference(point_runs, a, b, level, learning, forgetting)
        interval = "-" if n == 0 else f"{diff:+.4f}" if n < 2 else f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]"
        lines.append(f"| {'exploratory' if secondary else '**primary**'} | {learning} {level:.3f} ({share:.0%}) | "
                     f"{FORGETTING[forgetting]} | {a} - {b} | {n} | {interval} | {verdict(diff, low, high, n)} |")
    return lines

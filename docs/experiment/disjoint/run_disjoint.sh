#!/bin/sh
# The 5-seed reruns of the LoRA grids (not run yet; run from the repository root after `make experiment-setup`):
# the far task (2-digit addition) and the near task (the PSF license prose) of `--preset far`, the held-out
# problems drawn apart from the training ones (column train_overlap 0), the near task's step count chosen on its
# validation split (never the scored one), the regularizer at every position (MTTObjective's default), seeds
# 0-4. Lams: 6 per regularizer, denser where the 90% levels of the primary comparisons fell in the 3-seed grid
# (docs/experiment/far): far task, full KL 0.5-1 (exact match) and MTT 1-5 (task CE; its every-position lam 3
# stopped at task CE 0.78, short of the level 0.863); near task, both between lam 1 and 3.
# Resumable: each run appends its row to $OUT/results.csv and saves its adapter under $OUT/adapters/, a rerun
# skips the finished runs, and the chosen step count is kept in $OUT/license_steps. Two copies share a 2-core
# machine: `SEEDS="0 1 2" OUT=a sh run_disjoint.sh & SEEDS="3 4" OUT=b sh run_disjoint.sh` (both choose the step
# count, on seeds 0-2, and agree), then `sh run_disjoint.sh merge a b`.
# Run time, estimated from the far grid's measured `seconds` (docs/experiments.md, "The 5-seed reruns"): about
# about 12 hours of one CPU thread, 6 with two copies on two cores (docs/experiments.md, "The 5-seed reruns").
set -e
OUT=${OUT:-fastmtt-disjoint}
SEEDS=${SEEDS:-0 1 2 3 4}
HERE=docs/experiment/disjoint
run() { nice -n 10 .venv/bin/fastmtt experiment --preset far --out "$OUT" --resume --threads 1 --kl-positions all \
        --seeds $SEEDS "$@"; }
merge() {  # merge FOLDER...: their results.csv rows (each run once, the last folder's) into $HERE/results.csv,
           # then its summary.md and frontier.png
    .venv/bin/python - "$HERE" "$@" <<'PY'
import os, sys
from fastmtt.apps.experiment import KEY, read_csv, write_csv
from fastmtt.apps.experiment_plots import plot_frontier
from fastmtt.apps.experiment_summary import summarize
here, folders = sys.argv[1], sys.argv[2:]
target = os.path.join(here, "results.csv")
rows = {}
for path in [target, *(os.path.join(folder, "results.csv") for folder in folders)]:
    if os.path.exists(path):
        for row in read_csv(path):
            rows[tuple(row[k] for k in KEY)] = row
write_csv(list(rows.values()), target)
rows = read_csv(target)
with open(os.path.join(here, "summary.md"), "w") as handle:
    handle.write(summarize(rows) + "\n")
plot_frontier(rows, os.path.join(here, "frontier.png"))
print(f"{len(rows)} runs in {target}; summary.md and frontier.png written")
PY
}
case "${1:-grid}" in
  merge) shift; merge "$@"; exit ;;
esac
mkdir -p "$OUT"
# 1. the near task's step count: CE only, seeds 0-2, one run of 150 steps each scored on the validation split
#    after 25, 50, 75, 100 and 150 steps; the least mean validation task CE wins (the 3-seed grid's 50 steps were
#    chosen on the scored split)
if [ ! -s "$OUT/license_steps" ]; then
    .venv/bin/python -c "import sys; from fastmtt.apps.experiment import select_steps
print(select_steps('license', (25, 50, 75, 100, 150), (0, 1, 2), log=lambda line: print(line, file=sys.stderr)))" \
        > "$OUT/license_steps.partial"
    mv "$OUT/license_steps.partial" "$OUT/license_steps"
fi
STEPS=$(cat "$OUT/license_steps")
# 2. the far task: CE only, full KL and MTT forward (65 runs over seeds 0-4)
run --tasks addition2 --methods ce
run --tasks addition2 --methods kl --lams 0.1 0.3 0.5 0.7 1 3
run --tasks addition2 --methods mtt --lams 0.5 1 2 3 5 10
# 3. the near task at the chosen step count (65 runs)
run --tasks license --steps "$STEPS" --methods ce
run --tasks license --steps "$STEPS" --methods kl mtt --lams 0.3 0.5 1 1.5 2 3

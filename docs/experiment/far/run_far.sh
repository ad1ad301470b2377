#!/bin/sh
# The grid behind docs/experiment/far/ (one CPU thread per process; run from the repository root after
# `make experiment-setup`): 2-digit addition, which CE only learns (exact match >= 0.5), adapters on all 30
# layers, forgetting on the Python reference prose and the KJV. Resumable: each run appends its row to
# $OUT/results.csv and saves its adapter under $OUT/adapters/, and a rerun skips the runs already there, so
# the grid can be spread over several sittings (stop it at any time). Two copies can share a 2-core machine
# on different --seeds with different OUT folders; `merge` puts their rows into docs/experiment/far (a folder's
# row replaces the committed one of the same run: a rerun with --resume may have scored it again on more
# retention tokens from its saved adapter).
set -e
OUT=${OUT:-fastmtt-far}
run() { nice -n 10 .venv/bin/fastmtt experiment --preset far --out "$OUT" --resume --threads 1 "$@"; }
merge() {  # merge FOLDER...: their results.csv rows (each run once, the last folder's) into docs/experiment/far/
         # results.csv, then its summary.md and frontier.png
    .venv/bin/python - "$@" <<'PY'
import os, sys
from fastmtt.apps.experiment import KEY, read_csv, write_csv
from fastmtt.apps.experiment_plots import plot_frontier
from fastmtt.apps.experiment_summary import summarize
target = "docs/experiment/far/results.csv"
rows = {}
for path in [target, *(os.path.join(folder, "results.csv") for folder in sys.argv[1:])]:
    if os.path.exists(path):
        for row in read_csv(path):
            rows[tuple(row[k] for k in KEY)] = row
write_csv(list(rows.values()), target)
rows = read_csv(target)
with open("docs/experiment/far/summary.md", "w") as handle:
    handle.write(summarize(rows) + "\n")
plot_frontier(rows, "docs/experiment/far/frontier.png")
print(f"{len(rows)} runs in {target}; summary.md and frontier.png written")
PY
}
case "${1:-grid}" in
  merge) shift; merge "$@"; exit ;;
  probe) run --adapters "$2" --methods ce --seeds 0 --lr "$3"; exit ;;  # probe ADAPTER LR: CE only, seed 0
esac
# 1. LoRA: CE only, full KL and MTT forward at lam 0.3 ... 100, seeds 0, 1, 2 (the preset's grid)
run --adapters lora
# 2. DoRA, RandLoRA (randlora_alpha = 20 r), SineLoRA: three lams, two seeds. RandLoRA and SineLoRA at the
#    preset's lr 1e-4 (adapter_lrs), chosen by learning-rate probes of CE only (OUT=probe-X sh run_far.sh probe
#    ADAPTER X; RandLoRA X in 0.01 0.003 0.001 0.0003 0.0001 0.00003, SineLoRA 0.001 0.0003 0.0001). Lams 1, 3,
#    10: on LoRA they span both regularizers from a small loss of exact match to none left (30 and 100 add
#    nothing there).
run --adapters dora randlora sinelora --lams 1 3 10 --seeds 0 1
# 3. the near task (PSF license prose) with the same placement, 50 steps (the preset's task_steps: a probe of CE
#    only at 25, 50, 100 and 150 steps, seed 0, found the least held-out task CE at 50)
run --tasks license --adapters lora --lams 0.3 1 3 10 --seeds 0 1 2
# 4. forgetting budgets (lam starts at 1 and adapts to hold MTT's training divergence) on both tasks
run --tasks addition2 license --adapters lora --methods ce mtt --lams 1 --target-kls 0.01 0.03 0.1 0.3 1
# 5. lam 0.5, between the default (0.3) and lam 1, on both tasks: can the default rule pick a larger lam?
run --tasks addition2 license --adapters lora --methods kl mtt --lams 0.5
# 6. the regularizer at every position (the prompt's too) at lam 0.3, 1 and 3, on the far task (on the near
#    task every position is labelled: there "all" is "labels", and the summary reuses those runs); lam 0.5 for
#    MTT alone, since full KL's lam 0.5 already fails the default rule on the near task
run --adapters lora --methods kl mtt --lams 0.3 1 3 --kl-positions all
run --adapters lora --methods mtt --lams 0.5 --kl-positions all

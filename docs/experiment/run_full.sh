#!/bin/sh
# The exact commands behind docs/experiment/ (one CPU thread; run from the repository root after
# `make experiment-setup`). Each call adds its runs to the same results.csv (--resume) and rewrites
# summary.md and frontier.png from all of them. The grid is cut to what fit in about an hour on a
# shared 2-core machine (~110 s per LoRA run of 30 steps there); widen --seeds/--lams with more time.
set -e
OUT=${OUT:-docs/experiment}
run() { nice -n 10 .venv/bin/fastmtt experiment --preset full --out "$OUT" --resume --threads 1 "$@"; }
# 1. far task (3-digit addition), LoRA, seed 0: CE only, full KL and MTT (forward) over lam 0.3 ... 30
run --tasks addition --adapters lora --methods ce kl mtt --directions forward --seeds 0
# 2. the reverse direction of MTT
run --tasks addition --adapters lora --methods mtt --directions reverse --lams 1 10 30 --seeds 0
# 3. a second seed on part of the sweep (seed spread)
run --tasks addition --adapters lora --methods ce kl --lams 0.3 3 --seeds 1
run --tasks addition --adapters lora --methods mtt --directions forward --lams 3 30 --seeds 1
# 4. near task (the PSF license prose), LoRA
run --tasks license --adapters lora --methods ce kl mtt --directions forward --lams 1 10 --seeds 0
# 5. DoRA on the far task
run --tasks addition --adapters dora --methods ce kl mtt --directions forward --lams 1 10 --seeds 0
# 6. MTT at larger lam: does its curve reach full KL's lower-learning points?
run --tasks addition --adapters lora --methods mtt --directions forward --lams 100 300 --seeds 0
# 7. the regularizer at every position of the sequence (prompt included; CE stays on the answer)
run --tasks addition --adapters lora --methods kl --kl-positions all --lams 0.3 1 3 --seeds 0 1
run --tasks addition --adapters lora --methods mtt --directions forward --kl-positions all --lams 1 3 10 30 --seeds 0 1

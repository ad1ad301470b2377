#!/usr/bin/env bash
# The one GPU check: at most GPU_CHECK_SECONDS (default 360) on one H200, offline. Every row comes from the
# registry (benchmarks/cases.py, preset "gpu"), one section per op, most important first, fastmtt first
# within each op and third-party peers last. Each configuration's rows are appended to the CSV as soon as
# they are measured, so a run cut short keeps them. Writes to $OUT (default benchmarks/results):
# <gpu>-<date>.csv, its tables (.md), one PNG per op and gpu_check.log (7 files).
#
#   bash benchmarks/fetch_wheels.sh      # here, once: Liger-Kernel and Cut Cross-Entropy into .whl/
#   bash benchmarks/gpu_check.sh         # there, with .whl carried: installs .whl/*.whl into /tmp/site first
#
# Budget, estimated at the H200's ~4.3 TB/s copy and ~790 TFLOP/s bf16 (a case runs >= 7 times: 3 warm-up,
# >= 3 timed within --budget, 1 for peak memory; compiles are the larger part):
#   section               cap   work
#   fused linear          120s  N=8192 H=4096 V=128256 bf16: one logits GEMM 2NHV = 8.6 TFLOP = 10.9 ms, so the
#                               3-GEMM floor is ~33 ms, eager ~80 ms, the tiled kernels ~0.2-0.4 s; N=1024 is 1/8
#                               of it. Modes forward, backward, both, determinism (2 more runs). ~40 s of runs,
#                               Triton compiles ~20 s, Liger's torch.compile'd distillation loss ~30-60 s.
#   training step          55s  Llama-3.2-1B shape, 4 x 2048 tokens: forward 2 * 1.24e9 * 8192 = 20 TFLOP, a CE
#                               step ~0.1 s, an MTT step (+ base forward) ~0.15 s, 4 variants with a model build
#                               each (~3 s); then the small model (issue 12's patched-vs-PEFT step), ~1 s a case.
#   mtt_loss row kernel    75s  forward + gradient moves 3 N V elements: 6.3 GB (1.5 ms) at N=8192 V=128256 bf16,
#                               all 8 configs ~6 ms at the copy rate; torch.compile of the reference ~3 x 20 s.
#   lora_linear            60s  8192 x 4096 -> 14336: 0.96 TFLOP = 1.2 ms forward, ~2.4 ms with backward;
#                               8 configs x 3 implementations x 2 modes at 0.2 s each ~25 s, kernel compiles ~20 s.
#   tables + plots         20s
# What is left after that (if 45 s or more) runs the CUDA parity tests (pytest -m cuda).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
TOTAL_SECONDS="${GPU_CHECK_SECONDS:-360}"
RESERVE_SECONDS=20  # for the tables and plots at the end
# A rehearsal on the CPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_PRESET=tiny bash benchmarks/gpu_check.sh
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
PRESET="${GPU_CHECK_PRESET:-gpu}"
export TRITON_INTERPRET=0  # tests/conftest.py only sets it when unset: real kernels here
export PYTHONUNBUFFERED=1

install_wheels() {
    # The peers travel as pure-Python wheels (benchmarks/fetch_wheels.sh); the device machine has no network.
    if compgen -G ".whl/*.whl" >/dev/null; then
        if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl; then
            export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
            echo "installed into /tmp/site:" .whl/*.whl
        else
            echo "installing .whl/*.whl failed: the peers will be skipped"
        fi
    else
        echo "no .whl/ (benchmarks/fetch_wheels.sh makes it): Liger-Kernel and Cut Cross-Entropy will be skipped"
    fi
}

install_fastmtt() {
    # kernels/ installs as fastmtt.kernels (setup.py package_dir), so install in place. Without
    # setuptools or wheel, fall back to a shadow package tree (kernels/ linked as fastmtt/kernels) first
    # on PYTHONPATH, with PYTHONSAFEPATH so the checkout's own fastmtt/ does not hide it.
    local pip_log
    if ! pip_log="$("$PYTHON" -m pip install --quiet --no-deps --no-build-isolation --no-index -e . 2>&1)"; then
        echo "$pip_log" | grep -i "error" | head -n 3
        local shadow
        shadow="$(mktemp -d)"
        mkdir "$shadow/fastmtt"
        ln -s "$PWD"/fastmtt/* "$shadow/fastmtt/"
        ln -s "$PWD/kernels" "$shadow/fastmtt/kernels"
        export PYTHONSAFEPATH=1 PYTHONPATH="$shadow:$PWD${PYTHONPATH:+:$PYTHONPATH}"
        echo "pip install -e . failed; using the shadow tree $shadow/fastmtt"
    fi
}

seconds_left() { echo $(( TOTAL_SECONDS - SECONDS - RESERVE_SECONDS )); }

# section NAME CAP ARGS...: `python -m benchmarks ARGS` for at most CAP seconds (less if less is left); it
# starts no case in its last 15 s, and a case still running at the limit is killed (the rows so far stay).
section() {
    local name=$1 cap=$2 limit
    shift 2
    limit=$(seconds_left)
    (( cap < limit )) && limit=$cap
    if (( limit < 20 )); then
        echo "== $name: not run, the time is spent"
        STATUS+=("$name: not run")
        return
    fi
    echo "== $name (at most ${limit}s, $(date -u '+%H:%M:%S'))"
    timeout -k 5 "$limit" "$PYTHON" -m benchmarks --device "$DEVICE" --preset "$PRESET" --budget 0.2 --csv "$CSV" --append \
        --no-plot --deadline $(( limit - 15 )) "$@"
    local code=$?
    STATUS+=("$name: exit $code$( (( code == 124 || code == 137 )) && echo ' (cut at its limit; rows so far kept)')")
}

check() {
    echo "== gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    install_wheels
    install_fastmtt
    local gpu
    gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr '[:upper:]' '[:lower:]' \
        | tr -cs 'a-z0-9' '-' | sed 's/-$//')"
    CSV="$OUT_DIR/${gpu:-gpu}-$(date -u +%Y-%m-%d).csv"
    STATUS=()

    section "fused linear MTT loss (forward, backward, both, determinism)" 120 --ops fused_linear_mtt_loss \
        --exclude compile --modes forward backward forward+backward determinism
    section "LoRA training step: MTTObjective vs CE, patch_lora vs PEFT" 55 --ops lora_train_step
    section "MTT row kernel vs torch.compile" 75 --ops mtt_loss --exclude "reference (eager)" \
        --modes forward+backward
    section "LoRA linear vs PEFT and x W^T" 60 --ops lora_linear --modes forward forward+backward

    local left tests="not run (time spent)"
    left=$(seconds_left)
    if (( left >= 45 )); then
        echo "== CUDA parity tests (pytest -m cuda, at most ${left}s)"
        timeout -k 5 "$left" "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider tests/
        tests="exit $?"
    fi
    STATUS+=("CUDA parity tests: $tests")

    echo "== tables ($CSV)"
    [ -s "$CSV" ] && "$PYTHON" -m benchmarks --table "$CSV"
    echo "== summary after ${SECONDS}s"
    printf '  %s\n' "${STATUS[@]}"
}

check 2>&1 | tee -a "$LOG"

#!/usr/bin/env bash
# The one GPU check: correctness first, then the headline numbers, in at most GPU_CHECK_SECONDS (default
# 360) on one H200, offline. Every row comes from the registry (benchmarks/cases.py); each section appends
# its rows to the CSV as they are measured, so a section cut at its cap keeps them. Writes to $OUT
# (default benchmarks/results): <gpu>-<date>.csv, its tables (.md), plots when matplotlib is there, and
# gpu_check.log.
#
#   bash benchmarks/fetch_wheels.sh      # here, once: Liger-Kernel and Cut Cross-Entropy into .whl/
#   bash benchmarks/gpu_check.sh         # there, with .whl carried: installs .whl/*.whl into /tmp/site first
#
# Order and caps (seconds; a section gets its cap or what is left, whichever is less, and is skipped with
# less than 20 s left; estimates of the work at the H200's ~4.3 TB/s and ~790 bf16 TFLOP/s):
#   set-up: versions, wheels, pip install -e .            ~20 (not capped)
#   1. CUDA parity tests (pytest -m cuda)                  90  every op and path against the fp64
#      reference, the KL part of the gradient in bf16 on realistic rows, determinism
#   2. fused linear loss N=8192 H=4096 V=128256 bf16      100  fastmtt chunked and tiled first, the 3-GEMM floor
#      (forward+backward, determinism), then eager,           (~33 ms: 2NHV = 8.6 TFLOP per GEMM), peers last;
#      Liger (CE; CE + KL), Cut Cross-Entropy                  Triton compiles ~20 s, Liger's compiled loss ~30 s
#   3. LoRA training step, ~1B Llama shape, 4 x 2048       60  CE, MTTObjective live and with a base cache
#                                                               (+ patch_lora): ~0.1-0.2 s a step, a model build
#                                                               per variant (~3 s), the cache's build (one forward)
#   4. MTT row kernel N=8192 V=128256 bf16 vs copy bound   40  3 N V elements moved: 6.3 GB, ~1.5 ms
#   5. LoRA linear 8192 x 4096 -> 14336 r=16 vs x W^T      35  0.96 TFLOP forward, ~1.2 ms
#   tables (reserve)                                        15
#   sum                                                    360  (with the ~20 s of set-up)
# What is left after that runs the remaining preset rows (other shapes, modes, torch.compile baselines).
# A rehearsal on the CPU (tests/test_benchmarks.py runs it):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_PRESET=tiny GPU_CHECK_SECONDS=120 OUT=/tmp/check bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
TOTAL_SECONDS="${GPU_CHECK_SECONDS:-360}"
RESERVE_SECONDS=15  # for the tables at the end
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
PRESET="${GPU_CHECK_PRESET:-gpu}"
export TRITON_INTERPRET=0  # tests/conftest.py only sets it when unset: real kernels here
export PYTHONUNBUFFERED=1

# The headline shapes; the rehearsal's are the registry's tiny ones.
if [ "$PRESET" = tiny ]; then
    FUSED_SHAPE="N=64 H=32 V=256 head=frozen"
    STEP_SHAPE="model=tiny B=2 L=16 r=4 dropout=0.0"
    ROW_SHAPE="N=64 V=256"
    LORA_SHAPE="N=64 K=32 M=48 r=4 dropout=0.0"
else
    FUSED_SHAPE="N=8192 H=4096 V=128256 head=frozen"
    STEP_SHAPE="model=1b B=4 L=2048 r=16 dropout=0.0"
    ROW_SHAPE="N=8192 V=128256"
    LORA_SHAPE="N=8192 K=4096 M=14336 r=16 dropout=0.0"
fi
# On the CPU the runner measures each implementation in a worker process; in-process is enough here.
RUN_ARGS=(--device "$DEVICE" --budget 0.2 --no-plot)
[ "$DEVICE" = cpu ] && RUN_ARGS+=(--in-process --threads 1)

log_versions() {
    "$PYTHON" - <<'EOF'
import importlib.metadata as metadata
import platform

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"

import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
print(", ".join(f"{name} {version(name)}" for name in
                ("triton", "numpy", "transformers", "peft", "liger-kernel", "cut-cross-entropy", "matplotlib")))
EOF
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
        | sed 's/^/driver: /' || echo "driver: no nvidia-smi"
}

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
    if "$PYTHON" -c "import fastmtt.kernels, sys; sys.exit(not list(fastmtt.kernels.__path__)[0].startswith('$PWD/'))" \
        2>/dev/null; then
        echo "fastmtt is installed from this checkout"
        return
    fi
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

# limit_for CAP: the seconds a section may take (its cap or what is left), 0 when under 20 are left.
limit_for() {
    local limit
    limit=$(seconds_left)
    (( $1 < limit )) && limit=$1
    (( limit < 20 )) && limit=0
    echo "$limit"
}

# run_capped NAME CAP COMMAND...: COMMAND for at most its limit, killed there; the status goes to STATUS.
# COMMAND `benchmark ARGS...` is `python -m benchmarks ARGS` appending to the CSV and starting no case in
# the section's last 15 s.
run_capped() {
    local name=$1 limit
    limit=$(limit_for "$2")
    shift 2
    if (( limit == 0 )); then
        echo "== $name: not run, the time is spent"
        STATUS+=("$name: not run (time spent)")
        return
    fi
    if [ "$1" = benchmark ]; then
        shift
        set -- "$PYTHON" -m benchmarks "${RUN_ARGS[@]}" --csv "$CSV" --append --deadline $(( limit - 15 )) "$@"
    fi
    echo "== $name (at most ${limit}s, at ${SECONDS}s)"
    timeout -k 5 "$limit" "$@"
    local code=$?
    STATUS+=("$name: exit $code$( (( code == 124 || code == 137 )) && echo ' (cut at its cap; rows so far kept)')")
}

check() {
    echo "== gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')," \
        "device $DEVICE, preset $PRESET, ${TOTAL_SECONDS}s"
    install_wheels
    install_fastmtt
    log_versions
    local gpu
    gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr '[:upper:]' '[:lower:]' \
        | tr -cs 'a-z0-9' '-' | sed 's/-$//')"
    CSV="$OUT_DIR/${gpu:-$DEVICE}-$(date -u +%Y-%m-%d).csv"
    STATUS=()

    run_capped "CUDA parity tests (pytest -m cuda)" 90 "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider \
        tests/test_cuda.py tests/test_lora_linear.py tests/test_distributed.py
    # shellcheck disable=SC2086  # the shapes are KEY=VALUE words
    run_capped "fused linear MTT loss, $FUSED_SHAPE" 100 benchmark --ops fused_linear_mtt_loss \
        --shape $FUSED_SHAPE --exclude compile --modes forward+backward determinism
    # shellcheck disable=SC2086
    run_capped "LoRA training step: CE, MTTObjective live and cached, $STEP_SHAPE" 60 benchmark \
        --ops lora_train_step --shape $STEP_SHAPE
    # shellcheck disable=SC2086
    run_capped "MTT row kernel vs the copy bound, $ROW_SHAPE" 40 benchmark --ops mtt_loss --shape $ROW_SHAPE \
        --exclude compile --modes forward+backward
    # shellcheck disable=SC2086
    run_capped "LoRA linear vs x W^T, $LORA_SHAPE" 35 benchmark --ops lora_linear --shape $LORA_SHAPE \
        --modes forward forward+backward
    run_capped "the rest of preset $PRESET (other shapes and modes, torch.compile baselines)" 9999 benchmark \
        --preset "$PRESET"

    echo "== tables ($CSV)"
    if [ -s "$CSV" ]; then
        local plot=(--no-plot)
        "$PYTHON" -c "import matplotlib" 2>/dev/null && plot=() || echo "no matplotlib: tables only, no plots"
        "$PYTHON" -m benchmarks --table "$CSV" "${plot[@]}" || echo "tables failed (exit $?)"
    else
        echo "no rows measured"
    fi
    echo "== summary after ${SECONDS}s"
    printf '  %s\n' "${STATUS[@]}"
}

check 2>&1 | tee -a "$LOG"

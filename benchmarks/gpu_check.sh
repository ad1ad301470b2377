#!/usr/bin/env bash
# The one GPU check (H200, under 8 minutes, no network): device copy bandwidth and bf16 matmul rate,
# CUDA parity tests (pytest -m cuda) with real Triton kernels, then the benchmark sweep at the issues'
# sizes. Writes gpu_check.log, the results CSV and one PNG per op under $OUT (default
# benchmarks/results) and prints a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export TRITON_INTERPRET=0  # tests/conftest.py only sets it when unset: real kernels here
export PYTHONUNBUFFERED=1

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

check() {
    echo "== gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    install_fastmtt
    "$PYTHON" - <<'PY' || return 1
import sys, torch, triton, fastmtt, fastmtt.kernels.mtt_loss
from benchmarks.measure import measure_device_rates
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"fastmtt {fastmtt.__version__} from {fastmtt.__file__}")
print(f"device: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
rates = measure_device_rates(torch.device("cuda"))
print(f"copy bandwidth {rates.copy_gbps:.0f} GB/s (read + write), bf16 matmul {rates.matmul_tflops:.0f} TFLOP/s")
PY

    echo "== CUDA parity tests (pytest -m cuda)"
    timeout 150 "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider tests/
    local parity=$?

    echo "== benchmark sweep (preset gpu; tables in the log, CSV and plots beside it)"
    # mtt_loss last: it has the most cases, so a cut-short run still covers the other ops.
    timeout 270 "$PYTHON" -m benchmarks --device cuda --preset gpu --budget 0.3 --out "$OUT_DIR" \
        --ops fused_linear_mtt_loss lora_linear mtt_loss
    local sweep=$?

    echo "== summary: parity tests exit $parity, sweep exit $sweep (124: timed out, partial CSV kept)"
    local csv
    csv="$(ls -t "$OUT_DIR"/*.csv 2>/dev/null | grep -v '/cpu-' | head -n 1)"
    [ -n "$csv" ] && "$PYTHON" -m benchmarks --table "$csv"
    return $(( parity != 0 || sweep != 0 ))
}

check 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"

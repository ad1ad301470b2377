#!/usr/bin/env bash
# Download the peers that benchmarks/gpu_check.sh measures fastmtt against into .whl/ (git-ignored), as
# pure-Python wheels for the H200 machine's Python 3.12: that machine has no network, so the wheels travel
# with the working tree (name .whl in the device run's carry). Their requirements that are not extras are
# torch and triton, which that machine has; this script lists them so a new version's needs show.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
PEERS=(
    liger-kernel==0.8.5       # LigerFusedLinearCrossEntropyLoss, chunked_loss.LigerFusedLinearJSDLoss
    cut-cross-entropy==25.1.1 # linear_cross_entropy
)
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${PEERS[@]}"
for wheel in .whl/*.whl; do
    echo "$wheel requires: $(unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
        | sed 's/^Requires-Dist: //' | tr '\n' ' ')"
done

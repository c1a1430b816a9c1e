#!/usr/bin/env bash
# The one-script GPU check (docs/gpu.md): on a machine with one NVIDIA GPU, install hwnas into .venv
# (the Makefile's install), then build and validate the cuda latency tables of mbv2_tiny at batch 1
# and 32, search and retrain with mixed precision on texshapes (synthetic, no download), and measure
# the supernet's weight step against the standalone net. Writes <out>/gpu_check.json and .md.
#   launch/gpu_check.sh                      # on the GPU node; output in gpu_check/<date-time>/
#   launch/gpu_check.sh --out /scratch/chk   # elsewhere
#   GPU_CHECK_DRY_RUN=1 launch/gpu_check.sh  # no GPU: every step it can on the CPU, says what it would measure
#   srun --gres=gpu:1 --cpus-per-task=4 --time=00:15:00 launch/gpu_check.sh
# Exit status: 0 passed; 1 a step failed (the reason in one line); 3 passed, a goal not met.
# HWNAS_PYTHON=<python> skips the install and runs with that interpreter (an existing environment).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
if [[ -n "${HWNAS_PYTHON:-}" ]]; then
  py=$HWNAS_PYTHON
else
  venv=${VENV:-.venv}
  make -s VENV="$venv" "$venv/.hwnas-installed"
  py=$venv/bin/python
fi
install_seconds=$(( $(date +%s) - start ))
exec "$py" -m nas.bench.gpu_check --install-seconds "$install_seconds" "$@"

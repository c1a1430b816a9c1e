#!/usr/bin/env bash
# One search per latency target x device x seed, as a SLURM array (one CPU job each: latency is
# measured on the node's CPU / onnxruntime, so every job must run on the same node type).
#   launch/latency_sweep.sh <partition> [overrides...]
# After the array: nas-report multirun/search/latency_sweep_<date> prints one table across the jobs.
set -euo pipefail
partition=${1:?usage: $0 <partition> [nas-search overrides...]}
shift
exec nas-search -m hydra/launcher=slurm hydra.launcher.partition="$partition" \
  run_name="latency_sweep_$(date +%Y%m%d)" \
  hardware=cpu,onnxruntime 'strategy.targets=[0.3],[0.5],[0.7]' seed=0,1,2 "$@"

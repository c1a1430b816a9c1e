#!/usr/bin/env bash
# The same space and latency target searched by each strategy, 3 seeds each.
#   launch/strategy_compare.sh <partition> [overrides...]
set -euo pipefail
partition=${1:?usage: $0 <partition> [nas-search overrides...]}
shift
exec nas-search -m hydra/launcher=slurm hydra.launcher.partition="$partition" \
  run_name="strategy_compare_$(date +%Y%m%d)" \
  strategy=proxyless,ddpnas 'strategy.targets=[0.5]' seed=0,1,2 "$@"

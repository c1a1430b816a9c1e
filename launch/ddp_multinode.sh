#!/usr/bin/env bash
# One search with Lightning DDP on 2 nodes x 4 GPUs (8 processes). Every rank samples the same
# path and holds the same architecture parameters; only rank 0 writes the export.
#   launch/ddp_multinode.sh <partition> [overrides...]
set -euo pipefail
partition=${1:?usage: $0 <partition> [nas-search overrides...]}
shift
exec nas-search -m hydra/launcher=slurm hydra.launcher.partition="$partition" \
  run_name="ddp_$(date +%Y%m%d_%H%M)" \
  trainer=ddp trainer.accelerator=gpu trainer.devices=4 trainer.num_nodes=2 hardware=cuda "$@"

#!/usr/bin/env bash
# Multi-node (or multi-GPU) training with torchrun: run this once on every node, with the same RUN_ID.
# Rendezvous is by environment variables; everything after the script name goes to t2i-train.
#
#   node 0:  NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 MASTER_ADDR=10.0.0.1 RUN_ID=muge-tf \
#              experiments/launch/torchrun.sh experiment=muge_transformer resume=auto
#   node 1:  the same with NODE_RANK=1
#
#   NNODES          number of machines                      (default 1)
#   NODE_RANK       this machine's index, 0 .. NNODES-1      (default 0)
#   NPROC_PER_NODE  processes (GPUs) per machine             (default: the number of visible GPUs, else 1)
#   MASTER_ADDR     node 0's address, reachable by all nodes (default 127.0.0.1)
#   MASTER_PORT     a free TCP port on node 0                (default 29500)
#   RUN_ID          the run folder's name, the same on every node (default: the time on this node --
#                   give it explicitly when the nodes do not start within the same second)
#   TRAINER         trainer config: multinode (DDP) or fsdp  (default multinode)
#   PYTHON          interpreter with t2i installed           (default: python)
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TRAINER=${TRAINER:-multinode}
PYTHON=${PYTHON:-python}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
export T2I_RUN_ID=${RUN_ID:-${T2I_RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)}}

exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  -m t2i.cli.train trainer="$TRAINER" trainer.num_nodes="$NNODES" trainer.devices="$NPROC_PER_NODE" "$@"

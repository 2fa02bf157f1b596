#!/usr/bin/env bash
# Several nodes of GPUS GPUs: run the same command on every node (all see DATA; OUT on shared storage).
#   NNODES=4 RDZV=node01:29500 DATA=/shared/pile-tokens OUT=/shared/runs \
#     bash experiments/full_scale/launch_multi_node.sh mf-small
# The global batch stays 1024 sequences: grad_accum = 1024 / (batch_size x GPUS x NNODES).
# torchrun through memoryformer.train.distributed: SIGTERM / Ctrl-C checkpoint and exit 143 / 130
# (docs/distributed.md). OUT must be on shared storage: FSDP2 runs write one shard per rank.
set -euo pipefail
MODEL=${1:?usage: launch_multi_node.sh MODEL [train flags...]}; shift
HERE=$(cd "$(dirname "$0")" && pwd)
DATA=${DATA:?set DATA to the directory written by prepare_pile.sh}
OUT=${OUT:?set OUT to a run root on shared storage}
NNODES=${NNODES:?set NNODES}
RDZV=${RDZV:?set RDZV to host:port of one node (the rendezvous endpoint)}
GPUS=${GPUS:-8}
MICRO=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["batch_size"])' "$HERE/train/$MODEL.json")
WORLD=$((GPUS * NNODES))
ACCUM=$((1024 / (MICRO * WORLD)))
if (( ACCUM < 1 || ACCUM * MICRO * WORLD != 1024 )); then
  echo "1024 sequences per step cannot be split into $WORLD GPUs x $MICRO sequences; change batch_size (--batch-size) or the node count" >&2
  exit 1
fi
exec python -m memoryformer.train.distributed --nnodes "$NNODES" --nproc_per_node "$GPUS" --rdzv_id "${RDZV_ID:-$MODEL}" --rdzv_backend c10d \
  --rdzv_endpoint "$RDZV" -m memoryformer.cli train \
  --config "$HERE/configs/$MODEL.json" --train-config "$HERE/train/$MODEL.json" \
  --data "$DATA" --out "$OUT/$MODEL" --grad-accum "$ACCUM" --resume auto "$@"

#!/usr/bin/env bash
# One node, GPUS GPUs (default 8): train one of the paper's models or its twin on the prepared Pile.
#   DATA=/data/pile-tokens OUT=/runs bash experiments/full_scale/launch_single_node.sh mf-tiny
# MODEL: mf-tiny | mf-small | mf-base | pythia-70m | pythia-160m | pythia-410m. Extra arguments go to
# `memoryformer train` (e.g. --max-steps 143000 --min-lr-ratio 0.1, --wandb PROJECT). Rerunning resumes (--resume auto).
# torchrun through memoryformer.train.distributed: SIGTERM / Ctrl-C checkpoint and exit 143 / 130
# (docs/distributed.md).
set -euo pipefail
MODEL=${1:?usage: launch_single_node.sh MODEL [train flags...]}; shift
HERE=$(cd "$(dirname "$0")" && pwd)
DATA=${DATA:?set DATA to the directory written by prepare_pile.sh}
OUT=${OUT:-runs/full_scale}
GPUS=${GPUS:-8}
MICRO=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["batch_size"])' "$HERE/train/$MODEL.json")
ACCUM=$((1024 / (MICRO * GPUS)))
if (( ACCUM * MICRO * GPUS != 1024 )); then
  echo "1024 sequences per step cannot be split into $GPUS GPUs x $MICRO sequences; change GPUS or batch_size" >&2
  exit 1
fi
exec python -m memoryformer.train.distributed --standalone --nproc_per_node "$GPUS" -m memoryformer.cli train \
  --config "$HERE/configs/$MODEL.json" --train-config "$HERE/train/$MODEL.json" \
  --data "$DATA" --out "$OUT/$MODEL" --grad-accum "$ACCUM" --resume auto "$@"

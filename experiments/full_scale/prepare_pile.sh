#!/usr/bin/env bash
# Tokenise the deduplicated Pile with the Pythia tokenizer into one memory-mapped token directory.
#   OUT=/shared/pile-tokens bash experiments/full_scale/prepare_pile.sh
# Needs the network (Hugging Face Hub) and `pip install datasets`; about 207 B tokens -> 415 GB of
# uint16 train.bin. The Pythia tokenizer: the Hub name below, or a local tokenizers JSON such as
# a local pythia-70m-deduped tokenizer.json (TOKENIZER=path).
set -euo pipefail
OUT=${OUT:?set OUT to the output directory}
TOKENIZER=${TOKENIZER:-EleutherAI/pythia-70m-deduped}
SOURCE=${SOURCE:-hf:EleutherAI/the_pile_deduplicated@train}
exec memoryformer prepare "$SOURCE" --out "$OUT" --tokenizer "$TOKENIZER" \
  --val-fraction 0.0005 --seed 0 "$@"

#!/usr/bin/env bash
# The mini NMT recipe's long LSRA (egs/mini_l10n/nmt: ./run.sh --exp_dir exp_long --stage 4 --stop_stage 6
# --average_checkpoints 3 --configs conf/tuning/lite_transformer_mini_long.yaml), 128 test sentences, beam 5,
# best of 1 and 2 threads: stock vs the fast generator (float32), batch 1 and 32.
#   run.sh CKPT DATA
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
fairseq-accel-benchmark "$2" --path "$1" --systems stock fast --batch-sizes 1 32 --threads 1 2 --repeats 3 \
  --max-sentences 128 --remove-bpe sentencepiece --json "$here/benchmark.json" 2> "$here/benchmark.log" \
  | tee "$here/benchmark.md"

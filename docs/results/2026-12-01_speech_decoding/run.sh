#!/usr/bin/env bash
# The mini ASR recipe's long SAN-M (egs/mini_espeak/asr: ./run.sh --exp_dir exp_long --configs
# conf/tuning/s2t_sanm_mini_long.yaml, last checkpoints averaged) on its 150 test utterances:
#  1. the encoder with and without its batches' padding (batches of 32 in manifest order: mixed lengths), 1 thread;
#  2. beam search, stock vs the fast generator, batch 1 and 32, each at its best of 1 and 2 threads, with
#     utterances/s and the real-time factor.
#   run.sh CKPT DATA
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
fairseq-accel-benchmark-encoder "$2" --path "$1" --batch-size 32 --threads 1 --repeats 5 \
  2> "$here/encoder.log" | tee "$here/encoder.md"
fairseq-accel-benchmark "$2" --path "$1" --systems stock fast --batch-sizes 1 32 --threads 1 2 --repeats 3 \
  --remove-bpe sentencepiece --json "$here/decoding.json" 2> "$here/decoding.log" | tee "$here/decoding.md"

#!/usr/bin/env bash
# transformer_mini (the NMT mini recipe's model, calibrated compressed copy) on 128 test sentences, beam 5, best thread count:
# stock, fast fp32, fast with the compressed checkpoint's int8 layers (+ int8 caches), CTranslate2 fp32 / int8;
# the fairseq systems at their best of 1 and 2 threads, CTranslate2 at 1 (2 intra-threads are 5-10x slower here).
#   run.sh FLOAT_CKPT COMPRESSED_CKPT DATA
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
fairseq-accel-benchmark "$3" --path "$2" --ct2-from "$1" --systems stock fast fast-w8a8 fast-w8a8-kv8 ct2-float32 ct2-int8 \
  --batch-sizes 1 32 --threads 1 2 --ct2-threads 1 --repeats 3 --max-sentences 128 --remove-bpe sentencepiece \
  --json "$here/benchmark.json" 2> "$here/benchmark.log" | tee "$here/benchmark.md"

#!/usr/bin/env bash
# Sentence-parallel decoding (--accel-parallel sentences, the default): at 2 threads the fast generator decodes
# 2 shards of each batch, one thread each; fast-operations runs every operation on 2 threads instead (as before).
# Each system at its best of 1 and 2 threads, beam 5, the settings taking turns; CTranslate2 at 1 intra-thread
# and, at batch 32, also as 2 translators of one thread each (inter_threads 2: its own sentence parallelism).
#   run.sh TRANSFORMER_FLOAT_CKPT TRANSFORMER_COMPRESSED_CKPT NMT_DATA LSRA_CKPT SANM_CKPT ASR_DATA
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
common=(--batch-sizes 1 32 --threads 1 2 --repeats 3 --remove-bpe sentencepiece)
fairseq-accel-benchmark "$3" --path "$2" --ct2-from "$1" --max-sentences 128 "${common[@]}" \
  --systems stock fast fast-operations fast-w8a8-kv8 ct2-float32 ct2-int8 \
  --json "$here/transformer.json" 2> "$here/transformer.log" | tee "$here/transformer.md"
fairseq-accel-benchmark "$3" --path "$4" --max-sentences 128 "${common[@]}" --systems stock fast fast-operations \
  --json "$here/lsra.json" 2> "$here/lsra.log" | tee "$here/lsra.md"
fairseq-accel-benchmark "$6" --path "$5" "${common[@]}" --systems stock fast fast-operations \
  --json "$here/sanm.json" 2> "$here/sanm.log" | tee "$here/sanm.md"

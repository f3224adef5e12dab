#!/usr/bin/env bash
# int8 decoding against CTranslate2 int8 after the step buffers / thread grain change (2026-12-01, evening session):
#   run.sh short FLOAT_CKPT COMPRESSED_CKPT NMT_DATA RUN  the first 64 test sentences (8.2 tokens each), batch 1
#   run.sh all   FLOAT_CKPT COMPRESSED_CKPT NMT_DATA RUN  the 128 benchmark sentences, batch 1 and 32, as in
#                                                          docs/results/2026-12-01_native_search
# Each system at its best of 1 and 2 threads, beam 5, settings taking turns; CTranslate2 at 1 intra-thread (its best
# here: docs/results/2026-12-01_native_search/README.md) and, at batch 32, also as 2 translators of one thread each.
set -euo pipefail
here=${RESULTS_DIR:-$(cd "$(dirname "$0")" && pwd)}  # where the tables and logs go
case ${1:-} in
  short)
    fairseq-accel-benchmark "$4" --path "$3" --ct2-from "$2" --max-sentences 64 --batch-sizes 1 --threads 1 2 \
      --repeats 5 --remove-bpe sentencepiece --ct2-threads 1 --ct2-translators 1 --systems fast-w8a8-kv8 ct2-int8 \
      --json "$here/short_$5.json" 2> "$here/short_$5.log" | tee "$here/short_$5.md" ;;
  all)
    fairseq-accel-benchmark "$4" --path "$3" --ct2-from "$2" --max-sentences 128 --batch-sizes 1 32 --threads 1 2 \
      --repeats 3 --remove-bpe sentencepiece --ct2-threads 1 --ct2-translators 1 2 \
      --systems stock fast fast-w8a8-kv8 ct2-float32 ct2-int8 \
      --json "$here/transformer_$5.json" 2> "$here/transformer_$5.log" | tee "$here/transformer_$5.md" ;;
  *) echo "usage: $0 short|all FLOAT_CKPT COMPRESSED_CKPT NMT_DATA RUN" >&2; exit 2 ;;
esac

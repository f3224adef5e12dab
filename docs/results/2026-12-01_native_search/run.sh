#!/usr/bin/env bash
# The fast generator with its search loop in C++ and, for int8 models, fairseq's encoder in C++: each system at its
# best of 1 and 2 threads (sentence shards at 2), beam 5, 3 timed passes with the settings taking turns; CTranslate2
# at 1 intra-thread (2 intra-threads ran 5-10x slower on these 2-vCPU machines and, in a run of 2026-12-01, left
# the settings after them without their second core) and, at batch 32, also as 2 translators of one thread each.
#   run.sh transformer FLOAT_CKPT COMPRESSED_CKPT NMT_DATA
#   run.sh lsra LSRA_CKPT NMT_DATA
#   run.sh sanm SANM_CKPT ASR_DATA
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
common=(--batch-sizes 1 32 --threads 1 2 --repeats 3)  # NMT: --remove-bpe sentencepiece; speech: its config's
case $1 in
  transformer)
    fairseq-accel-benchmark "$4" --path "$3" --ct2-from "$2" --max-sentences 128 "${common[@]}" \
      --remove-bpe sentencepiece --ct2-threads 1 --ct2-translators 1 2 \
      --systems stock fast fast-operations fast-w8a8-kv8 ct2-float32 ct2-int8 \
      --json "$here/transformer.json" 2> "$here/transformer.log" | tee "$here/transformer.md" ;;
  lsra)
    fairseq-accel-benchmark "$3" --path "$2" --max-sentences 128 "${common[@]}" --remove-bpe sentencepiece \
      --systems stock fast fast-operations \
      --json "$here/lsra.json" 2> "$here/lsra.log" | tee "$here/lsra.md" ;;
  sanm)
    fairseq-accel-benchmark "$3" --path "$2" "${common[@]}" --systems stock fast fast-operations \
      --json "$here/sanm.json" 2> "$here/sanm.log" | tee "$here/sanm.md" ;;
  *) echo "usage: $0 transformer|lsra|sanm CHECKPOINT(S) DATA" >&2; exit 2 ;;
esac

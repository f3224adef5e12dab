#!/usr/bin/env bash
# Checks on this machine's `make demo` models (egs/mini_l10n/nmt/exp, the demo's short trainings), 2026-12-01 late:
#   run.sh int8_bleu NMT_DIR  the whole test set through fairseq-generate: transformer_mini in float32 and its
#                             calibrated int8 copy (stage 7's exp/transformer_mini/int8/compressed.pt: int8 layers
#                             and int8 self-attention cache), sacrebleu (13a) of each
#   run.sh lsra NMT_DIR       float32 lite_transformer_mini, stock vs fast, 128 test sentences, batch 1 and 32, each
#                             at its best of 1 and 2 threads
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
nmt=$(cd "${2:?usage: $0 int8_bleu|lsra NMT_DIR}" && pwd)
repo=$(cd "${here}/../../.." && pwd)
data=${nmt}/data/bin_unigram8000
case $1 in
  int8_bleu)
    text=$(mktemp -d)  # hypotheses and references, from the generate_*.txt kept here
    trap 'rm -rf "${text}"' EXIT
    for name in float int8; do
      checkpoint=${nmt}/exp/transformer_mini/checkpoints/checkpoint_best.pt extra=()
      [ "${name}" = int8 ] && checkpoint=${nmt}/exp/transformer_mini/int8/compressed.pt extra=(--kv-cache-dtype int8)
      fairseq-generate "${data}" --user-dir "${repo}/user_dir" --task translation_accel --path "${checkpoint}" \
        --gen-subset test --accel-generator fast --beam 5 --batch-size 64 --remove-bpe sentencepiece --cpu \
        "${extra[@]}" > "${here}/generate_${name}.txt" 2> "${here}/generate_${name}.log"
      grep '^H-' "${here}/generate_${name}.txt" | sed 's/^H-//' | sort -n -k1,1 | cut -f3 > "${text}/hyp_${name}.txt"
    done
    grep '^T-' "${here}/generate_float.txt" | sed 's/^T-//' | sort -n -k1,1 | cut -f2 > "${text}/ref.txt"
    for name in float int8; do
      echo "${name}: $(sacrebleu "${text}/ref.txt" -i "${text}/hyp_${name}.txt" -m bleu -b -w 2 -tok 13a)"
    done | tee "${here}/int8_bleu.txt" ;;
  lsra)
    fairseq-accel-benchmark "${data}" --path "${nmt}/exp/lite_transformer_mini/checkpoints/checkpoint_best.pt" \
      --systems stock fast --batch-sizes 1 32 --threads 1 2 --repeats 3 --max-sentences 128 \
      --remove-bpe sentencepiece --json "${here}/lsra.json" 2> "${here}/lsra.log" | tee "${here}/lsra.md" ;;
  *) echo "usage: $0 int8_bleu|lsra NMT_DIR" >&2; exit 2 ;;
esac

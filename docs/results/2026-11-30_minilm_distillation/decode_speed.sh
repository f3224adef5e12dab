#!/usr/bin/env bash
# Decoding speed of the teacher and the students on the same test set, taken in turn (A, B, C, D, A, B, ...),
# one thread, with the generate: section the recipe decodes with (fast generator, beam 5, batch 64).
# Prints one line per run: experiment, round, seconds and tokens/s of fairseq-generate's own timing.
#   docs/results/2026-11-30_minilm_distillation/decode_speed.sh ROUNDS EXP_DIR...   (from egs/mini_l10n/nmt)
set -euo pipefail
rounds=$1
shift
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
for round in $(seq "${rounds}"); do
  for exp in "$@"; do
    if [ -f "${exp}/checkpoints/checkpoint_average.pt" ]; then checkpoint=${exp}/checkpoints/checkpoint_average.pt
    else checkpoint=${exp}/checkpoints/checkpoint_best.pt; fi
    line=$(OMP_NUM_THREADS=1 fairseq-generate data/bin_unigram8000 --user-dir "${repo_root}/user_dir" \
      --task translation_accel --source-lang de --target-lang en --path "${checkpoint}" --gen-subset test \
      --accel-generator fast --beam 5 --batch-size 64 --remove-bpe sentencepiece --cpu 2>&1 | grep "Translated")
    echo "$(basename "${exp}") round ${round}: ${line#*Translated }"
  done
done

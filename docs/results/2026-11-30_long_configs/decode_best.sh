#!/usr/bin/env bash
# The long NMT configs decoded from checkpoint_best.pt instead of the recipe's average of the last 3 epoch
# checkpoints: the same fairseq-generate arguments as stage 5 (exp_long/<exp>/decode_test/generate.args), BLEU
# by sacrebleu on the detokenized hypotheses as in stage 6.
#   docs/results/2026-11-30_long_configs/decode_best.sh CLONE
set -euo pipefail
clone=$(cd "$1" && pwd)
export PATH="${clone}/.venv/bin:${PATH}"
cd "${clone}/egs/mini_l10n/nmt"
for exp in lite_transformer_mini_long transformer_mini_long; do
  dir=exp_long/${exp}/decode_test_best
  mkdir -p "${dir}"
  mapfile -t args < "exp_long/${exp}/decode_test/generate.args"
  OMP_NUM_THREADS=1 fairseq-generate data/bin_unigram8000 --user-dir "${clone}/user_dir" \
    --task translation_accel --path "exp_long/${exp}/checkpoints/checkpoint_best.pt" --gen-subset test "${args[@]}" > "${dir}/generate.txt" 2>&1
  grep '^H-' "${dir}/generate.txt" | sed 's/^H-//' | sort -n -k1,1 | cut -f3 > "${dir}/hyp.txt"
  echo "${exp} checkpoint_average.pt (stage 5): $(sacrebleu -b -w 2 -tok 13a exp_long/${exp}/decode_test/ref.txt \
    < "exp_long/${exp}/decode_test/hyp.txt") BLEU"
  echo "${exp} checkpoint_best.pt: $(sacrebleu -b -w 2 -tok 13a exp_long/${exp}/decode_test/ref.txt < "${dir}/hyp.txt") BLEU"
done

#!/usr/bin/env bash
# Similarity-aware (Pearson) activation calibration against the default (mse) on the 700-update mini LSRA:
# compress with each, then the teacher-forced valid loss with every linear layer int8 (4 valid batches) and
# the test BLEU decoded with every linear layer int8. Run from the repository root:
#   bash docs/results/2026-11-30_similarity_calibration/run.sh CKPT
set -euo pipefail
ckpt=$1
here=docs/results/2026-11-30_similarity_calibration
work=${WORK:-/tmp/similarity_calibration}
data=egs/mini_l10n/nmt/data/bin_unigram8000
mkdir -p "${work}"
export PATH=$PWD/.venv/bin:$PATH
mapfile -t generate < <(python egs/tools/yaml2args.py egs/mini_l10n/nmt/conf/lite_transformer_mini.yaml --section generate)
measure() {  # measure METHOD: compress, valid loss, test BLEU
  local method=$1
  /usr/bin/time -f "${method}: compress wall %e s" fairseq-accel-compress --path "${ckpt}" --data "${data}" \
    --calib-batches 5 --act-calib "${method}" --out "${work}/${method}.pt" > "${work}/compress_${method}.log" 2>&1
  tail -3 "${work}/compress_${method}.log"
  python docs/results/2026-11-30_int8_execution/valid_loss_by_layer_group.py "${work}/${method}.pt" "${data}" none \
    2> /dev/null | sed "s/^/${method}: valid loss, /"
  fairseq-generate "${data}" --user-dir user_dir --task translation_accel --path "${work}/${method}.pt" \
    --gen-subset test "${generate[@]}" --accel-generator fast --int8-min-weights 0 > "${work}/${method}.txt" 2>&1
  grep ^H- "${work}/${method}.txt" | sed "s/^H-//" | sort -n -k1,1 | cut -f3 > "${work}/${method}.hyp"
  grep ^T- "${work}/${method}.txt" | sed "s/^T-//" | sort -n -k1,1 | cut -f2 > "${work}/${method}.ref"
  echo "${method}: test BLEU, every linear layer int8: $(sacrebleu "${work}/${method}.ref" -i "${work}/${method}.hyp" -b -w 2)"
}
measure pearson > "${work}/pearson.out" &
pearson=$!
measure mse > "${work}/mse.out"
wait "${pearson}"
cat "${work}/pearson.out" "${work}/mse.out" | tee "${here}/results.txt"

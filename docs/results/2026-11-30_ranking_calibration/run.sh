#!/usr/bin/env bash
# Ranking-aware activation calibration (--act-calib ranking, arXiv 2106.14156 §3.3) beside mse (the default) and
# pearson on the 700-update mini LSRA: compress with each (every 2-D weight int8, 5 valid batches), then the
# teacher-forced valid loss with every linear layer int8 (4 valid batches) and the test BLEU decoded by the fast
# generator with every linear layer int8. Run from the repository root:
#   bash docs/results/2026-11-30_ranking_calibration/run.sh CKPT [METHOD[:GAMMA] ...]
# (default methods: mse pearson ranking:1 ranking:10; GAMMA is --ranking-weight)
set -euo pipefail
ckpt=$1; shift
if (( $# )); then methods=("$@"); else methods=(mse pearson ranking:1 ranking:10); fi
here=docs/results/2026-11-30_ranking_calibration
work=${WORK:-/tmp/ranking_calibration}
data=egs/mini_l10n/nmt/data/bin_unigram8000
mkdir -p "${work}"
export PATH=$PWD/.venv/bin:$PATH
mapfile -t generate < <(python egs/tools/yaml2args.py egs/mini_l10n/nmt/conf/lite_transformer_mini.yaml --section generate)
for spec in "${methods[@]}"; do
  method=${spec%%:*}
  weight=()
  [[ ${spec} == *:* ]] && weight=(--ranking-weight "${spec#*:}")
  name=${spec/:/_gamma}
  /usr/bin/time -f "${spec}: compress wall %e s" fairseq-accel-compress --path "${ckpt}" --data "${data}" \
    --calib-batches 5 --act-calib "${method}" "${weight[@]}" --out "${work}/${name}.pt" > "${work}/compress_${name}.log" 2>&1
  tail -1 "${work}/compress_${name}.log"
  python docs/results/2026-11-30_int8_execution/valid_loss_by_layer_group.py "${work}/${name}.pt" "${data}" none \
    2> /dev/null | sed "s/^/${spec}: valid loss, /"
  fairseq-generate "${data}" --user-dir user_dir --task translation_accel --path "${work}/${name}.pt" \
    --gen-subset test "${generate[@]}" --accel-generator fast --int8-min-weights 0 > "${work}/${name}.txt" 2>&1
  grep ^H- "${work}/${name}.txt" | sed "s/^H-//" | sort -n -k1,1 | cut -f3 > "${work}/${name}.hyp"
  grep ^T- "${work}/${name}.txt" | sed "s/^T-//" | sort -n -k1,1 | cut -f2 > "${work}/${name}.ref"
  echo "${spec}: test BLEU, every linear layer int8: $(sacrebleu "${work}/${name}.ref" -i "${work}/${name}.hyp" -b -w 2)"
done | tee "${here}/results.txt"

#!/usr/bin/env bash
# Post-training points of the long LSRA's size/BLEU curve (no fine-tune): every weight int8, every weight int4.
#   docs/results/2026-11-30_ten_x_long/ptq.sh BASE_CHECKPOINT   (from the repository root)
set -euo pipefail
base=$1
here=docs/results/2026-11-30_ten_x_long
R=$(pwd); DATA=$R/egs/mini_l10n/nmt/data/bin_unigram8000; out=/work/nmt_exp/long_ptq
export PATH=$R/.venv/bin:$PATH OMP_NUM_THREADS=1
mkdir -p $out
for point in int8 int4; do
  extra=(); [ $point = int4 ] && extra=(--int4 .)
  fairseq-accel-compress --path "$base" --out $out/$point.pt --data $DATA --user-dir $R/user_dir "${extra[@]}" \
      > $here/ptq_${point}_compress.log 2>&1
  docs/results/2026-11-30_int8_execution/decode.sh $out/$point.pt long_ptq_$point | tee $here/ptq_${point}_decode.log
done

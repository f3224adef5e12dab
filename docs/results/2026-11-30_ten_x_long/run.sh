#!/usr/bin/env bash
# The >= 10x point of issue 11 again, from the long LSRA (6 epochs, last 3 averaged: 49.51 BLEU): the recipe's
# compression fine-tune with conf/compress/sparse55_admm4_all.yaml (extra fairseq-train arguments override it),
# fairseq-accel-compress --int4 '.', and the recipe's decode of the base, the fine-tuned float model and the
# compressed model (int8 execution). From the repository root; writes /work/nmt_exp/NAME and NAME_* logs here.
#   docs/results/2026-11-30_ten_x_long/run.sh BASE_CHECKPOINT NAME [fairseq-train arguments]
set -euo pipefail
base=$1; name=$2; shift 2
here=docs/results/2026-11-30_ten_x_long
R=$(pwd); N=$R/egs/mini_l10n/nmt; DATA=$N/data/bin_unigram8000; out=/work/nmt_exp/$name
export PATH=$R/.venv/bin:$PATH OMP_NUM_THREADS=1
docs/results/2026-11-30_ten_x/ft.sh "$name" "$base" $N/conf/compress/sparse55_admm4_all.yaml "$@"
grep -E "valid on|sparsity|admm" $out/train.log | grep -v train_inner > $here/${name}_train_summary.log || true
fairseq-accel-compress --path $out/ckpt/checkpoint_last.pt --out $out/compressed.pt --data $DATA --int4 . \
    --user-dir $R/user_dir > $here/${name}_compress.log 2>&1
for kind in finetuned compressed; do
  case $kind in finetuned) ckpt=$out/ckpt/checkpoint_last.pt ;; compressed) ckpt=$out/compressed.pt ;; esac
  docs/results/2026-11-30_int8_execution/decode.sh "$ckpt" ${name}_$kind | tee $here/${name}_decode_$kind.log
done

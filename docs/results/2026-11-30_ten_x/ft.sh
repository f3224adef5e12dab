#!/bin/bash
# ft.sh NAME BASE_CKPT COMPRESS_YAML [extra]: fine-tune mini LSRA from BASE with the compress yaml over the lsra config
set -euo pipefail
name=$1; base=$2; comp=$3; shift 3
R=/work/main; N=$R/egs/mini_l10n/nmt; DATA=$N/data/bin_unigram8000
export PATH=$R/.venv/bin:$PATH PYTHONPATH=$R
out=/work/nmt_exp/$name; mkdir -p $out
mapfile -t cfg < <(python3 $R/egs/tools/yaml2args.py $N/conf/lite_transformer_mini.yaml --section train --override $comp)
s=$(date +%s)
fairseq-train $DATA --user-dir $R/user_dir --task translation_accel --save-dir $out/ckpt "${cfg[@]}" --finetune-from-model $base "$@" > $out/train.log 2>&1
echo "$name train $(( $(date +%s)-s ))s" | tee $out/summary.txt

#!/bin/bash
# ft_asr.sh NAME COMPRESS_YAML [extra]: fine-tune the demo SAN-M with the compress yaml over its config
set -euo pipefail
name=$1; comp=$2; shift 2
R=/work/main; A=/work/demo/egs/mini_espeak/asr
export PATH=$R/.venv/bin:$PATH PYTHONPATH=$R
out=/work/nmt_exp/$name; mkdir -p $out
cd $A
mapfile -t cfg < <(python3 $R/egs/tools/yaml2args.py $R/egs/mini_espeak/asr/conf/s2t_sanm_mini.yaml --section train --override $comp)
s=$(date +%s)
fairseq-train data/s2t --user-dir $R/user_dir --task speech_to_text_accel --config-yaml config.yaml --train-subset train --valid-subset dev --save-dir $out/ckpt "${cfg[@]}" --finetune-from-model $A/exp/s2t_sanm_mini/checkpoints/checkpoint_best.pt "$@" > $out/train.log 2>&1
echo "$name train $(( $(date +%s)-s ))s" | tee $out/summary.txt

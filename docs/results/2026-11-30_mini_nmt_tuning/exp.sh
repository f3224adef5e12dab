#!/usr/bin/env bash
# exp.sh NAME CONFIG [extra fairseq-train args]: train on the mini NMT data, decode test (fast, beam 5), BLEU
set -euo pipefail
name=$1; config=$2; shift 2
R=/work/main; N=$R/egs/mini_l10n/nmt; DATA=${DATA:-$N/data/bin_unigram8000}
export PATH=$R/.venv/bin:$PATH PYTHONPATH=$R
out=/work/nmt_exp/$name; mkdir -p $out
mapfile -t cfg < <(python3 $R/egs/tools/yaml2args.py $config --section train)
mapfile -t gcfg < <(python3 $R/egs/tools/yaml2args.py $config --section generate)
start=$(date +%s)
fairseq-train $DATA --user-dir $R/user_dir --task translation_accel --save-dir $out/ckpt "${cfg[@]}" "$@" > $out/train.log 2>&1
t1=$(date +%s)
fairseq-generate $DATA --user-dir $R/user_dir --task translation_accel --path $out/ckpt/checkpoint_best.pt --gen-subset test "${gcfg[@]}" > $out/gen.txt 2>&1
grep ^H- $out/gen.txt | sed "s/^H-//" | sort -n -k1,1 | cut -f3 > $out/hyp.txt; grep ^T- $out/gen.txt | sed "s/^T-//" | sort -n -k1,1 | cut -f2 > $out/ref.txt
bleu=$(sacrebleu $out/ref.txt -i $out/hyp.txt -b -w 2)
echo "$name train $((t1-start))s bleu $bleu $(grep -o 'num_updates [0-9]*' $out/train.log | tail -n1) $(grep 'valid on' $out/train.log | tail -n1 | grep -o '| loss [0-9.]*')" | tee $out/summary.txt

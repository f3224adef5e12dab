#!/usr/bin/env bash
# dec.sh CKPT OUTNAME [extra generate args]: decode the mini NMT test set with the recipe's generate options, BLEU
set -euo pipefail
ckpt=$1; name=$2; shift 2
R=/work/main; N=$R/egs/mini_l10n/nmt; DATA=${DATA:-$N/data/bin_unigram8000}
export PATH=$R/.venv/bin:$PATH PYTHONPATH=$R
mapfile -t gcfg < <(python3 $R/egs/tools/yaml2args.py $N/conf/lite_transformer_mini.yaml --section generate)
out=/work/scratch/dec_$name; mkdir -p $out
start=$(date +%s.%N)
fairseq-generate $DATA --user-dir $R/user_dir --task translation_accel --path $ckpt --gen-subset test "${gcfg[@]}" "$@" > $out/gen.txt 2>&1
end=$(date +%s.%N)
grep ^H- $out/gen.txt | sed "s/^H-//" | sort -n -k1,1 | cut -f3 > $out/hyp.txt; grep ^T- $out/gen.txt | sed "s/^T-//" | sort -n -k1,1 | cut -f2 > $out/ref.txt
echo "$name bleu $(sacrebleu $out/ref.txt -i $out/hyp.txt -b -w 2) wall $(echo "$end - $start" | bc) $(grep -o 'int8: [0-9]* linear' $out/gen.txt || true) $(grep -o 'Translated.*' $out/gen.txt)"

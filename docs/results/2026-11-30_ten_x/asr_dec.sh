#!/usr/bin/env bash
# asr_dec.sh CKPT NAME [options]: CTC best-path decode of the mini ASR test set, WER and CER (no spaces)
set -euo pipefail
ckpt=$1; name=$2; shift 2
out=/work/scratch/asr_$name; mkdir -p $out
fairseq-generate data/s2t --config-yaml config.yaml --gen-subset test --task speech_to_text_accel --user-dir /work/main/user_dir \
  --path $ckpt --accel-generator ctc_greedy --max-tokens 50000 --scoring wer --cpu "$@" > $out/gen.txt 2>&1
python3 - $out/gen.txt <<'PY'
import sys, jiwer
lines = open(sys.argv[1]).read().splitlines()
hyp = {l.split("\t")[0][2:]: l.split("\t")[-1] for l in lines if l.startswith("D-")}
ref = {l.split("\t")[0][2:]: l.split("\t")[-1] for l in lines if l.startswith("T-")}
ids = sorted(ref)
r = [ref[i] for i in ids]; h = [hyp.get(i, "") for i in ids]
print(f"utterances {len(ids)} WER {100*jiwer.wer(r, h):.2f} CER {100*jiwer.cer([x.replace(' ', '') for x in r], [x.replace(' ', '') for x in h]):.2f}")
PY
grep -o "int8: [0-9]* linear" $out/gen.txt || true

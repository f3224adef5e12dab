#!/usr/bin/env bash
# The int8 attention path (issue 11) on the 700-update mini LSRA (40.06 test BLEU in float32):
# one compressed checkpoint with calibrated output ranges, and the same checkpoint with the ranges removed
# (so its int8 caches quantize keys/values per token from float32, as before), decoded and benchmarked.
# Run from the repository root: bash docs/results/2026-11-30_int8_attention/run.sh CKPT
set -euo pipefail
ckpt=$1
here=docs/results/2026-11-30_int8_attention
work=${WORK:-/tmp/int8_attention}
data=egs/mini_l10n/nmt/data/bin_unigram8000
mkdir -p "${work}"
export PATH=$PWD/.venv/bin:$PATH
fairseq-accel-compress --path "${ckpt}" --data "${data}" --calib-batches 5 --out "${work}/levels.pt" \
  2>&1 | tail -4 | tee "${here}/compress.log"
python - "${work}/levels.pt" "${work}/per_token.pt" <<'PY'
import sys
from pathlib import Path
import fairseq_accel.plugin  # noqa: F401
from fairseq_accel.compat.checkpoint_files import COMPRESSED_KEY, write_checkpoint
from fairseq_accel.compat.checkpoint_loading import read_checkpoint
state = read_checkpoint(sys.argv[1])
removed = state[COMPRESSED_KEY]["activations"].pop("output_absmax")
print(f"removed the output ranges of {len(removed)} layers")
write_checkpoint(state, Path(sys.argv[2]))
PY
mapfile -t generate < <(python egs/tools/yaml2args.py egs/mini_l10n/nmt/conf/lite_transformer_mini.yaml --section generate)
decode() {  # decode NAME CKPT [options]: test BLEU through fairseq-generate
  local name=$1 path=$2; shift 2
  fairseq-generate "${data}" --user-dir user_dir --task translation_accel --path "${path}" --gen-subset test \
    "${generate[@]}" --accel-generator fast --int8-min-weights 0 "$@" > "${work}/${name}.txt" 2>&1
  grep ^H- "${work}/${name}.txt" | sed "s/^H-//" | sort -n -k1,1 | cut -f3 > "${work}/${name}.hyp"
  grep ^T- "${work}/${name}.txt" | sed "s/^T-//" | sort -n -k1,1 | cut -f2 > "${work}/ref.txt"
  echo "${name}: BLEU $(sacrebleu "${work}/ref.txt" -i "${work}/${name}.hyp" -b -w 2)" \
    "$(grep -o 'int8 attention path: [0-9]* attention layers' "${work}/${name}.txt" || echo 'no int8 attention path')"
}
{
  decode fp32_cache "${work}/levels.pt"
  decode levels_self "${work}/levels.pt" --kv-cache-dtype int8
  decode levels_self_cross "${work}/levels.pt" --kv-cache-dtype int8 --quantize-cross-kv
  decode per_token_self "${work}/per_token.pt" --kv-cache-dtype int8
  decode per_token_self_cross "${work}/per_token.pt" --kv-cache-dtype int8 --quantize-cross-kv
} | tee "${here}/decode.txt"
for name in levels per_token; do
  fairseq-accel-benchmark "${data}" --path "${work}/${name}.pt" --remove-bpe sentencepiece --batch-sizes 1 32 \
    --max-sentences 100 --int8-min-weights 0 --systems fast-w8a8 fast-w8a8-kv8 fast-w8a8-kv8-cross \
    --json "${here}/benchmark_${name}.json" > "${here}/benchmark_${name}.md" 2> "${work}/benchmark_${name}.log"
done

#!/usr/bin/env bash
# Offline mini recipe: German->English translation of real software messages (the machine's gettext
# catalogs, /usr/share/locale/de/LC_MESSAGES/*.mo), Lite Transformer (LSRA) against a stock fairseq
# transformer of matched Mult-Adds. Needs no download; `make demo` runs it.
#
# Stages (run a range with --stage N --stop-stage M; finished stages leave .done markers and are
# skipped when the recipe runs again; an interrupted training resumes from checkpoint_last.pt):
#   1  extract, clean, dedup and split (de, en) pairs from the catalogs (fairseq-accel-prepare gettext)
#   2-6 the shared NMT pipeline (egs/tools/nmt.sh): joint sentencepiece unigram model,
#      fairseq-preprocess (joined dictionary), fairseq-train per config, fairseq-generate (beam 5),
#      sacrebleu BLEU/chrF and one results table (exp/RESULTS.md)
#   7  decoding speed: fairseq-accel-benchmark of the --bench_configs checkpoints on the first
#      --bench_sentences test sentences (stock SequenceGenerator, the fast generator with fp32 and int8
#      caches, CTranslate2 for a stock transformer), batch 1 and 32, beam 5 (exp/<config name>/BENCHMARK.md)
#
# The default configs fit the demo budget (a few minutes of CPU each); conf/tuning/*_long.yaml train
# longer and score higher:
#   ./run.sh --configs "conf/tuning/lite_transformer_mini_long.yaml conf/tuning/transformer_mini_long.yaml"
set -euo pipefail

stage=1                 # first stage to run
stop_stage=100          # last stage to run
locale_dir=/usr/share/locale  # root of the gettext catalogs
configs="conf/lite_transformer_mini.yaml conf/transformer_mini.yaml"  # experiments (space separated)
data_dir=data           # text, sentencepiece and binarized data
exp_dir=exp             # experiments: <exp_dir>/<config name>/
bpe_type=unigram        # sentencepiece model type (unigram or bpe)
bpe_vocab_size=8000     # joint sentencepiece vocabulary
nj=2                    # parallel jobs for sentencepiece and binarization
train_args=""           # extra fairseq-train arguments for every config, e.g. "--max-update 50"
decode_args=""          # extra fairseq-generate arguments for every config
gen_subset=test         # split decoded (test or valid)
bench_configs="conf/transformer_mini.yaml"  # experiments whose decoding speed stage 7 measures
bench_sentences=100     # test sentences the stage-7 benchmark decodes (0: all)
bench_args="--threads 2 --ct2-threads 1 --repeats 3"  # thread counts measured best here (see the README)

recipe_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tools_dir="${recipe_dir}/../../tools"
. "${tools_dir}/recipe.sh"
cd "${recipe_dir}"  # configs and data are relative to the recipe
export PYTHONPATH="${PYTHONPATH:+${PYTHONPATH}:}$(cd "${recipe_dir}/../../.." && pwd)"  # the checkout's plugin, if not installed
text_dir="${data_dir}/text"

if in_stage 1; then
  log "Stage 1: (de, en) pairs from ${locale_dir}/de/LC_MESSAGES into ${text_dir}"
  if ! stage_done "${text_dir}/.done" "Stage 1"; then
    require fairseq-accel-prepare
    fairseq-accel-prepare gettext --locale-dir "${locale_dir}" --src-lang de --tgt-lang en \
      --out-dir "${text_dir}"
    touch "${text_dir}/.done"
  fi
fi

"${tools_dir}/nmt.sh" --stage "${stage}" --stop_stage "${stop_stage}" --src de --tgt en \
  --text_dir "${text_dir}" --data_dir "${data_dir}" --exp_dir "${exp_dir}" --configs "${configs}" \
  --bpe_type "${bpe_type}" --bpe_vocab_size "${bpe_vocab_size}" --joined_dictionary true --bleu_tokenize 13a \
  --nj "${nj}" --train_args "${train_args}" --decode_args "${decode_args}" --gen_subset "${gen_subset}"

if in_stage 7; then
  log "Stage 7: decoding speed of each experiment on ${gen_subset} (fairseq-accel-benchmark)"
  read -r -a bench_list <<< "${bench_configs}"
  for config in "${bench_list[@]}"; do
    exp="${exp_dir}/$(basename "${config}" .yaml)"
    stage_done "${exp}/.benchmark.done" "benchmark of ${exp}" && { cat "${exp}/BENCHMARK.md"; continue; }
    require fairseq-accel-benchmark
    # shellcheck disable=SC2086  # ${bench_args} holds several arguments
    fairseq-accel-benchmark "${data_dir}/bin_${bpe_type}${bpe_vocab_size}" \
      --path "${exp}/checkpoints/checkpoint_best.pt" --gen-subset "${gen_subset}" --remove-bpe sentencepiece \
      --batch-sizes 1 32 --beam 5 --max-sentences "${bench_sentences}" --json "${exp}/benchmark.json" \
      ${bench_args} | tee "${exp}/BENCHMARK.md"
    touch "${exp}/.benchmark.done"
  done
fi

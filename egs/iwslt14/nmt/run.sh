#!/usr/bin/env bash
# IWSLT'14 German->English with the Lite Transformer (LSRA), following fairseq's IWSLT'14 example
# and the Lite Transformer paper (arXiv:2004.11886).
#
# Stages (run a range with --stage N --stop-stage M; finished stages leave a .done marker and are
# skipped when the recipe runs again, so delete the marker to redo one):
#   0  download de-en.tgz (or give a local copy with --orig_tgz, or the extracted folder with --orig_dir)
#   1  extract it; tokenize, clean, lowercase and split (fairseq-accel-prepare iwslt14)
#   2-6 the shared NMT pipeline (egs/tools/nmt.sh): joint sentencepiece BPE, fairseq-preprocess
#      (separate dictionaries), fairseq-train, the average of the last 10 epoch checkpoints (as the paper;
#      --average_checkpoints 0 decodes the best one), fairseq-generate (beam 4), BLEU on tokenized text
#   8  compression (egs/tools/nmt.sh): fine-tune the trained --config model (10k updates) with each of
#      --compress_configs (conf/compress/), decode, add the rows to exp/RESULTS.md
#   9  sparsity sweep (egs/tools/nmt.sh): exp/<config name>/sparsity_sweep.{md,json,png}
#   10 post-training compression (egs/tools/nmt.sh): int8 checkpoints of the trained model and of each stage-8
#      fine-tune (calibration on valid), decoded in int8: exp/COMPRESSION.md and exp/compression.png
# Stages 8-10 are not run by default (stop_stage 6); after training, e.g.:
#   ./run.sh --stage 8 --stop_stage 10
#
# The console shows one line per stage, progress bars and the tables; the full output of each command is
# in its log: data/tok/prepare.log, data/spm_*/spm.log, data/bin_*/binarize.log, exp/<config>/train.log,
# exp/<config>/decode_<subset>/generate.txt, exp/<config>/profile.log (--verbose true: all on the console).
#
# Relative paths are taken from the current directory (--config also from this recipe's folder).
# Example:  cd egs/iwslt14/nmt && ./run.sh --orig_tgz ~/corpora/de-en.tgz --nj 8
set -euo pipefail

stage=0                 # first stage to run
stop_stage=6            # last stage to run (8-10, compression, on request)
nj=4                    # parallel jobs for tokenization, BPE training and binarization
config=conf/lite_transformer_iwslt_de_en_160.yaml  # experiment config (train: and generate: sections)
url=http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz  # the archive fairseq's example uses
download_dir=downloads  # where de-en.tgz is downloaded and extracted
orig_tgz=""             # a local de-en.tgz to use instead of downloading
orig_dir=""             # an already extracted de-en folder to use instead of de-en.tgz
data_dir=data           # text, BPE and binarized data
exp_dir=exp             # experiments: <exp_dir>/<config name>/
bpe_vocab_size=10000    # joint sentencepiece vocabulary (fairseq's example: 10k BPE merges)
train_args=""           # extra fairseq-train arguments, e.g. "--max-update 100 --cpu"
decode_args=""          # extra fairseq-generate arguments, e.g. "--cpu"
average_checkpoints=10  # decode the average of the last N epoch checkpoints (the paper: 10; 0: the best checkpoint)
train_jobs=1            # trainings run at a time (more only on a CPU machine with cores to split)
gen_subset=test         # split decoded in stage 5 (test or valid)
compress_base=""        # trained experiment that stages 8-9 fine-tune (default: --config)
compress_configs="conf/compress/sparse50.yaml conf/compress/sparse_2of4.yaml conf/compress/sparse_row50.yaml conf/compress/admm8.yaml conf/compress/sparse50_admm8.yaml"  # compression fine-tunes of stage 8
compress_args=""        # extra fairseq-train arguments for the fine-tunes of stages 8-9 (train_args are not used there)
sweep_config=conf/compress/sparse50.yaml  # budget and schedule of every sparsity sweep point (stage 9)
quantize_args=""        # extra fairseq-accel-compress arguments of stage 10 (post-training compression)
sweep_sparsities="0 50 70 80 90"  # sparsities (%) of the sweep
sweep_patterns="unstructured row 2:4"  # sweep patterns; an N:M pattern has one point, at sparsity 1-N/M
verbose=false           # show the full output of every command on the console (it always goes to the logs)

printf -v recipe_cmd '%q ' "$0" "$@"  # this command line, quoted in the sparsity sweep's table

recipe_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tools_dir="${recipe_dir}/../../tools"
. "${tools_dir}/recipe.sh"
if [ ! -f "${config}" ] && [ -f "${recipe_dir}/${config}" ]; then
  config="${recipe_dir}/${config}"
fi
compress_base="${compress_base:-${config}}"
for option in compress_configs sweep_config; do  # relative to this recipe's folder, like --config
  resolved=""
  for file in ${!option}; do
    if [ ! -f "${file}" ] && [ -f "${recipe_dir}/${file}" ]; then file="${recipe_dir}/${file}"; fi
    resolved="${resolved:+${resolved} }${file}"
  done
  printf -v "${option}" '%s' "${resolved}"
done
export PYTHONPATH="${PYTHONPATH:+${PYTHONPATH}:}$(cd "${recipe_dir}/../../.." && pwd)"  # the checkout's plugin, if not installed
tok_dir="${data_dir}/tok"  # tokenized, lowercased text (stage 1)
if [ -z "${orig_dir}" ]; then
  orig_dir="${download_dir}/de-en"
  orig_tgz="${orig_tgz:-${download_dir}/de-en.tgz}"
fi

if in_stage 0; then
  log "Stage 0: get de-en.tgz"
  if [ -d "${orig_dir}" ] && [ "${orig_dir}" != "${download_dir}/de-en" ]; then
    log "using the extracted folder ${orig_dir}"
  elif [ -f "${orig_tgz}" ]; then
    log "using ${orig_tgz}"
  else
    mkdir -p "${download_dir}"
    download "${url}" "${orig_tgz}"
  fi
fi

if in_stage 1; then
  log "Stage 1: extract and prepare IWSLT'14 de-en text in ${tok_dir}"
  if ! stage_done "${tok_dir}/.done" "Stage 1"; then
    if [ ! -d "${orig_dir}" ]; then
      if [ ! -f "${orig_tgz}" ]; then
        log "error: neither ${orig_dir} nor ${orig_tgz} exists; run stage 0 or pass --orig_tgz/--orig_dir"
        exit 2
      fi
      mkdir -p "$(dirname "${orig_dir}")"
      log "extracting ${orig_tgz}"
      tar -xzf "${orig_tgz}" -C "$(dirname "${orig_dir}")" de-en
    fi
    require fairseq-accel-prepare
    run_logged "${tok_dir}/prepare.log" -- \
      fairseq-accel-prepare iwslt14 --orig-dir "${orig_dir}" --out-dir "${tok_dir}" --jobs "${nj}"
    touch "${tok_dir}/.done"
  fi
fi

# Separate source and target dictionaries, as in fairseq's IWSLT'14 example (the paper's IWSLT models
# do not share embeddings). sentencepiece BPE stands in for subword-nmt; its normalisation is off, so
# `--remove-bpe sentencepiece` restores the tokenized lowercased text that BLEU is computed on.
"${tools_dir}/nmt.sh" --stage "${stage}" --stop_stage "${stop_stage}" --src de --tgt en \
  --text_dir "${tok_dir}" --data_dir "${data_dir}" --exp_dir "${exp_dir}" --configs "${config}" \
  --bpe_type bpe --bpe_vocab_size "${bpe_vocab_size}" --joined_dictionary false --bleu_tokenize none \
  --nj "${nj}" --train_args "${train_args}" --decode_args "${decode_args}" --average_checkpoints "${average_checkpoints}" --train_jobs "${train_jobs}" --gen_subset "${gen_subset}" \
  --compress_base "${compress_base}" --compress_configs "${compress_configs}" \
  --compress_args "${compress_args}" --quantize_args "${quantize_args}" \
  --sweep_config "${sweep_config}" --sweep_sparsities "${sweep_sparsities}" \
  --sweep_patterns "${sweep_patterns}" \
  --recipe_cmd "${recipe_cmd}" --verbose "${verbose}"

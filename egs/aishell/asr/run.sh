#!/usr/bin/env bash
# AISHELL-1 Mandarin speech recognition with SAN-M (Gao et al. 2020, arXiv:2006.01713: 6.46% test CER
# without a language model). Characters are the output units and CER the metric.
#
# Stages (run a range with --stage N --stop-stage M; finished stages leave .done markers and are
# skipped when the recipe runs again; an interrupted training resumes from checkpoint_last.pt):
#   0  download data_aishell.tgz and resource_aishell.tgz (OpenSLR resource 33), or use --aishell_dir
#   1  extract, pair transcripts with audio, transcripts -> characters (fairseq-accel-prepare aishell)
#   2-5 the shared ASR pipeline (egs/tools/asr.sh): fbank + CMVN + speed perturbation + character
#      units + manifests, fairseq-train, the average of the last 10 epoch checkpoints
#      (--average_checkpoints 0 decodes the best one), fairseq-generate, jiwer CER/WER table
#   6  compression (egs/tools/asr.sh): fine-tune the trained --compress_base model (25k updates) with each of
#      --compress_configs (conf/compress/), decode, add the rows to exp/RESULTS.md
#   7  sparsity sweep (egs/tools/asr.sh): CER against sparsity in exp/<base>/sparsity_sweep.{md,json,png}
#   8  post-training compression (egs/tools/asr.sh): int8 checkpoints of the trained model and of each stage-6
#      fine-tune (calibration on dev), decoded in int8: exp/COMPRESSION.md and exp/compression.png
# Stages 6-8 are not run by default (stop_stage 5); after training, e.g.:
#   ./run.sh --stage 6 --stop_stage 8
#
# The console shows one line per stage, progress bars and the tables; the full output of each command is
# in its log: data/prepare.log, data/s2t/prepare.log, exp/<config>/train.log,
# exp/<config>/decode_test/generate.txt (--verbose true: all on the console).
#
# Example (GPU recommended):  cd egs/aishell/asr && ./run.sh --download_dir /data/openslr33
set -euo pipefail

stage=0                 # first stage to run
stop_stage=5            # last stage to run (6-8, compression, on request)
url=https://www.openslr.org/resources/33  # OpenSLR resource 33 (AISHELL-1)
download_dir=downloads  # where the archives are downloaded and extracted
aishell_dir=""          # an already extracted data_aishell folder to use instead of downloading
configs="conf/s2t_sanm_s.yaml"  # experiments (space separated)
data_dir=data           # Kaldi data directories and fairseq manifests
exp_dir=exp             # experiments: <exp_dir>/<config name>/
nj=8                    # parallel jobs for extraction and feature computation
train_args=""           # extra fairseq-train arguments for every config
decode_args=""          # extra fairseq-generate arguments for every config
average_checkpoints=10  # decode the average of the last N epoch checkpoints (the configs keep 10; 0: the best checkpoint)
train_jobs=1            # trainings run at a time (more only on a CPU machine with cores to split)
compress_base=conf/s2t_sanm_s.yaml  # trained experiment that stages 6-7 fine-tune
compress_configs="conf/compress/sparse50.yaml conf/compress/sparse_2of4.yaml conf/compress/sparse_row50.yaml conf/compress/admm8.yaml conf/compress/sparse50_admm8.yaml"  # compression fine-tunes of stage 6
compress_args=""        # extra fairseq-train arguments for the fine-tunes of stages 6-7 (train_args are not used there)
sweep_config=conf/compress/sparse50.yaml  # budget and schedule of every sparsity sweep point (stage 7)
quantize_args=""        # extra fairseq-accel-compress arguments of stage 8 (post-training compression)
sweep_sparsities="0 50 70 80 90"  # sparsities (%) of the sweep
sweep_patterns="unstructured row 2:4"  # sweep patterns; an N:M pattern has one point, at sparsity 1-N/M
verbose=false           # show the full output of every command on the console (it always goes to the logs)

printf -v recipe_cmd '%q ' "$0" "$@"  # this command line, quoted in the sparsity sweep's table

recipe_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tools_dir="${recipe_dir}/../../tools"
. "${tools_dir}/recipe.sh"
if [ ! -f "${configs%% *}" ] && [ -f "${recipe_dir}/${configs%% *}" ]; then
  cd "${recipe_dir}"  # configs given relative to the recipe
fi
export PYTHONPATH="${PYTHONPATH:+${PYTHONPATH}:}$(cd "${recipe_dir}/../../.." && pwd)"  # the checkout's plugin, if not installed
aishell_dir="${aishell_dir:-${download_dir}/data_aishell}"

if in_stage 0; then
  log "Stage 0: get AISHELL-1 into ${download_dir}"
  if [ -d "${aishell_dir}/wav" ]; then
    log "using ${aishell_dir}"
  else
    mkdir -p "${download_dir}"
    for archive in data_aishell.tgz resource_aishell.tgz; do
      [ -f "${download_dir}/${archive}" ] || download "${url}/${archive}" "${download_dir}/${archive}"
      tar -xzf "${download_dir}/${archive}" -C "${download_dir}"
    done
  fi
fi

if in_stage 1; then
  log "Stage 1: Kaldi data directories from ${aishell_dir} into ${data_dir}"
  if ! stage_done "${data_dir}/.prepare.done" "Stage 1"; then
    if [ ! -d "${aishell_dir}" ]; then
      log "error: ${aishell_dir} not found; run stage 0 or pass --aishell_dir /path/to/data_aishell"
      exit 2
    fi
    run_logged "${data_dir}/prepare.log" --desc unpack --fraction --unit archive -- \
      fairseq-accel-prepare aishell --aishell-dir "${aishell_dir}" --out-dir "${data_dir}"
    touch "${data_dir}/.prepare.done"
  fi
fi

"${tools_dir}/asr.sh" --stage "${stage}" --stop_stage "${stop_stage}" \
  --kaldi_dir "${data_dir}" --train_set train --valid_set dev --test_set test --s2t_dir "${data_dir}/s2t" \
  --exp_dir "${exp_dir}" --configs "${configs}" --unit char --nj "${nj}" \
  --train_args "${train_args}" --decode_args "${decode_args}" --average_checkpoints "${average_checkpoints}" --train_jobs "${train_jobs}" --sweep_metric cer \
  --compress_base "${compress_base}" --compress_configs "${compress_configs}" \
  --compress_args "${compress_args}" --quantize_args "${quantize_args}" \
  --sweep_config "${sweep_config}" --sweep_sparsities "${sweep_sparsities}" \
  --sweep_patterns "${sweep_patterns}" \
  --recipe_cmd "${recipe_cmd}" --verbose "${verbose}"

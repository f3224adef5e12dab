#!/usr/bin/env bash
# Offline mini ASR recipe: English speech synthesized with espeak-ng from real sentences (the English
# side of the machine's gettext catalogs), several voices, variants, rates and pitches, with the test
# voices and sentences held out of training. SAN-M against a stock fairseq s2t_transformer of matched
# parameters, both trained with joint CTC + attention and decoded by their CTC head
# (--accel-generator ctc_greedy). Needs no download; `make demo` runs it.
#
# The demo budget (500 updates per model, a few minutes each on 2 cores) was set by measurement
# (s2t_sanm_mini, dev CTC CER after 500 updates): 300 unigram pieces, LFR step 6, noisy train audio: 80 %;
# characters with LFR step 4 (25 frames/s, enough frames per character for CTC): 43 %; and clean train
# audio: 31 %; lr 3e-3 and dropout 0: 28 %. Attention beam search of such a model: 159 % test CER (it loops),
# CTC best path: 31 %. Runs and raw output: docs/results/2026-11-29_mini_asr_tuning/ and RESULTS.md.
#
# The console shows one line per stage, progress bars and the tables; the full output of each command is
# in its log: data/prepare.log, data/s2t/prepare.log, exp/<config>/train.log,
# exp/<config>/decode_test/generate.txt. A failing command prints the end of its log and the log's path;
# --verbose true shows everything on the console.
#
# Stages (run a range with --stage N --stop-stage M; finished stages leave .done markers and are
# skipped when the recipe runs again; an interrupted training resumes from checkpoint_last.pt):
#   0  check that espeak-ng is installed (apt-get install espeak-ng)
#   1  synthesize the corpus as Kaldi-style data directories (fairseq-accel-prepare espeak)
#   2-5 the shared ASR pipeline (egs/tools/asr.sh): fbank + CMVN + speed perturbation + sentencepiece
#      units + manifests, fairseq-train per config, fairseq-generate (CTC best path), jiwer WER/CER table
#   6  compression (egs/tools/asr.sh): fine-tune the trained --compress_base model (250 updates) with each of
#      --compress_configs (conf/compress/: 50 % unstructured, 2:4 and row sparsity, 8-bit ADMM, 50 % + ADMM,
#      65 % + 4-bit ADMM of everything: the >= 10x model),
#      decode it like the base, add its row with the sparsity reached to exp/RESULTS.md
#      (exp/<base>__<compress name>/)
#   7  sparsity sweep (egs/tools/asr.sh): the same fine-tune at 0 (no pruning), 50, 70, 80, 90 % unstructured
#      and row sparsity and 2:4, CER against sparsity in exp/<base>/sparsity_sweep.{md,json,png}
#   8  post-training compression (egs/tools/asr.sh): fairseq-accel-compress of the --compress_base model and
#      of each fine-tune stage 6 trained (calibration on dev, int8), decoded in int8: bytes, CER and
#      utterances/s before and after in exp/COMPRESSION.md, CER against size in exp/compression.png
#   9  distillation teacher (egs/tools/asr.sh): the --teacher_exp model, or --distill_teacher (the long SAN-M
#      config) trained into exp/<its name>; with a sequence-level KD config, the training manifest transcribed by it
#   10 distillation (egs/tools/asr.sh): the half-width --distill_student alone and distilled with each of
#      --distill_configs (conf/distill/: word-level KD + MiniLM attention/value relations of the last encoder
#      layer, the same plus frame-level KD of the CTC head, sequence-level KD), decoded; teacher vs student
#      alone vs distilled in exp/DISTILL.md:
#        ./run.sh --stage 9 --stop_stage 10 --average_checkpoints 3
# Stages 6-10 are not run by default (stop_stage 5; 16 fine-tunes of the mini model). After stages 0-5:
#   ./run.sh --stage 6 --stop_stage 6    # the compressed rows of exp/RESULTS.md
#   ./run.sh --stage 7 --stop_stage 7    # the sweep: exp/s2t_sanm_mini/sparsity_sweep.{md,json,png}
#   ./run.sh --stage 8 --stop_stage 8    # int8 checkpoints of the base and the stage-6 models
#
# The default configs fit the demo budget; conf/tuning/*_long.yaml train 10 epochs (~40 minutes), keep their
# last 3 epoch checkpoints and are decoded as their average:
#   ./run.sh --stage 3 --average_checkpoints 3 \
#     --configs "conf/tuning/s2t_sanm_mini_long.yaml conf/tuning/s2t_transformer_mini_long.yaml"
set -euo pipefail

stage=0                 # first stage to run
stop_stage=5            # last stage to run (6-8, compression, on request)
num_utts=3000           # sentences to synthesize (split into train/dev/test by speaker)
configs="conf/s2t_sanm_mini.yaml conf/s2t_transformer_mini.yaml"  # experiments (space separated)
data_dir=data           # synthesized audio, Kaldi data directories and fairseq manifests
exp_dir=exp             # experiments: <exp_dir>/<config name>/
unit=char               # CTC/decoder units: char (letters, apostrophe, word boundary) or unigram/bpe pieces
vocab_size=300          # sentencepiece vocabulary of --unit unigram or bpe (unused for char)
noise=false             # add white/pink noise (10-30 dB SNR) to the train audio (it slows a short training down)
specaugment=false       # off: it hurts at the demo budget (s2t_sanm_mini, 600 updates: dev CTC CER 82.5% with, ~74% without)
nj=2                    # parallel jobs for synthesis and feature extraction
train_args=""           # extra fairseq-train arguments for every config, e.g. "--max-update 50"
decode_args=""          # extra fairseq-generate arguments for every config
average_checkpoints=0   # decode the average of the last N epoch checkpoints (0: the best; a config must keep them)
train_jobs=2            # trainings run at a time, one thread each (faster here than one after the other)
compress_base=conf/s2t_sanm_mini.yaml  # trained experiment that stages 6-7 fine-tune
compress_configs="conf/compress/sparse50.yaml conf/compress/sparse_2of4.yaml conf/compress/sparse_row50.yaml conf/compress/admm8.yaml conf/compress/sparse50_admm8.yaml conf/compress/sparse65_admm4_all.yaml"  # compression fine-tunes of stage 6
compress_args=""        # extra fairseq-train arguments for the fine-tunes of stages 6-7 (train_args are not used there)
sweep_config=conf/compress/sparse50.yaml  # budget and schedule of every sparsity sweep point (stage 7)
quantize_args=""        # extra fairseq-accel-compress arguments of stage 8 (post-training compression)
sweep_sparsities="0 50 70 80 90"  # sparsities (%) of the sweep
sweep_patterns="unstructured row 2:4"  # sweep patterns; an N:M pattern has one point, at sparsity 1-N/M
distill_teacher=conf/tuning/s2t_sanm_mini_long.yaml  # teacher experiment of stages 9-10 (trained unless --teacher_exp holds one)
teacher_exp=""          # experiment directory of an already trained teacher, e.g. exp_long/s2t_sanm_mini_long
distill_student=conf/distill/s2t_sanm_half.yaml  # student of stage 10: the teacher's config at half width
distill_configs="conf/distill/minilm.yaml conf/distill/minilm_ctc.yaml conf/distill/seqkd.yaml"  # stage 10's distillations of the student
verbose=false           # show the full output of every command on the console (it always goes to the logs)

printf -v recipe_cmd '%q ' "$0" "$@"  # this command line, quoted in the sparsity sweep's table

recipe_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tools_dir="${recipe_dir}/../../tools"
. "${tools_dir}/recipe.sh"
cd "${recipe_dir}"  # configs and data are relative to the recipe
export PYTHONPATH="${PYTHONPATH:+${PYTHONPATH}:}$(cd "${recipe_dir}/../../.." && pwd)"  # the checkout's plugin, if not installed

if in_stage 0; then
  log "Stage 0: check for espeak-ng"
  if ! command -v espeak-ng > /dev/null; then
    log "error: espeak-ng is not installed; install it with: apt-get install espeak-ng (or: make system-deps)"
    exit 2
  fi
fi

if in_stage 1; then
  log "Stage 1: synthesize ${num_utts} utterances into ${data_dir}"
  if ! stage_done "${data_dir}/.synth.done" "Stage 1"; then
    run_logged "${data_dir}/prepare.log" --desc synthesis --fraction --unit wav -- \
      fairseq-accel-prepare espeak --out-dir "${data_dir}" --num-utts "${num_utts}" --jobs "${nj}" \
      $([ "${noise}" = true ] || echo --no-noise)
    touch "${data_dir}/.synth.done"
  fi
fi

"${tools_dir}/asr.sh" --stage "${stage}" --stop_stage "${stop_stage}" \
  --kaldi_dir "${data_dir}" --train_set train --valid_set dev --test_set test --s2t_dir "${data_dir}/s2t" \
  --exp_dir "${exp_dir}" --configs "${configs}" --unit "${unit}" --vocab_size "${vocab_size}" --nj "${nj}" \
  --specaugment "${specaugment}" \
  --train_args "${train_args}" --decode_args "${decode_args}" --average_checkpoints "${average_checkpoints}" --train_jobs "${train_jobs}" --sweep_metric cer \
  --compress_base "${compress_base}" --compress_configs "${compress_configs}" \
  --compress_args "${compress_args}" --quantize_args "${quantize_args}" \
  --sweep_config "${sweep_config}" --sweep_sparsities "${sweep_sparsities}" \
  --sweep_patterns "${sweep_patterns}" \
  --distill_teacher "${distill_teacher}" --teacher_exp "${teacher_exp}" --distill_student "${distill_student}" \
  --distill_configs "${distill_configs}" \
  --recipe_cmd "${recipe_cmd}" --verbose "${verbose}"

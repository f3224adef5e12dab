#!/usr/bin/env bash
# Shared ASR pipeline (stages 2-10) that the corpus recipes egs/<corpus>/asr/run.sh call once their
# stage 1 has written Kaldi-style data directories (wav.scp, text, utt2spk) for --train_set,
# --valid_set and --test_set below --kaldi_dir.
#
#   2  80-dim fbank, global CMVN, speed perturbation of the training set, sentencepiece units and
#      fairseq speech_to_text manifests + config.yaml (fairseq-accel-prepare s2t)
#   3  train each experiment config with fairseq-train --task speech_to_text (its train: section); with
#      --average_checkpoints N, average its last N epoch checkpoints (fairseq-accel-average), which
#      stages 4 and 6-7 then use
#   4  decode --test_set with fairseq-generate --task speech_to_text_accel (its generate: section)
#   5  score (jiwer WER and CER) and print one results table for all configs (and the decoded
#      compression fine-tunes of stage 6); training and validation loss against update of the configs
#      in <exp_dir>/training_curves.png
#   6  compression: fine-tune --compress_base's trained model with each of --compress_configs
#      (conf/compress/*.yaml: progressive sparsity, ADMM weight quantization) into
#      <exp_dir>/<base>__<compress>/, decode it like the base (its last checkpoint), add its row (with the
#      sparsity reached) to the results table
#   7  sparsity sweep: fine-tunes of --compress_base at --sweep_sparsities x --sweep_patterns with the
#      budget of --sweep_config (sparsity 0: same budget, no pruning), decoded and scored into
#      <exp_dir>/<base>/sparsity_sweep.{md,json,png} (--sweep_metric against sparsity)
#   8  post-training compression: fairseq-accel-compress of --compress_base's model and of each fine-tune
#      stage 6 trained (activation calibration on --valid_set, int8 weights; a compress config's compress:
#      section adds options such as int4), decoded in int8 like the base, into <exp_dir>/<model>__int8/;
#      bytes, --sweep_metric and utterances/s before and after in <exp_dir>/COMPRESSION.{md,json} and the
#      metric against size in <exp_dir>/compression.png
#   9  distillation teacher (distill_stages.sh): the --teacher_exp model (trained from --distill_teacher if that
#      folder holds no checkpoint), decoded; if a --distill_configs config has `distill: targets: teacher`, a copy
#      of <s2t dir> whose training manifest holds the teacher's transcripts, <s2t dir>_seqkd_<teacher>
#   10 distillation: --distill_student trained alone and with each of --distill_configs (conf/distill/*.yaml)
#      into <exp_dir>/<student>__<distill>/, decoded, and <exp_dir>/DISTILL.md: teacher, student alone,
#      distilled students (WER/CER, parameters, decoding speed)
#
# Finished steps leave .done markers and are skipped on a rerun; an interrupted training resumes
# from its checkpoint_last.pt. The console shows one line per step, progress bars and the tables; the full
# output of each command is in its log: <s2t dir>/prepare.log (stage 2), <exp>/train.log,
# <exp>/decode_<test set>/generate.txt (--verbose true: all on the console).
set -euo pipefail

stage=2                 # first stage to run
stop_stage=100          # last stage to run
kaldi_dir=data          # Kaldi-style data directories written by the corpus recipe's stage 1
train_set=train         # training data directory (below --kaldi_dir)
valid_set=dev           # validation data directory
test_set=test           # test data directory (decoded in stage 4)
s2t_dir=data/s2t        # features, manifests and config.yaml
exp_dir=exp             # experiments: <exp_dir>/<config name>/
configs=""              # experiment configs (yaml with train: and generate: sections), space separated
unit=unigram            # sentencepiece units: unigram, bpe or char
vocab_size=500          # sentencepiece vocabulary size (ignored for char)
speed_perturb="0.9 1.0 1.1"  # speed factors applied to the training set
max_frames=3000         # utterances with more frames are left out of the manifests (counted)
specaugment=true        # SpecAugment on the training set (config.yaml); false for very short trainings
nj=2                    # parallel jobs for feature extraction
train_args=""           # extra fairseq-train arguments for every config, e.g. "--max-update 100"
decode_args=""          # extra fairseq-generate arguments for every config
average_checkpoints=0   # decode the average of each config's last N epoch checkpoints (0: its best checkpoint)
train_jobs=1            # trainings of stage 3 run at a time, splitting the CPU cores (1: one after the other)
compress_base=""        # config of the trained experiment that stages 6-7 fine-tune
compress_configs=""     # compression configs (conf/compress/*.yaml, train: section) of stage 6
compress_args=""        # extra fairseq-train arguments for the fine-tunes of stages 6-7 (train_args are not used there)
sweep_config=""         # compression config whose budget and schedule every sweep point uses (stage 7)
quantize_args=""        # extra fairseq-accel-compress arguments of stage 8, e.g. "--calib-batches 20"
sweep_sparsities="0 50 70 80 90"  # sparsities (%) of the sweep
sweep_patterns="unstructured row 2:4"  # sweep patterns; an N:M pattern has one point, at sparsity 1-N/M
sweep_metric=wer        # metric plotted by the sweep: wer or cer
distill_teacher=""      # config of the teacher experiment (stage 9 trains it unless --teacher_exp has a checkpoint)
teacher_exp=""          # experiment directory of an already trained teacher (default: <exp_dir>/<teacher config name>)
distill_student=""      # config of the student experiment (stage 10 trains it alone and distilled)
distill_configs=""      # distillation configs laid over --distill_student (conf/distill/*.yaml) of stage 10
recipe_cmd=""           # the corpus recipe's command line, quoted in the sweep table
verbose=false           # show the full output of every command on the console (it always goes to the logs)

tools_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "${tools_dir}/recipe.sh"
. "${tools_dir}/fairseq_stages.sh"
. "${tools_dir}/compress_stages.sh"
. "${tools_dir}/distill_stages.sh"
case "${sweep_metric}" in
  wer|cer) ;;
  *) log "error: --sweep_metric must be wer or cer, got '${sweep_metric}'"; exit 2 ;;
esac

if in_stage 2; then
  log "Stage 2: features, units and manifests in ${s2t_dir}"
  if ! stage_done "${s2t_dir}/.done" "Stage 2"; then
    require fairseq-accel-prepare
    read -r -a speeds <<< "${speed_perturb}"
    run_logged "${s2t_dir}/prepare.log" --desc features --fraction --unit utt -- \
      fairseq-accel-prepare s2t --data-dirs "${train_set}=${kaldi_dir}/${train_set}" \
      "${valid_set}=${kaldi_dir}/${valid_set}" "${test_set}=${kaldi_dir}/${test_set}" \
      --train-split "${train_set}" --out-dir "${s2t_dir}" --unit "${unit}" --vocab-size "${vocab_size}" \
      --speed-perturb "${speeds[@]}" --max-frames "${max_frames}" --jobs "${nj}" \
      $([ "${specaugment}" = true ] || echo --no-specaugment)
    touch "${s2t_dir}/.done"
  fi
fi

if in_stage 3; then
  log "Stage 3: train"
  train_experiments "${s2t_dir}" --task speech_to_text --config-yaml config.yaml \
    --train-subset "${train_set}" --valid-subset "${valid_set}"
fi

# decode_test CONFIG EXP: decode ${test_set} with EXP's checkpoint and CONFIG's generate: section.
decode_test() {
  local utterances
  utterances=$(($(wc -l < "${s2t_dir}/${test_set}.tsv") - 1))  # the manifest has a header line
  decode_experiment "$1" "$2" "${s2t_dir}" "${test_set}" D "${utterances}" \
    --task speech_to_text_accel --config-yaml config.yaml
}

# finetune_and_decode COMPRESS_CONFIG EXP: see compress_stages.sh.
finetune_and_decode() {
  compress_experiment "${compress_base}" "$1" "$2" "${s2t_dir}" --task speech_to_text_accel \
    --config-yaml config.yaml --train-subset "${train_set}" --valid-subset "${valid_set}"
  decode_test "${compress_base}" "$2"
}

# quantize_and_decode EXP OUT: see compress_stages.sh.
quantize_and_decode() {
  compress_checkpoint "$1" "$2" --data "${s2t_dir}" --config-yaml config.yaml --calib-subset "${valid_set}"
  decode_test "${compress_base}" "$2"
}

# write_results OUT EXP...: see compress_stages.sh.
write_results() {
  local out=$1
  shift
  python3 "${tools_dir}/asr_results.py" "$@" --subset "${test_set}" --out "${out}"
}

if in_stage 4; then
  log "Stage 4: decode ${test_set} (detokenized hypotheses)"
  for config in "${config_list[@]}"; do
    decode_test "${config}" "$(exp_of "${config}")"
  done
fi

if in_stage 5; then
  log "Stage 5: results (${test_set}) in ${exp_dir}/RESULTS.md"
  mapfile -t exps < <(results_exps "decode_${test_set}")
  write_results "${exp_dir}/RESULTS.md" "${exps[@]}"
  plot_training_curves
fi

if in_stage 6; then
  log "Stage 6: compression fine-tunes of ${compress_base}, decoded on ${test_set}"
  compress_stage "decode_${test_set}"
fi

if in_stage 7; then
  log "Stage 7: sparsity sweep of ${compress_base} (${sweep_metric} on ${test_set})"
  sweep_stage "${sweep_metric}"
fi

if in_stage 8; then
  log "Stage 8: post-training compression of ${compress_base} and its fine-tunes, decoded in int8 on ${test_set}"
  quantize_stage "${sweep_metric}" utterances_per_s
fi

# decode_and_profile CONFIG EXP: for the distillation stages; the ASR table reads the parameters from the checkpoint.
decode_and_profile() { decode_test "$1" "$2"; }

# teacher_targets CHECKPOINT OUT: ${s2t_dir} with the training manifest's targets replaced by the teacher's
# transcripts (decoded with the teacher config's generate: section), the other files linked.
teacher_targets() {
  local checkpoint=$1 out=$2 utterances config_args file
  stage_done "${out}/.done" "teacher targets ${out}" && return 0
  require fairseq-generate
  utterances=$(($(wc -l < "${s2t_dir}/${train_set}.tsv") - 1))
  mkdir -p "${out}/targets"
  python3 "${repo_root}/egs/tools/yaml2args.py" "$(teacher_dir)/config.yaml" --section generate > "${out}/targets/generate.args"
  mapfile -t config_args < "${out}/targets/generate.args"
  log "transcribe the ${utterances} training utterances with ${checkpoint} (sequence-level KD targets)"
  run_logged "${out}/targets/generate.txt" --desc "teacher targets" --sentences "${utterances}" -- \
    fairseq-generate "${s2t_dir}" --user-dir "${repo_root}/user_dir" --task speech_to_text_accel \
    --config-yaml config.yaml --path "${checkpoint}" --gen-subset "${train_set}" "${config_args[@]}"
  for file in "${s2t_dir}"/*; do
    [ "$(basename "${file}")" = "${train_set}.tsv" ] || ln -sf "$(cd "$(dirname "${file}")" && pwd)/$(basename "${file}")" "${out}/"
  done
  python3 "${repo_root}/egs/tools/teacher_manifest.py" "${s2t_dir}/${train_set}.tsv" "${out}/targets/generate.txt" \
    --out "${out}/${train_set}.tsv"
  touch "${out}/.done"
}

seqkd_dir="${s2t_dir}_seqkd_$(basename "$(teacher_dir)")"

if in_stage 9; then
  log "Stage 9: distillation teacher $(teacher_dir)"
  teacher_stage "${s2t_dir}" "${seqkd_dir}" --task speech_to_text_accel --config-yaml config.yaml \
    --train-subset "${train_set}" --valid-subset "${valid_set}"
fi

if in_stage 10; then
  log "Stage 10: student ${distill_student} alone and distilled (${distill_configs}), decoded on ${test_set}"
  distill_stage "${s2t_dir}" "${seqkd_dir}" --task speech_to_text_accel --config-yaml config.yaml \
    --train-subset "${train_set}" --valid-subset "${valid_set}"
  cat "${exp_dir}/DISTILL.md"
fi

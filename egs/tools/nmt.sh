#!/usr/bin/env bash
# Shared NMT pipeline (stages 2-6, 8-10) that the corpus recipes egs/<corpus>/nmt/run.sh call once their
# stage 1 has written plain text {train,valid,test}.{src,tgt} to --text_dir.
#
#   2  joint sentencepiece model on train.src + train.tgt; encode every split (fairseq-accel-prepare spm)
#   3  binarize with fairseq-preprocess
#   4  train each experiment config with fairseq-train (its train: section); with --average_checkpoints N,
#      average its last N epoch checkpoints (fairseq-accel-average), which stages 5 and 8-9 then use
#   5  decode --gen_subset with fairseq-generate --task translation_accel (its generate: section); profile
#   6  score (sacrebleu BLEU, chrF) and print one results table for all configs (and the decoded
#      compression fine-tunes of stage 8); training and validation loss against update of the configs
#      in <exp_dir>/training_curves.png
#   8  compression: fine-tune --compress_base's trained model with each of --compress_configs
#      (conf/compress/*.yaml: progressive sparsity, ADMM weight quantization) into
#      <exp_dir>/<base>__<compress>/, decode it like the base (its last checkpoint), add its row (with the
#      sparsity reached) to the results table
#   9  sparsity sweep: fine-tunes of --compress_base at --sweep_sparsities x --sweep_patterns with the
#      budget of --sweep_config (sparsity 0: same budget, no pruning), decoded and scored into
#      <exp_dir>/<base>/sparsity_sweep.{md,json,png} (BLEU against sparsity)
#   10 post-training compression: fairseq-accel-compress of --compress_base's model and of each fine-tune
#      stage 8 trained (activation calibration on valid, int8 weights; a compress config's compress: section
#      adds options such as int4), decoded in int8 like the base, into <exp_dir>/<model>__int8/; bytes, BLEU
#      and tokens/s before and after in <exp_dir>/COMPRESSION.{md,json} and BLEU against size in
#      <exp_dir>/compression.png
#   11 distillation teacher (distill_stages.sh): the --teacher_exp model (trained from --distill_teacher if that
#      folder holds no checkpoint), decoded and profiled; if a --distill_configs config has
#      `distill: targets: teacher`, the training set translated by the teacher (beam 5, BPE pieces) and
#      binarized with the corpus dictionaries into <data_dir>/bin_<bpe>_seqkd_<teacher> (sequence-level KD)
#   12 distillation: --distill_student trained alone and with each of --distill_configs (conf/distill/*.yaml,
#      e.g. the minilm_distillation criterion) into <exp_dir>/<student>__<distill>/, decoded, and
#      <exp_dir>/DISTILL.md: teacher, student alone, distilled students (BLEU, parameters, decoding speed)
# (stage 7 is left to the corpus recipe: the mini recipe's decoding benchmark)
#
# Finished steps leave .done markers and are skipped on a rerun; an interrupted training resumes
# from its checkpoint_last.pt. The console shows one line per step, progress bars and the tables; the full
# output of each command is in its log: <spm dir>/spm.log (stage 2), <bin dir>/binarize.log (stage 3),
# <exp>/train.log, <exp>/decode_<subset>/generate.txt, <exp>/profile.log (--verbose true: all on the console).
set -euo pipefail

stage=2                 # first stage to run
stop_stage=100          # last stage to run
src=de                  # source language suffix
tgt=en                  # target language suffix
text_dir=data/text      # plain text written by the corpus recipe's stage 1
data_dir=data           # sentencepiece and binarized data go below this
exp_dir=exp             # experiments: <exp_dir>/<config name>/
configs=""              # experiment configs (yaml with train: and generate: sections), space separated
bpe_type=bpe            # sentencepiece model type: bpe or unigram
bpe_vocab_size=10000    # joint sentencepiece vocabulary size
joined_dictionary=false # one dictionary for both languages (needed for --share-all-embeddings)
bleu_tokenize=13a       # sacrebleu tokenizer: 13a for raw text, none for pre-tokenized text
nj=2                    # parallel jobs for sentencepiece and binarization
train_args=""           # extra fairseq-train arguments for every config, e.g. "--max-update 100"
decode_args=""          # extra fairseq-generate arguments for every config
average_checkpoints=0   # decode the average of each config's last N epoch checkpoints (0: its best checkpoint)
train_jobs=1            # trainings of stage 4 run at a time, splitting the CPU cores (1: one after the other)
gen_subset=test         # split decoded in stage 5 (test or valid)
compress_base=""        # config of the trained experiment that stages 8-9 fine-tune
compress_configs=""     # compression configs (conf/compress/*.yaml, train: section) of stage 8
compress_args=""        # extra fairseq-train arguments for the fine-tunes of stages 8-9 (train_args are not used there)
sweep_config=""         # compression config whose budget and schedule every sweep point uses (stage 9)
quantize_args=""        # extra fairseq-accel-compress arguments of stage 10, e.g. "--calib-batches 20"
sweep_sparsities="0 50 70 80 90"  # sparsities (%) of the sweep
sweep_patterns="unstructured row 2:4"  # sweep patterns; an N:M pattern has one point, at sparsity 1-N/M
distill_teacher=""      # config of the teacher experiment (stage 11 trains it unless --teacher_exp has a checkpoint)
teacher_exp=""          # experiment directory of an already trained teacher (default: <exp_dir>/<teacher config name>)
distill_student=""      # config of the student experiment (stage 12 trains it alone and distilled)
distill_configs=""      # distillation configs laid over --distill_student (conf/distill/*.yaml) of stage 12
recipe_cmd=""           # the corpus recipe's command line, quoted in the sweep table
verbose=false           # show the full output of every command on the console (it always goes to the logs)

tools_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "${tools_dir}/recipe.sh"
. "${tools_dir}/fairseq_stages.sh"
. "${tools_dir}/compress_stages.sh"
. "${tools_dir}/distill_stages.sh"
spm_dir="${data_dir}/spm_${bpe_type}${bpe_vocab_size}"
bin_dir="${data_dir}/bin_${bpe_type}${bpe_vocab_size}"

if in_stage 2; then
  log "Stage 2: joint sentencepiece ${bpe_type} (${bpe_vocab_size} pieces) in ${spm_dir}"
  if ! stage_done "${spm_dir}/.done" "Stage 2"; then
    require fairseq-accel-prepare
    run_logged "${spm_dir}/spm.log" -- \
      fairseq-accel-prepare spm train --input "${text_dir}/train.${src}" "${text_dir}/train.${tgt}" \
      --model-prefix "${spm_dir}/spm" --vocab-size "${bpe_vocab_size}" --model-type "${bpe_type}" --threads "${nj}"
    for split in train valid test; do
      for lang in ${src} ${tgt}; do
        run_logged "${spm_dir}/spm.log" --append -- \
          fairseq-accel-prepare spm encode --model "${spm_dir}/spm.model" \
          --input "${text_dir}/${split}.${lang}" --output "${spm_dir}/${split}.${lang}"
      done
    done
    touch "${spm_dir}/.done"
  fi
fi

if in_stage 3; then
  log "Stage 3: binarize into ${bin_dir}"
  if ! stage_done "${bin_dir}/.done" "Stage 3"; then
    require fairseq-preprocess
    joined=()
    if [ "${joined_dictionary}" = true ]; then joined=(--joined-dictionary); fi
    run_logged "${bin_dir}/binarize.log" -- \
      fairseq-preprocess --source-lang "${src}" --target-lang "${tgt}" "${joined[@]}" \
      --trainpref "${spm_dir}/train" --validpref "${spm_dir}/valid" --testpref "${spm_dir}/test" \
      --destdir "${bin_dir}" --workers "${nj}"
    touch "${bin_dir}/.done"
  fi
fi

if in_stage 4; then
  log "Stage 4: train"
  train_experiments "${bin_dir}" --source-lang "${src}" --target-lang "${tgt}"
fi

# decode_and_profile CONFIG EXP: decode ${gen_subset} with EXP's checkpoint and CONFIG's generate: section,
# and count its parameters and Mult-Adds (EXP/profile.json, for the results table).
decode_and_profile() {
  local config=$1 exp=$2
  decode_experiment "${config}" "${exp}" "${bin_dir}" "${gen_subset}" H "$(wc -l < "${text_dir}/${gen_subset}.${tgt}")" \
    --task translation_accel --source-lang "${src}" --target-lang "${tgt}"
  if [ ! -f "${exp}/profile.json" ]; then
    run_logged "${exp}/profile.log" --stdout "${exp}/profile.json.part" -- \
      fairseq-accel-profile --path "$(decoded_checkpoint "${exp}")" --no-baseline --format json
    mv "${exp}/profile.json.part" "${exp}/profile.json"
  fi
}

# finetune_and_decode COMPRESS_CONFIG EXP: see compress_stages.sh.
finetune_and_decode() {
  require fairseq-accel-profile
  compress_experiment "${compress_base}" "$1" "$2" "${bin_dir}" --task translation_accel \
    --source-lang "${src}" --target-lang "${tgt}"
  decode_and_profile "${compress_base}" "$2"
}

# quantize_and_decode EXP OUT: see compress_stages.sh.
quantize_and_decode() {
  compress_checkpoint "$1" "$2" --data "${bin_dir}" --calib-subset valid
  decode_and_profile "${compress_base}" "$2"
}

# write_results OUT EXP...: see compress_stages.sh.
write_results() {
  local out=$1
  shift
  python3 "${tools_dir}/nmt_results.py" "$@" --subset "${gen_subset}" --bleu-tokenize "${bleu_tokenize}" \
    --out "${out}"
}

if in_stage 5; then
  log "Stage 5: decode ${gen_subset} (hypotheses after BPE removal) and profile"
  require fairseq-accel-profile
  for config in "${config_list[@]}"; do
    decode_and_profile "${config}" "$(exp_of "${config}")"
  done
fi

if in_stage 6; then
  log "Stage 6: results (${gen_subset}) in ${exp_dir}/RESULTS.md"
  mapfile -t exps < <(results_exps "decode_${gen_subset}")
  write_results "${exp_dir}/RESULTS.md" "${exps[@]}"
  plot_training_curves
fi

if in_stage 8; then
  log "Stage 8: compression fine-tunes of ${compress_base}, decoded on ${gen_subset}"
  compress_stage "decode_${gen_subset}"
fi

if in_stage 9; then
  log "Stage 9: sparsity sweep of ${compress_base} (BLEU on ${gen_subset})"
  sweep_stage bleu
fi

if in_stage 10; then
  log "Stage 10: post-training compression of ${compress_base} and its fine-tunes, decoded in int8 on ${gen_subset}"
  require fairseq-accel-profile
  quantize_stage bleu tokens_per_s
fi

# teacher_targets CHECKPOINT OUT: the training set's sources with the teacher's beam-5 translations (BPE
# pieces, before BPE removal) as targets, binarized into OUT with the corpus dictionaries; valid and test
# keep their references (linked from ${bin_dir}).
teacher_targets() {
  local checkpoint=$1 out=$2
  local text="${out}/text" expected
  stage_done "${out}/.done" "teacher targets ${out}" && return 0
  require fairseq-generate fairseq-preprocess
  expected=$(wc -l < "${text_dir}/train.${src}")
  mkdir -p "${text}"
  log "translate the ${expected} training sentences with ${checkpoint} (sequence-level KD targets)"
  run_logged "${text}/generate.txt" --desc "teacher targets" --sentences "${expected}" -- \
    fairseq-generate "${bin_dir}" --user-dir "${repo_root}/user_dir" --task translation_accel \
    --source-lang "${src}" --target-lang "${tgt}" --path "${checkpoint}" --gen-subset train \
    --accel-generator fast --beam 5 --batch-size 128 --max-len-a 1.2 --max-len-b 10 --cpu
  # the source as the model saw it (its BPE pieces, S- lines) beside the teacher's pieces (H- lines)
  grep '^S-' "${text}/generate.txt" | sed 's/^S-//' | sort -n -k1,1 | cut -f2 > "${text}/train.${src}"
  grep '^H-' "${text}/generate.txt" | sed 's/^H-//' | sort -n -k1,1 | cut -f3 > "${text}/train.${tgt}"
  if [ "$(wc -l < "${text}/train.${tgt}")" -ne "${expected}" ]; then
    log "error: ${text}/train.${tgt}: $(wc -l < "${text}/train.${tgt}") translations for ${expected} sentences"
    exit 1
  fi
  run_logged "${out}/binarize.log" -- \
    fairseq-preprocess --source-lang "${src}" --target-lang "${tgt}" --trainpref "${text}/train" \
    --srcdict "${bin_dir}/dict.${src}.txt" --tgtdict "${bin_dir}/dict.${tgt}.txt" --destdir "${out}" --workers "${nj}"
  local file
  for file in "${bin_dir}"/valid.* "${bin_dir}"/test.*; do ln -sf "$(cd "$(dirname "${file}")" && pwd)/$(basename "${file}")" "${out}/"; done
  touch "${out}/.done"
}

seqkd_bin="${bin_dir}_seqkd_$(basename "$(teacher_dir)")"

if in_stage 11; then
  log "Stage 11: distillation teacher $(teacher_dir)"
  teacher_stage "${bin_dir}" "${seqkd_bin}" --source-lang "${src}" --target-lang "${tgt}"
fi

if in_stage 12; then
  log "Stage 12: student ${distill_student} alone and distilled (${distill_configs}), decoded on ${gen_subset}"
  distill_stage "${bin_dir}" "${seqkd_bin}" --source-lang "${src}" --target-lang "${tgt}"
  cat "${exp_dir}/DISTILL.md"
fi

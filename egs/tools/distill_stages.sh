# The distillation stages shared by nmt.sh (and usable by asr.sh): a teacher, a student trained alone and the
# same student distilled with each conf/distill/*.yaml. Source it after fairseq_stages.sh. It uses the
# callers' distill_teacher, teacher_exp, distill_student, distill_configs and exp_dir, and three functions the
# caller defines for its task:
#   decode_and_profile CONFIG EXP       decode EXP's model with CONFIG's generate: section and profile it
#   teacher_targets CHECKPOINT OUT      training data whose targets are the teacher's beam outputs (sequence-level
#                                       KD, Kim & Rush 2016, arXiv 1606.07947), binarized into OUT
#   write_results OUT EXP...            score EXP... into the table OUT (markdown) and OUT's .json
#
# A distill config is laid over the train: section of --distill_student (yaml2args.py --override, as the
# compression configs are over their base) and has a distill: section with `targets: reference` (the corpus)
# or `targets: teacher` (the teacher's beam outputs of the training set). A config whose criterion is
# minilm_distillation gets --teacher-path (the teacher's decoded checkpoint).

# distill_exp_of DISTILL_CONFIG: <exp_dir>/<student name>__<distill name>.
distill_exp_of() { echo "$(exp_of "${distill_student}")__$(basename "$1" .yaml)"; }

# teacher_dir: the teacher's experiment directory: --teacher_exp, else that of --distill_teacher in exp_dir.
teacher_dir() {
  if [ -n "${teacher_exp}" ]; then echo "${teacher_exp}"; else exp_of "${distill_teacher}"; fi
}

# distill_targets DISTILL_CONFIG: the value of `targets` in its distill: section (reference or teacher).
distill_targets() {
  local args value
  mapfile -t args < <(python3 "${repo_root}/egs/tools/yaml2args.py" "$1" --section distill)
  [ "${#args[@]}" -gt 0 ] || { log "error: $1 has no distill: section with targets: reference or teacher"; exit 2; }
  value=$(option_value --targets "${args[@]}")
  case "${value}" in
    reference|teacher) echo "${value}" ;;
    *) log "error: $1: distill: targets must be reference or teacher, got '${value}'"; exit 2 ;;
  esac
}

# _check_distill_files: stop unless --distill_student and every --distill_configs file exist.
_check_distill_files() {
  local file
  for file in "${distill_student}" ${distill_configs}; do
    if [ -z "${file}" ] || [ ! -f "${file}" ]; then
      log "error: distillation config '${file}' not found (from $(pwd)); see --distill_student, --distill_configs"
      exit 2
    fi
  done
  for file in ${distill_configs}; do distill_targets "${file}" > /dev/null; done
}

# teacher_stage DATA SEQKD_DATA [ARGS...]: train the teacher (--distill_teacher into teacher_dir) unless
# teacher_dir already holds its decoded checkpoint, decode and profile it; if a distill config asks for the
# teacher's targets, write them (teacher_targets) into SEQKD_DATA.
teacher_stage() {
  local data=$1 seqkd=$2 exp config
  shift 2
  _check_distill_files
  exp=$(teacher_dir)
  if [ ! -f "$(decoded_checkpoint "${exp}")" ]; then
    [ -f "${distill_teacher}" ] || { log "error: no teacher in ${exp} and no --distill_teacher config to train one"; exit 2; }
    train_experiment "${distill_teacher}" "${exp}" "${data}" "$@"
  fi
  decode_and_profile "${distill_teacher:-${exp}/config.yaml}" "${exp}"
  for config in ${distill_configs}; do
    if [ "$(distill_targets "${config}")" = teacher ]; then
      teacher_targets "$(decoded_checkpoint "${exp}")" "${seqkd}"
      break
    fi
  done
}

# distill_experiment DISTILL_CONFIG EXP DATA [ARGS...]: fairseq-train of --distill_student with DISTILL_CONFIG's
# train: section laid over it, on DATA, plus --teacher-path for the minilm_distillation criterion.
distill_experiment() {
  local config=$1 exp=$2 data=$3 teacher
  shift 3
  log "train $(basename "${exp}") (${config} over ${distill_student})"
  stage_done "${exp}/.train.done" "training $(basename "${exp}")" && { average_last_checkpoints "${exp}"; return 0; }
  require fairseq-train
  mkdir -p "${exp}"
  cp "${distill_student}" "${exp}/config.yaml"
  cp "${config}" "${exp}/distill.yaml"
  python3 "${repo_root}/egs/tools/yaml2args.py" "${distill_student}" --section train --override "${config}" \
    > "${exp}/train.args"
  if grep -qx minilm_distillation "${exp}/train.args"; then
    teacher=$(decoded_checkpoint "$(teacher_dir)")
    set -- "$@" --teacher-path "$(cd "$(dirname "${teacher}")" && pwd)/$(basename "${teacher}")"
  fi
  _fairseq_train "${exp}" "${data}" "${train_args}" "$@"
  average_last_checkpoints "${exp}"
}

# distill_stage DATA SEQKD_DATA [ARGS...]: the student alone and with each distill config (${train_jobs} at a
# time), each decoded and profiled; then ${exp_dir}/DISTILL.md: teacher, student alone, distilled students.
distill_stage() {
  local data=$1 seqkd=$2 config failed=0 position=0 exps=()
  shift 2
  _check_distill_files
  [ -f "$(decoded_checkpoint "$(teacher_dir)")" ] || { log "error: no teacher checkpoint in $(teacher_dir); run the teacher stage first"; exit 2; }
  for config in "${distill_student}" ${distill_configs}; do
    while [ "$(jobs -rp | wc -l)" -ge "${train_jobs}" ]; do wait -n || failed=1; done
    (
      export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / train_jobs > 0 ? $(nproc) / train_jobs : 1 ))}"
      train_bar_position=${position}
      if [ "${config}" = "${distill_student}" ]; then
        train_experiment "${config}" "$(exp_of "${config}")" "${data}" "$@"
      elif [ "$(distill_targets "${config}")" = teacher ]; then
        distill_experiment "${config}" "$(distill_exp_of "${config}")" "${seqkd}" "$@"
      else
        distill_experiment "${config}" "$(distill_exp_of "${config}")" "${data}" "$@"
      fi
    ) &
    position=$(( (position + 1) % train_jobs ))
  done
  while [ -n "$(jobs -rp)" ]; do wait -n || failed=1; done
  [ "${failed}" -eq 0 ] || { log "error: a training failed (its log is named above)"; exit 1; }
  exps=("$(teacher_dir)" "$(exp_of "${distill_student}")")
  decode_and_profile "${distill_student}" "${exps[1]}"
  for config in ${distill_configs}; do
    decode_and_profile "${distill_student}" "$(distill_exp_of "${config}")"
    exps+=("$(distill_exp_of "${config}")")
  done
  write_results "${exp_dir}/DISTILL.md" "${exps[@]}"
}

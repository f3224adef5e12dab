# Training and decoding steps shared by nmt.sh and asr.sh. Source it after recipe.sh; it uses the
# callers' configs, exp_dir, train_args, decode_args, average_checkpoints and train_jobs, and checks them at once. fairseq-train and
# fairseq-generate run through run_logged (run_logged.sh): their full output goes to EXP/train.log and
# EXP/decode_<subset>/generate.txt, the console shows a progress bar and errors.

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="${PYTHONPATH:+${PYTHONPATH}:}${repo_root}"  # the checkout's plugin, if not installed
if [ -z "${configs}" ]; then
  log "error: --configs is empty; give at least one experiment config"
  exit 2
fi
read -r -a config_list <<< "${configs}"
for config in "${config_list[@]}"; do
  [ -f "${config}" ] || { log "error: config ${config} not found (from $(pwd))"; exit 2; }
done
if ! [[ "${average_checkpoints}" =~ ^[0-9]+$ ]]; then
  log "error: --average_checkpoints must be a number of epoch checkpoints (0: no averaging), got '${average_checkpoints}'"
  exit 2
fi
if ! [[ "${train_jobs}" =~ ^[1-9][0-9]*$ ]]; then
  log "error: --train_jobs must be the number of trainings run at a time (1 or more), got '${train_jobs}'"
  exit 2
fi

# exp_of CONFIG: the experiment directory of a config, named after it.
exp_of() { echo "${exp_dir}/$(basename "$1" .yaml)"; }

# train_experiment CONFIG EXP DATA [ARGS...]: fairseq-train on DATA with the train: section of CONFIG,
# then ARGS and ${train_args}; checkpoints, a copy of the config, the arguments and the log go to EXP.
# Skipped once EXP/.train.done exists; an interrupted run resumes from checkpoint_last.pt. Then, with
# --average_checkpoints N > 0, the average of the last N epoch checkpoints (average_last_checkpoints).
train_experiment() {
  local config=$1 exp=$2 data=$3
  shift 3
  log "train $(basename "${exp}") in ${exp}"
  if ! stage_done "${exp}/.train.done" "training $(basename "${exp}")"; then
    require fairseq-train
    mkdir -p "${exp}"
    cp "${config}" "${exp}/config.yaml"
    python3 "${repo_root}/egs/tools/yaml2args.py" "${config}" --section train > "${exp}/train.args"
    _fairseq_train "${exp}" "${data}" "${train_args}" "$@"
  fi
  average_last_checkpoints "${exp}"
}

# train_experiments DATA [ARGS...]: train_experiment for every config, ${train_jobs} of them at a time. On a
# CPU machine two one-thread trainings side by side finish sooner than the same two one after the other on two
# threads each (measured on the 2-core machines: 1.45x faster with two threads, 2x with two processes), so
# parallel trainings split the cores (OMP_NUM_THREADS = cores / train_jobs unless it is set) and each gets its
# own console bar. All trainings run to their end; then any that failed fails the stage.
train_experiments() {
  local data=$1 config failed=0 position=0 threads
  shift
  if [ "${train_jobs}" -eq 1 ] || [ "${#config_list[@]}" -eq 1 ]; then
    for config in "${config_list[@]}"; do train_experiment "${config}" "$(exp_of "${config}")" "${data}" "$@"; done
    return 0
  fi
  threads=$(( $(nproc) / train_jobs ))
  [ "${threads}" -ge 1 ] || threads=1
  for config in "${config_list[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "${train_jobs}" ]; do wait -n || failed=1; done
    (
      export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${threads}}"
      train_bar_position=${position}
      train_experiment "${config}" "$(exp_of "${config}")" "${data}" "$@"
    ) &
    position=$(( (position + 1) % train_jobs ))
  done
  while [ -n "$(jobs -rp)" ]; do wait -n || failed=1; done
  if [ "${failed}" -ne 0 ]; then
    log "error: a training failed (its log is named above)"
    exit 1
  fi
}

# average_last_checkpoints EXP: with --average_checkpoints N > 0, EXP/checkpoints/checkpoint_average.pt =
# the weights of the last N epoch checkpoints averaged (fairseq-accel-average; the config must keep them:
# keep_last_epochs, no no_epoch_checkpoints), which decoding then uses. Skipped once that file exists.
average_last_checkpoints() {
  local exp=$1
  local averaged="${exp}/checkpoints/checkpoint_average.pt"
  [ "${average_checkpoints}" -gt 0 ] || return 0
  stage_done "${averaged}" "averaging $(basename "${exp}")" && return 0
  require fairseq-accel-average
  local kept
  kept=$(find "${exp}/checkpoints" -maxdepth 1 -regex '.*/checkpoint[0-9]+\.pt' 2>/dev/null | wc -l)
  if [ "${kept}" -lt "${average_checkpoints}" ]; then
    log "error: ${exp}/checkpoints holds ${kept} epoch checkpoints, fewer than --average_checkpoints ${average_checkpoints}:" \
      "lower --average_checkpoints, or train at least ${average_checkpoints} epochs with a config that keeps them" \
      "(keep_last_epochs, no no_epoch_checkpoints)"
    exit 1
  fi
  log "average the last ${average_checkpoints} epoch checkpoints of $(basename "${exp}")"
  run_logged "${exp}/average.log" -- fairseq-accel-average --inputs "${exp}/checkpoints" \
    --num-epoch-checkpoints "${average_checkpoints}" --output "${averaged}"
}

# compress_experiment BASE_CONFIG COMPRESS_CONFIG EXP DATA [ARGS...]: fine-tune the trained model of
# BASE_CONFIG (its decoded_checkpoint) on DATA with fairseq-train --finetune-from-model: the train: section
# of BASE_CONFIG with that of COMPRESS_CONFIG laid over it (yaml2args.py --override), then ARGS and
# ${compress_args}. fairseq resets optimizer, learning-rate schedule, meters and data order and counts
# updates from 0, so the yaml's --sparsity-*-update and --admm-*-update count from the start of the
# fine-tune. Both configs are copied to EXP (EXP/compress.yaml marks a compression fine-tune). Skipped
# once EXP/.train.done exists; an interrupted fine-tune resumes from its own checkpoint_last.pt.
compress_experiment() {
  local base_config=$1 compress_config=$2 exp=$3 data=$4
  shift 4
  local base_checkpoint
  base_checkpoint=$(decoded_checkpoint "$(exp_of "${base_config}")")
  log "fine-tune $(basename "${exp}") from ${base_checkpoint} with ${compress_config}"
  stage_done "${exp}/.train.done" "fine-tuning $(basename "${exp}")" && return 0
  require fairseq-train
  if [ ! -f "${base_checkpoint}" ]; then
    log "error: ${base_checkpoint} not found; train ${base_config} first (the training stage)"
    exit 2
  fi
  mkdir -p "${exp}"
  cp "${base_config}" "${exp}/config.yaml"
  cp "${compress_config}" "${exp}/compress.yaml"
  python3 "${repo_root}/egs/tools/yaml2args.py" "${base_config}" --section train \
    --override "${compress_config}" > "${exp}/train.args"
  _fairseq_train "${exp}" "${data}" "${compress_args}" --finetune-from-model "${base_checkpoint}" "$@"
}

# option_value NAME ARGS...: the value of the last option NAME (NAME VALUE or NAME=VALUE) in ARGS, as
# argparse takes it; empty if NAME is not there.
option_value() {
  local name=$1 value=""
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      "${name}") [ $# -lt 2 ] || value=$2 ;;
      "${name}"=*) value=${1#*=} ;;
    esac
    shift
  done
  echo "${value}"
}

# _fairseq_train EXP DATA EXTRA [ARGS...]: fairseq-train on DATA with ARGS, the arguments in EXP/train.args
# and EXTRA (a string of further arguments); the full log goes to EXP/train.log (the console shows a bar
# of the updates up to the run's --max-update), EXP/.train.done marks the end.
_fairseq_train() {
  local exp=$1 data=$2 extra=$3
  shift 3
  local config_args all_args max_update
  mapfile -t config_args < "${exp}/train.args"
  # shellcheck disable=SC2206  # ${extra} holds several arguments
  all_args=("$@" "${config_args[@]}" ${extra})
  max_update=$(option_value --max-update "${all_args[@]}")
  run_logged "${exp}/train.log" --desc "train $(basename "${exp}")" --position "${train_bar_position:-0}" \
    --updates "${max_update:-0}" -- \
    fairseq-train "${data}" --user-dir "${repo_root}/user_dir" --save-dir "${exp}/checkpoints" "${all_args[@]}"
  touch "${exp}/.train.done"
}

# decoded_checkpoint EXP: the checkpoint that decoding EXP uses: EXP/compressed.pt of a post-training
# compression (compress_checkpoint); checkpoint_last.pt of a compression fine-tune (EXP/compress.yaml), the
# only one sure to be at the final sparsity and on the quantization grid (the best validation loss comes
# while pruning is still under way); else the averaged checkpoint_average.pt where averaging made one, else
# checkpoint_best.pt. egs/tools/results_table.py (decoded_checkpoint) reads the same one.
decoded_checkpoint() {
  if [ -f "$1/compressed.pt" ]; then
    echo "$1/compressed.pt"
  elif [ -f "$1/compress.yaml" ]; then
    echo "$1/checkpoints/checkpoint_last.pt"
  elif [ -f "$1/checkpoints/checkpoint_average.pt" ]; then
    echo "$1/checkpoints/checkpoint_average.pt"
  else
    echo "$1/checkpoints/checkpoint_best.pt"
  fi
}

# decode_experiment CONFIG EXP DATA SUBSET HYP_PREFIX EXPECTED [ARGS...]: fairseq-generate of SUBSET with
# EXP's decoded_checkpoint and the generate: section of CONFIG, then ARGS and ${decode_args}; the console
# shows a bar of the EXPECTED sentences. Writes EXP/decode_SUBSET/{generate.txt (the whole output of
# fairseq-generate: it holds the timing), hyp.txt (the HYP_PREFIX lines, H or D), ref.txt} in corpus
# order and stops unless there are EXPECTED hypotheses. Skipped once EXP/decode_SUBSET/.done exists.
decode_experiment() {
  local config=$1 exp=$2 data=$3 subset=$4 prefix=$5 expected=$6
  shift 6
  local decode_dir="${exp}/decode_${subset}" checkpoint
  checkpoint=$(decoded_checkpoint "${exp}")
  log "decode ${subset} with ${checkpoint}"
  stage_done "${decode_dir}/.done" "decoding $(basename "${exp}")" && return 0
  require fairseq-generate
  if [ ! -f "${checkpoint}" ]; then
    log "error: ${checkpoint} not found; run the training stage first"
    exit 2
  fi
  mkdir -p "${decode_dir}"
  python3 "${repo_root}/egs/tools/yaml2args.py" "${config}" --section generate > "${decode_dir}/generate.args"
  local config_args
  mapfile -t config_args < "${decode_dir}/generate.args"
  # shellcheck disable=SC2086  # ${decode_args} holds several arguments
  run_logged "${decode_dir}/generate.txt" --desc "decode $(basename "${exp}") ${subset}" \
    --sentences "${expected}" -- \
    fairseq-generate "${data}" --user-dir "${repo_root}/user_dir" --path "${checkpoint}" --gen-subset "${subset}" \
    "$@" "${config_args[@]}" ${decode_args}
  grep "^${prefix}-" "${decode_dir}/generate.txt" | sed "s/^${prefix}-//" | sort -n -k1,1 | cut -f3 > "${decode_dir}/hyp.txt"
  grep '^T-' "${decode_dir}/generate.txt" | sed 's/^T-//' | sort -n -k1,1 | cut -f2 > "${decode_dir}/ref.txt"
  local got
  got=$(wc -l < "${decode_dir}/hyp.txt")
  if [ "${got}" -ne "${expected}" ]; then
    log "error: ${decode_dir}: ${got} hypotheses for the ${expected} sentences of ${subset}"
    exit 1
  fi
  touch "${decode_dir}/.done"
}

# plot_training_curves: loss against update of every config's training (its train.log) in
# ${exp_dir}/training_curves.png; a log it cannot read is said in one line and leaves the results stage done.
plot_training_curves() {
  local config config_exps=()
  for config in "${config_list[@]}"; do config_exps+=("$(exp_of "${config}")"); done
  if python3 "${repo_root}/egs/tools/plot_training.py" "${config_exps[@]}" --out "${exp_dir}/training_curves.png"; then
    log "Training curves: ${exp_dir}/training_curves.png"
  else
    log "warning: no training curves (see the error above)"
  fi
}

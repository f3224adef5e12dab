# Training and decoding steps shared by nmt.sh and asr.sh. Source it after recipe.sh; it uses the
# callers' configs, exp_dir, train_args and decode_args, and checks the configs at once.

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

# exp_of CONFIG: the experiment directory of a config, named after it.
exp_of() { echo "${exp_dir}/$(basename "$1" .yaml)"; }

# train_experiment CONFIG EXP DATA [ARGS...]: fairseq-train on DATA with the train: section of CONFIG,
# then ARGS and ${train_args}; checkpoints, a copy of the config, the arguments and the log go to EXP.
# Skipped once EXP/.train.done exists; an interrupted run resumes from checkpoint_last.pt.
train_experiment() {
  local config=$1 exp=$2 data=$3
  shift 3
  log "train $(basename "${exp}") in ${exp}"
  stage_done "${exp}/.train.done" "training $(basename "${exp}")" && return 0
  require fairseq-train
  mkdir -p "${exp}"
  cp "${config}" "${exp}/config.yaml"
  python3 "${repo_root}/egs/tools/yaml2args.py" "${config}" --section train > "${exp}/train.args"
  local config_args
  mapfile -t config_args < "${exp}/train.args"
  # shellcheck disable=SC2086  # ${train_args} holds several arguments
  fairseq-train "${data}" --user-dir "${repo_root}/user_dir" --save-dir "${exp}/checkpoints" "$@" \
    "${config_args[@]}" ${train_args} 2>&1 | tee "${exp}/train.log"
  touch "${exp}/.train.done"
}

# decode_experiment CONFIG EXP DATA SUBSET HYP_PREFIX EXPECTED [ARGS...]: fairseq-generate of SUBSET with
# EXP's checkpoint_best.pt and the generate: section of CONFIG, then ARGS and ${decode_args}. Writes
# EXP/decode_SUBSET/{generate.txt (the whole log: it holds the timing), hyp.txt (the HYP_PREFIX lines, H
# or D), ref.txt} in corpus order and stops unless there are EXPECTED hypotheses. Skipped once
# EXP/decode_SUBSET/.done exists.
decode_experiment() {
  local config=$1 exp=$2 data=$3 subset=$4 prefix=$5 expected=$6
  shift 6
  local decode_dir="${exp}/decode_${subset}" checkpoint="${exp}/checkpoints/checkpoint_best.pt"
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
  fairseq-generate "${data}" --user-dir "${repo_root}/user_dir" --path "${checkpoint}" --gen-subset "${subset}" \
    "$@" "${config_args[@]}" ${decode_args} > "${decode_dir}/generate.txt" 2>&1
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

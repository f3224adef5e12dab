# The compression stages shared by nmt.sh and asr.sh: fine-tune one trained experiment with each
# conf/compress/*.yaml, and the sparsity sweep. Source it after fairseq_stages.sh. It uses the callers'
# compress_base, compress_configs, sweep_config, sweep_sparsities, sweep_patterns, recipe_cmd and exp_dir,
# and two functions the caller defines for its task:
#   finetune_and_decode COMPRESS_CONFIG EXP  fine-tune ${compress_base} with COMPRESS_CONFIG into EXP
#                                            (compress_experiment) and decode it like the base
#   write_results OUT EXP...                 score EXP... into the table OUT (markdown) and OUT's .json

# compress_exp_of COMPRESS_CONFIG: the experiment directory of a compression fine-tune of ${compress_base},
# <exp_dir>/<base name>__<compress name>.
compress_exp_of() { echo "$(exp_of "${compress_base}")__$(basename "$1" .yaml)"; }

# results_exps DECODE_DIR: the experiments of the results table: every config's, then every compression
# fine-tune of ${compress_configs} that has been decoded (DECODE_DIR/.done, e.g. decode_test/.done).
results_exps() {
  local config exp
  for config in "${config_list[@]}"; do exp_of "${config}"; done
  [ -n "${compress_base}" ] || return 0
  for config in ${compress_configs}; do
    exp=$(compress_exp_of "${config}")
    if [ -f "${exp}/$1/.done" ]; then echo "${exp}"; fi
  done
}

# _check_compress_files FILE...: stop unless --compress_base and every FILE exist.
_check_compress_files() {
  local file
  for file in "${compress_base}" "$@"; do
    if [ -z "${file}" ] || [ ! -f "${file}" ]; then
      log "error: compression config '${file}' not found (from $(pwd));" \
        "see --compress_base, --compress_configs, --sweep_config"
      exit 2
    fi
  done
}

# compress_stage DECODE_DIR: fine-tune and decode ${compress_base} with each of ${compress_configs}, then
# rewrite ${exp_dir}/RESULTS.md with their rows under those of the configs.
compress_stage() {
  local config exps
  # shellcheck disable=SC2086  # a list of files
  _check_compress_files ${compress_configs}
  if [ -z "${compress_configs}" ]; then
    log "error: --compress_configs is empty; give at least one conf/compress/*.yaml"
    exit 2
  fi
  for config in ${compress_configs}; do
    finetune_and_decode "${config}" "$(compress_exp_of "${config}")"
  done
  mapfile -t exps < <(results_exps "$1")
  write_results "${exp_dir}/RESULTS.md" "${exps[@]}"
}

# sweep_stage METRIC: fine-tune ${compress_base} at every point of the sparsity sweep (the budget and
# schedule of ${sweep_config}, target and pattern per point; sparsity 0 with no pruning at all), decode
# each, score them (exp/<base>/sweep/RESULTS.md) and write exp/<base>/sparsity_sweep.{md,json,png}
# with METRIC (a key of the results rows: bleu, chrf, wer, cer) against sparsity.
sweep_stage() {
  local metric=$1 base_exp sweep_dir point points_file
  _check_compress_files "${sweep_config}"
  base_exp=$(exp_of "${compress_base}")
  sweep_dir="${base_exp}/sweep"
  points_file="${sweep_dir}/points.txt"
  mkdir -p "${sweep_dir}"
  # shellcheck disable=SC2086  # lists of sparsities and patterns
  python3 "${repo_root}/egs/tools/sparsity_sweep.py" points --template "${sweep_config}" \
    --sparsities ${sweep_sparsities} --patterns ${sweep_patterns} --out-dir "${sweep_dir}" > "${points_file}"
  local points exps=()
  mapfile -t points < "${points_file}"
  for point in "${points[@]}"; do
    finetune_and_decode "${sweep_dir}/${point}.yaml" "${sweep_dir}/${point}"
    exps+=("${sweep_dir}/${point}")
  done
  write_results "${sweep_dir}/RESULTS.md" "${exps[@]}"
  python3 "${repo_root}/egs/tools/sparsity_sweep.py" table "${sweep_dir}/RESULTS.json" --metric "${metric}" \
    --command "${recipe_cmd:-(not given)}" --out "${base_exp}/sparsity_sweep.md"
}

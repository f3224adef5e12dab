# The compression stages shared by nmt.sh and asr.sh: fine-tune one trained experiment with each
# conf/compress/*.yaml, the sparsity sweep, and post-training compression (fairseq-accel-compress) with int8
# decoding. Source it after fairseq_stages.sh. It uses the callers' compress_base, compress_configs,
# sweep_config, sweep_sparsities, sweep_patterns, quantize_args, recipe_cmd and exp_dir, and three functions the
# caller defines for its task:
#   finetune_and_decode COMPRESS_CONFIG EXP  fine-tune ${compress_base} with COMPRESS_CONFIG into EXP
#                                            (compress_experiment) and decode it like the base
#   quantize_and_decode EXP OUT              compress EXP's model into OUT (compress_checkpoint, with the
#                                            task's calibration data) and decode it like the base
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

# quantize_stage METRIC SPEED: post-training compression of ${compress_base}'s model and of every fine-tune of
# ${compress_configs} that the fine-tuning stage has trained: each into <exp>__int8 (quantize_and_decode),
# decoded in int8 like its source; then ${exp_dir}/COMPRESSION.md (+ .json and compression.png): weight bytes,
# METRIC and SPEED (keys of the results rows, e.g. bleu and tokens_per_s) before and after
# (egs/tools/compression_table.py).
quantize_stage() {
  local metric=$1 speed=$2 config exp pairs=()
  _check_compress_files
  local sources=("$(exp_of "${compress_base}")")
  for config in ${compress_configs}; do
    exp=$(compress_exp_of "${config}")
    if [ -f "${exp}/.train.done" ]; then sources+=("${exp}"); fi
  done
  for exp in "${sources[@]}"; do
    quantize_and_decode "${exp}" "${exp}__int8"
    pairs+=("${exp}" "${exp}__int8")
  done
  write_results "${exp_dir}/compression/RESULTS.md" "${pairs[@]}"
  python3 "${repo_root}/egs/tools/compression_table.py" "${exp_dir}/compression/RESULTS.json" --exp-dir "${exp_dir}" \
    --metric "${metric}" --speed "${speed}" --out "${exp_dir}/COMPRESSION.md"
}

# compress_checkpoint EXP OUT [ARGS...]: fairseq-accel-compress of EXP's decoded checkpoint into
# OUT/compressed.pt with ARGS (the task's calibration data), the compress: section of EXP's compress.yaml
# if it has one (e.g. int4: "." for 4-bit levels of a model fine-tuned on that grid) and ${quantize_args};
# its output (the bytes of every tensor) goes to OUT/compress.log. Skipped once OUT/compressed.pt exists.
compress_checkpoint() {
  local exp=$1 out=$2 checkpoint config_args=()
  shift 2
  checkpoint=$(decoded_checkpoint "${exp}")
  log "compress $(basename "${exp}") into ${out}/compressed.pt (calibration, integer weights: int8, or int4 where its config says)"
  stage_done "${out}/compressed.pt" "compressing $(basename "${exp}")" && return 0
  require fairseq-accel-compress
  if [ ! -f "${checkpoint}" ]; then
    log "error: ${checkpoint} not found; run the training stage for $(basename "${exp}") first"
    exit 2
  fi
  mkdir -p "${out}"
  if [ -f "${exp}/compress.yaml" ] && grep -q '^compress:' "${exp}/compress.yaml"; then
    mapfile -t config_args < <(python3 "${repo_root}/egs/tools/yaml2args.py" "${exp}/compress.yaml" --section compress)
  fi
  # shellcheck disable=SC2086  # ${quantize_args} holds several arguments
  run_logged "${out}/compress.log" -- fairseq-accel-compress --path "${checkpoint}" --out "${out}/compressed.pt" \
    "$@" "${config_args[@]}" ${quantize_args}
}

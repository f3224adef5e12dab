#!/usr/bin/env bash
# The long configurations of both mini recipes, one recipe after the other, in a clone where `make demo` ran
# (its .venv and the recipes' data/), into exp_long/ beside the demo's exp/. Each recipe's console goes to
# <recipe>/exp_long/console.log, its wall time to <recipe>/exp_long/wall_seconds.
#
#   docs/results/2026-11-30_long_configs/run_long.sh CLONE [nmt|asr ...]   (default: both)
set -euo pipefail
clone=$(cd "$1" && pwd)
shift
export PATH="${clone}/.venv/bin:${PATH}"

timed() {  # timed RECIPE_DIR ARGS...: run.sh ARGS in RECIPE_DIR, console and wall seconds into exp_long/
  local dir=$1 start
  shift
  mkdir -p "${dir}/exp_long"
  start=$(date +%s)
  (cd "${dir}" && ./run.sh --exp_dir exp_long "$@") 2>&1 | tee "${dir}/exp_long/console.log"
  echo $(( $(date +%s) - start )) > "${dir}/exp_long/wall_seconds"
}

recipes=("$@")
[ ${#recipes[@]} -gt 0 ] || recipes=(nmt asr)
for name in "${recipes[@]}"; do
  case "${name}" in
    nmt) timed "${clone}/egs/mini_l10n/nmt" --stage 4 --stop_stage 6 --average_checkpoints 3 \
           --configs "conf/tuning/lite_transformer_mini_long.yaml conf/tuning/transformer_mini_long.yaml" ;;
    asr) timed "${clone}/egs/mini_espeak/asr" --stage 3 --average_checkpoints 3 \
           --configs "conf/tuning/s2t_sanm_mini_long.yaml conf/tuning/s2t_transformer_mini_long.yaml" ;;
    *) echo "unknown recipe ${name}: nmt or asr" >&2; exit 2 ;;
  esac
done

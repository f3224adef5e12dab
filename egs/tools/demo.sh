#!/usr/bin/env bash
# `make demo`: the mini NMT recipe (LSRA vs transformer, decoding benchmark, post-training int8 compression of
# the LSRA model), the mini ASR recipe (SAN-M vs s2t_transformer), then one summary (demo_summary.sh).
#
#   egs/tools/demo.sh NMT_RECIPE_DIR ASR_RECIPE_DIR [RECIPE OPTIONS...]   (e.g. --verbose true, for both)
#
# Scheduled for a machine with few cores: the ASR recipe's data stages (0-2: espeak-ng synthesis, features)
# start at once in the background at the lowest CPU priority (nice 19), so they run on the cores the NMT
# recipe leaves idle (single-threaded data steps, the shorter of its two parallel trainings ending first,
# decoding) and hardly slow it; their console goes to <ASR>/data/demo_console.log and is shown if they fail.
# The NMT recipe's decoding benchmark (stage 7) runs last, on an otherwise idle machine: beside the data stages its
# systems shared the cores with them, each by a different share.
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 NMT_RECIPE_DIR ASR_RECIPE_DIR [RECIPE OPTIONS...]" >&2
  exit 2
fi
nmt_dir=$1 asr_dir=$2
shift 2
tools_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "${tools_dir}/log.sh"

mkdir -p "${asr_dir}/data"
asr_data_console="${asr_dir}/data/demo_console.log"
log "ASR data (stages 0-2 of ${asr_dir}/run.sh) in the background at low priority; console: ${asr_data_console}"
nice -n 19 bash "${asr_dir}/run.sh" --stop_stage 2 "$@" > "${asr_data_console}" 2>&1 &
asr_data=$!
# the data job must not outlive a failed or interrupted demo
trap 'kill "${asr_data}" 2>/dev/null || true' EXIT

bash "${nmt_dir}/run.sh" --stop_stage 6 "$@"
bash "${nmt_dir}/run.sh" --stage 10 --stop_stage 10 "$@"

if ! wait "${asr_data}"; then
  log "error: the ASR data stages failed; their console (${asr_data_console}):"
  tail -n 20 "${asr_data_console}" | sed 's/^/    /' >&2
  exit 1
fi
trap - EXIT
log "ASR data ready"
bash "${asr_dir}/run.sh" --stage 3 "$@"
bash "${nmt_dir}/run.sh" --stage 7 --stop_stage 7 "$@"
bash "${tools_dir}/demo_summary.sh" "${nmt_dir}" "${asr_dir}"

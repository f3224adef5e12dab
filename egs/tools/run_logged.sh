# The quiet console of the recipes (sourced by recipe.sh, after log.sh). Every long external command
# (fairseq-train, fairseq-generate, fairseq-preprocess, fairseq-accel-prepare, the benchmark) runs as
#
#   run_logged LOG [--desc TEXT] [PROGRESS] [--append] [--stdout FILE] -- COMMAND [ARGS...]
#
# Its stdout and stderr, merged, go to LOG line by line, complete; the console (stderr) shows only a
# progress bar and the lines that are real errors (egs/tools/console_filter.py: tracebacks, "error:",
# "...Error"), none of the hydra/fairseq/torch warnings, model printouts or INFO lines. PROGRESS is one
# of console_filter.py's bars:
#   --updates N     training updates, N = the run's --max-update (0: unknown), loss in the postfix
#   --sentences N   decoding, N = the sentences fairseq-generate decodes (one per H-<id> line)
#   --fraction      one bar per "label: N/M" progress line (fairseq-accel-prepare)
#   --count REGEX   one step per line matching REGEX (with --total N, --unit NAME)
# --append adds to LOG instead of replacing it; --stdout FILE also writes COMMAND's stdout alone to FILE.
# On a terminal the bar is live (tqdm); elsewhere (CI, tests, `| tee`) it is printed as one line at
# 25, 50 and 75 % and at the end. The status is COMMAND's (as with pipefail); when it fails, the last
# ${run_logged_tail} lines of LOG and LOG's path go to stderr.
#
# With verbose=true (the recipes' --verbose true) the console shows everything, as `COMMAND 2>&1 | tee
# LOG` does.
run_logged_tail=20
_run_logged_filter="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/console_filter.py"

run_logged() {
  local log_file=$1 stdout_file="" append=false filter_args=() status
  shift
  while [ $# -gt 0 ] && [ "$1" != -- ]; do
    case "$1" in
      --stdout) stdout_file=$2; shift 2 ;;
      --append) append=true; filter_args+=(--append); shift ;;
      --fraction) filter_args+=("$1"); shift ;;
      *) filter_args+=("$1" "$2"); shift 2 ;;
    esac
  done
  if [ $# -lt 2 ]; then
    log "error: run_logged ${log_file}: expected '-- COMMAND [ARGS...]'"
    return 2
  fi
  shift
  mkdir -p "$(dirname "${log_file}")"
  local errexit=false statuses
  [[ $- == *e* ]] && errexit=true
  set +e
  if [ "${verbose:-false}" = true ]; then
    local tee_args=()
    [ "${append}" = true ] && tee_args=(-a)
    _run_logged_command "${stdout_file}" "$@" 2>&1 | tee "${tee_args[@]}" "${log_file}"
  else
    _run_logged_command "${stdout_file}" "$@" 2>&1 \
      | python3 "${_run_logged_filter}" --log "${log_file}" "${filter_args[@]}"
  fi
  statuses=("${PIPESTATUS[@]}")
  [ "${errexit}" = true ] && set -e
  status=${statuses[0]}
  if [ "${status}" -eq 0 ] && [ "${statuses[1]}" -ne 0 ]; then
    log "error: writing the log ${log_file} of $1 failed (exit status ${statuses[1]})"
    return "${statuses[1]}"
  fi
  if [ "${status}" -ne 0 ]; then
    if [ "${verbose:-false}" != true ]; then
      log "error: $1 failed (exit status ${status}); the last lines of its log:"
      tail -n "${run_logged_tail}" "${log_file}" | sed 's/^/    /' >&2
    else
      log "error: $1 failed (exit status ${status})"
    fi
    log "full log: ${log_file}"
  fi
  return "${status}"
}

# _run_logged_command STDOUT_FILE COMMAND [ARGS...]: COMMAND, its stdout also copied to STDOUT_FILE
# unless that is empty; the status is COMMAND's.
_run_logged_command() {
  local stdout_file=$1
  shift
  if [ -z "${stdout_file}" ]; then
    "$@"
  else
    (set -o pipefail; "$@" | tee "${stdout_file}")
  fi
}

# Logging for recipe scripts. Source it:  . "$(dirname "${BASH_SOURCE[0]}")/../../tools/log.sh"
#
# log MESSAGE...  prints "2024-05-01T12:00:00 (run.sh:42) MESSAGE" to stderr: the time, then the
# file and line of the call, so that a long log says where each step came from.
log() {
  printf '%s (%s:%s) %s\n' "$(date '+%Y-%m-%dT%H:%M:%S')" "${BASH_SOURCE[1]##*/}" "${BASH_LINENO[0]}" "$*" >&2
}

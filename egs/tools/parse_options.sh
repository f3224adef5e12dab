# Command-line options for recipe scripts (the Kaldi/ESPnet convention). Source it, do not run it:
#
#   stage=0        # first stage to run
#   stop_stage=100 # last stage to run
#   . "$(dirname "${BASH_SOURCE[0]}")/../../tools/parse_options.sh"   (recipes source recipe.sh)
#
# `--name value` or `--name=value` sets the shell variable `name`; dashes in the name become
# underscores, so `--stop-stage 3` and `--stop_stage 3` both set stop_stage=3. Only the documented
# options can be set; anything else is an "unknown option" error (exit status 2). A
# variable whose current value is true or false only accepts true or false. Parsing stops at `--`
# or at the first argument that does not start with `--`; those arguments stay in "$@".
#
# `--help` (or -h) prints the calling script's header comment (the comment lines after the shebang)
# and its options: every `name=value  # comment` line at the start of a line before the line that
# sources this file (or recipe.sh), with the option's current value. Variables assigned without a
# comment are internal, not options.

_po_script="${BASH_SOURCE[-1]:-$0}"  # the script that was run, also when sourced via recipe.sh
_po_script_name="${_po_script##*/}"

# The documented options: "name<TAB>comment" for each `name=value  # comment` line before the
# line that sources parse_options.sh.
_po_documented() {
  awk '
    /^[[:space:]]*[^#[:space:]].*(parse_options|recipe)\.sh/ { exit }
    /^[A-Za-z_][A-Za-z0-9_]*=.*[[:space:]]#/ {
      name = $0; sub(/=.*/, "", name)
      comment = ""
      if (match($0, /[[:space:]]#[[:space:]]?/)) comment = substr($0, RSTART + RLENGTH)
      print name "\t" comment
    }' "${_po_script}"
}

_po_usage() {
  awk 'NR == 1 && /^#!/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${_po_script}"
  echo
  echo "Options (--name value or --name=value; '-' and '_' are interchangeable in names):"
  local name comment
  local option
  while IFS=$'\t' read -r name comment; do
    option="--${name//_/-} ${!name-}"
    if [ ${#option} -le 32 ]; then
      printf '  %-32s %s\n' "${option}" "${comment}"
    else
      printf '  %s\n  %-32s %s\n' "${option}" "" "${comment}"
    fi
  done < <(_po_documented)
}

_po_fail() {
  local valid
  valid=$(_po_documented | cut -f1 | sed 's/_/-/g; s/^/--/' | tr '\n' ' ')
  echo "${_po_script_name}: error: $*; valid options: ${valid}(see ${_po_script_name} --help)" >&2
  exit 2
}

_po_options="$(_po_documented | cut -f1 | tr '\n' ' ')"
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help)
      _po_usage
      exit 0
      ;;
    --)
      shift
      break
      ;;
    --*=*)
      _po_name="${1%%=*}"
      _po_value="${1#*=}"
      shift
      ;;
    --*)
      [ $# -ge 2 ] || _po_fail "option $1 needs a value"
      _po_name="$1"
      _po_value="$2"
      shift 2
      ;;
    *)
      break
      ;;
  esac
  _po_var="${_po_name#--}"
  _po_var="${_po_var//-/_}"
  if [[ " ${_po_options} " != *" ${_po_var} "* ]]; then
    _po_fail "unknown option ${_po_name}"
  fi
  case "${!_po_var}" in
    true | false)
      case "${_po_value}" in
        true | false) ;;
        *) _po_fail "option ${_po_name} takes true or false, got '${_po_value}'" ;;
      esac
      ;;
  esac
  printf -v "${_po_var}" '%s' "${_po_value}"
done
unset _po_name _po_value _po_var _po_script _po_script_name _po_options
unset -f _po_documented _po_usage _po_fail

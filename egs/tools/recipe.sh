# Common start of every recipe script (run.sh, nmt.sh, asr.sh): logging, option parsing, the stage
# helpers and run_logged (the quiet console: long commands log to a file, the console shows progress
# bars and errors), then a check that no stray arguments are left (parse_options.sh already refuses
# anything but true/false for a boolean option such as --verbose). Source it right after the documented
# options:
#
#   stage=0        # first stage to run
#   verbose=false  # show the full output of every command on the console (it always goes to the logs)
#   . "${tools_dir}/recipe.sh"
_recipe_tools="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "${_recipe_tools}/log.sh"
. "${_recipe_tools}/parse_options.sh"
. "${_recipe_tools}/stage_utils.sh"
. "${_recipe_tools}/run_logged.sh"
unset _recipe_tools
if [ $# -gt 0 ]; then
  log "error: unexpected arguments: $* (see $0 --help)"
  exit 2
fi

# Common start of every recipe script (run.sh, nmt.sh, asr.sh): logging, option parsing and the stage
# helpers, then a check that no stray arguments are left. Source it right after the documented options:
#
#   stage=0        # first stage to run
#   . "${tools_dir}/recipe.sh"
_recipe_tools="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "${_recipe_tools}/log.sh"
. "${_recipe_tools}/parse_options.sh"
. "${_recipe_tools}/stage_utils.sh"
unset _recipe_tools
if [ $# -gt 0 ]; then
  log "error: unexpected arguments: $* (see $0 --help)"
  exit 2
fi

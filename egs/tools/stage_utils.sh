# Helpers shared by the recipe scripts. Source it after log.sh.

# require CMD...: stop with a clear message unless every CMD is on PATH.
require() {
  local cmd
  for cmd in "$@"; do
    if ! command -v "${cmd}" > /dev/null; then
      log "error: '${cmd}' is not on PATH; activate the environment with fairseq installed (make venv)"
      exit 2
    fi
  done
}

# stage_done MARKER WHAT: true (and says so) if MARKER exists, so an expensive step never runs twice.
stage_done() {
  if [ -f "$1" ]; then
    log "$2: already done ($1 exists; delete it to redo)"
    return 0
  fi
  return 1
}

# in_stage N: true when stage N lies in [stage, stop_stage].
in_stage() {
  [ "${stage}" -le "$1" ] && [ "${stop_stage}" -ge "$1" ]
}

# download URL DEST: fetch URL to DEST with wget or curl; DEST appears only once complete.
download() {
  log "downloading $1 to $2"
  if command -v wget > /dev/null; then
    wget -O "$2.part" "$1"
  else
    curl -fL -o "$2.part" "$1"
  fi
  mv "$2.part" "$2"
}

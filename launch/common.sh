# shellcheck shell=bash
# Helpers shared by every launch script: --help, required settings, and a dry-run aware runner.
# Sourced, never run. A script's usage is its own header comment, so it is written once.

# Prints the calling script's header comment (line 2 up to the first line that is not a comment),
# then the settings its family shares (SHARED_HELP) and DRY_RUN, which every script takes.
usage() {
  awk 'NR == 1 { next } !/^#/ { exit } { sub(/^#( |$)/, ""); print }' "$0"
  printf '%s' "${SHARED_HELP:-}"
  printf '  DRY_RUN=1   print the commands ("+ ..." lines) instead of running them\n'
}

# Exits 2 with the message and the usage on stderr.
die_usage() {
  printf 'error: %s\n\n' "$*" >&2
  usage >&2
  exit 2
}

# Exits 0 with the usage when the first argument is -h or --help.
handle_help() {
  if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    usage
    exit 0
  fi
}

# Exits 2, naming the first one missing, unless every named environment variable is non-empty.
require() {
  local name
  for name in "$@"; do
    [[ -n ${!name:-} ]] || die_usage "$name is not set"
  done
}

# Prints the command as "+ cmd arg ...", single-quoting the arguments that need it (so the line
# can be pasted into a shell), then runs the command unless DRY_RUN=1.
run() {
  local arg line=+
  for arg in "$@"; do
    if [[ $arg =~ ^[[:alnum:]_./:=@%+,-]+$ ]]; then
      line+=" $arg"
    else
      line+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  echo "$line"
  [[ ${DRY_RUN:-0} == 1 ]] || "$@"
}

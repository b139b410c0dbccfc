#!/bin/bash
# Follows one worker's training log (Ctrl-C stops following, not the training).
#
# Usage: NAME=dino ZONE=us-central2-b [WORKER=0] launch/tpu/logs.sh
#
# Settings (environment variables):
#   WORKER    which worker's log (default: 0, the one that prints the progress bar)
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
handle_help "$@"
tpu_init

run "${SSH[@]}" --worker="${WORKER:-0}" --command "tail -n +1 -F \$HOME/$REMOTE_LOG"

#!/bin/bash
# Deletes the TPU slice (with QUEUED=1, the queued resource and its TPU VM). Checkpoints and logs
# in the gs:// workdir stay; each worker's disk, including its train log, goes.
#
# Usage: NAME=dino ZONE=us-central2-b launch/tpu/delete.sh
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
handle_help "$@"
tpu_init

flags=(--quiet)
is_queued && flags+=(--force)  # --force also deletes the queued resource's TPU VM
run "${RES[@]}" delete "$NAME" "${LOC[@]}" "${flags[@]}"

#!/bin/bash
# Creates a TPU slice: a TPU VM, or a queued resource with QUEUED=1 (waits for capacity).
#
# Usage: NAME=dino ZONE=us-central2-b TYPE=v4-32 RUNTIME=tpu-ubuntu2204-base \
#          launch/tpu/create.sh [EXTRA GCLOUD FLAGS, e.g. --network=NET]
#
# Settings (environment variables):
#   TYPE          accelerator type, e.g. v4-32, v5p-64, v6e-16                      [required]
#   RUNTIME       TPU software version, e.g. tpu-ubuntu2204-base, v2-alpha-tpuv6e   [required]
#   SPOT=1        a Spot slice (cheaper, can be preempted at any time)
#   PREEMPTIBLE=1 a preemptible TPU VM (the older kind; not for queued resources)
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
handle_help "$@"
tpu_init
require TYPE RUNTIME

flags=(--accelerator-type "$TYPE")
[[ ${SPOT:-0} != 1 ]] || flags+=(--spot)
if is_queued; then
  [[ ${PREEMPTIBLE:-0} != 1 ]] || die_usage "PREEMPTIBLE=1 is for TPU VMs; use SPOT=1 with QUEUED=1"
  run "${RES[@]}" create "$NAME" "${LOC[@]}" --node-id "$NAME" --runtime-version "$RUNTIME" \
    "${flags[@]}" "$@"
else
  [[ ${PREEMPTIBLE:-0} != 1 ]] || flags+=(--preemptible)
  run "${RES[@]}" create "$NAME" "${LOC[@]}" --version "$RUNTIME" "${flags[@]}" "$@"
fi

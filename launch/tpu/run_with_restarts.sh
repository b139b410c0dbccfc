#!/bin/bash
# Runs training to the end through preemptions: makes sure the slice exists and is READY (creating
# it, or deleting and recreating it when it was preempted), installs (setup.sh), starts the same
# training command (train.sh), then polls until worker 0's log has the "final:" line. When the
# slice is lost (PREEMPTED/TERMINATED, or a queued resource FAILED/SUSPENDED) or training stops
# without finishing, it starts over; the training resumes from the newest checkpoint in WORKDIR.
#
# Usage: NAME=dino ZONE=us-central2-b TYPE=v4-32 RUNTIME=tpu-ubuntu2204-base SPOT=1 \
#          CONFIG=configs/vit_small16.py WORKDIR=gs://BUCKET/dino/vits16 \
#          launch/tpu/run_with_restarts.sh [--config.KEY=VALUE ...]
#
# Takes the settings of create.sh, setup.sh and train.sh, and:
#   MAX_RESTARTS  restarts before giving up, exit code 1 (default: 20)
#   POLL_SECONDS  time between two looks at the slice and the log (default: 300)
# Exits 0 once training has finished; the slice is left running (delete.sh deletes it).
set -euo pipefail
here=$(dirname "$0")
# shellcheck source=SCRIPTDIR/common.sh
source "$here/common.sh"
handle_help "$@"
tpu_init
require TYPE RUNTIME CONFIG WORKDIR
max_restarts=${MAX_RESTARTS:-20}
poll=${POLL_SECONDS:-300}

# Returns once the slice is READY (ACTIVE for a queued resource), creating it when needed.
wait_until_ready() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    "$here/create.sh"
    return
  fi
  local state
  while true; do
    state=$(slice_state)
    echo "slice $NAME: $state"
    case $state in
      READY | ACTIVE) return ;;
      NOT_FOUND) "$here/create.sh" ;;
      PREEMPTED | TERMINATED | FAILED | SUSPENDED | SUSPENDING)
        "$here/delete.sh"
        "$here/create.sh"
        ;;
      *) sleep "$poll" ;;  # CREATING, WAITING_FOR_RESOURCES, PROVISIONING, ...
    esac
  done
}

# Returns 0 when training has finished (exits with DRY_RUN=1), 1 when the slice was lost or training stopped early.
wait_for_training() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "(dry run: would now poll the slice state and worker 0's log for \"final:\")"
    exit 0
  fi
  # Brackets keep pgrep from matching the shell that runs this very command.
  local status_cmd="if grep -q '^final:' \$HOME/$REMOTE_LOG; then echo finished; \
elif pgrep -f 'dino_jax[.]train' >/dev/null; then echo running; else echo stopped; fi"
  local state status
  while true; do
    sleep "$poll"
    state=$(slice_state)
    [[ $state == READY || $state == ACTIVE ]] || { echo "slice $NAME: $state"; return 1; }
    status=$("${SSH[@]}" --worker=0 --command "$status_cmd") || status=unreachable
    case $status in
      finished) return 0 ;;
      running) ;;
      *) echo "training on worker 0: $status"; return 1 ;;
    esac
  done
}

restarts=0
while true; do
  wait_until_ready
  "$here/setup.sh"
  "$here/train.sh" "$@"
  if wait_for_training; then
    echo "training finished (log: launch/tpu/logs.sh; results: $WORKDIR)"
    exit 0
  fi
  if ((++restarts > max_restarts)); then
    echo "giving up after $max_restarts restarts" >&2
    exit 1
  fi
  echo "restart $restarts of at most $max_restarts"
done

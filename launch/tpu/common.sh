# shellcheck shell=bash disable=SC2034,SC2153  # variables used by, and settings from, the sourcer
# Helpers shared by the TPU scripts: gcloud command prefixes for the slice and its state.
# Sourced, never run. Defines RES (the resource's gcloud group), SSH, LOC, and where things live
# on the workers (paths relative to the worker's home directory).
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

SHARED_HELP='
Settings every TPU script takes (environment variables):
  NAME        name of the TPU VM (and of the queued resource with QUEUED=1)   [required]
  ZONE        e.g. us-central2-b                                               [required]
  PROJECT     Google Cloud project (default: the one gcloud is configured with)
  QUEUED=1    the slice is a queued resource (gcloud compute tpus queued-resources)
'
REMOTE_DIR=dino_jax            # the repository
REMOTE_VENV=dino_venv          # the Python environment setup.sh creates
REMOTE_LOG=dino_train.log      # train.sh's output, one per worker (earlier ones get a timestamp)

is_queued() { [[ ${QUEUED:-0} == 1 ]]; }

# Checks NAME and ZONE, then defines the command prefixes.
tpu_init() {
  require NAME ZONE
  LOC=(--zone "$ZONE")
  [[ -z ${PROJECT:-} ]] || LOC+=(--project "$PROJECT")
  SSH=(gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}")
  if is_queued; then
    RES=(gcloud compute tpus queued-resources)
  else
    RES=(gcloud compute tpus tpu-vm)
  fi
}

# Prints the slice's state (READY, PREEMPTED, ...; ACTIVE, SUSPENDED, ... for a queued resource),
# or NOT_FOUND when it does not exist.
slice_state() {
  local field=state state
  is_queued && field=state.state
  state=$("${RES[@]}" describe "$NAME" "${LOC[@]}" --format="value($field)" 2>/dev/null) \
    || state=NOT_FOUND
  echo "${state:-NOT_FOUND}"
}

#!/bin/bash
# Starts training on every worker of the slice, in the background (nohup), each worker writing
# ~/dino_train.log; returns at once. Each worker runs
#   python -m dino_jax.train --config CONFIG --workdir WORKDIR [ARGS ...]
# and JAX finds the other workers by itself. Rerunning the same command resumes from the newest
# checkpoint in WORKDIR.
#
# Usage: NAME=dino ZONE=us-central2-b CONFIG=configs/vit_small16.py WORKDIR=gs://BUCKET/dino/vits16 \
#          launch/tpu/train.sh [--config.KEY=VALUE ...]
#
# Settings (environment variables):
#   CONFIG    recipe, relative to the repository, e.g. configs/vit_small16.py[:variant]  [required]
#   WORKDIR   gs:// directory for checkpoints and metrics (a worker's disk does not survive
#             preemption)                                                               [required]
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
handle_help "$@"
tpu_init
require CONFIG WORKDIR
[[ $WORKDIR == gs://* ]] || die_usage "WORKDIR=$WORKDIR is not a gs:// path: a worker's disk \
does not survive preemption, so the checkpoints must go to a bucket"

train=$(printf '%q ' "../$REMOTE_VENV/bin/python" -m dino_jax.train --config "$CONFIG" \
  --workdir "$WORKDIR" "$@")
log=\$HOME/$REMOTE_LOG
# The previous log keeps a timestamp, so "final:" in the log always belongs to this run.
run "${SSH[@]}" --worker=all --command "cd $REMOTE_DIR && { [ ! -f $log ] || \
mv $log $log.\$(date +%s); } && nohup $train> $log 2>&1 < /dev/null &"

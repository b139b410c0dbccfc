#!/bin/bash
# Training on one machine: one process using all its local GPUs (or TPU chips, or the CPU).
#
# Usage: CONFIG=configs/vit_small16.py WORKDIR=/data/dino/vits16 launch/gpu/single_node.sh \
#          [--config.KEY=VALUE ...]
# e.g.   CONFIG=configs/vit_small16.py WORKDIR=runs/vits16 launch/gpu/single_node.sh \
#          --config.data.data_dir=/data/tensorflow_datasets --config.train.batch_size=512
# Only some GPUs: CUDA_VISIBLE_DEVICES=0,1 launch/gpu/single_node.sh ...
# Rerunning the same command resumes from the newest checkpoint in WORKDIR.
#
# Settings (environment variables):
#   CONFIG    recipe, e.g. configs/vit_small16.py[:variant]                       [required]
#   WORKDIR   directory for checkpoints and metrics (local path or gs://)         [required]
#   PYTHON    Python with dino_jax installed (default: python)
set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "$0")/../common.sh"
handle_help "$@"
require CONFIG WORKDIR

run "${PYTHON:-python}" -m dino_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"

#!/bin/bash
# Installs dino_jax on every worker of the slice, in a fresh Python environment (~/dino_venv,
# made by uv: the TPU images' Python is older than the one JAX needs) with jax[tpu].
#
# Usage: NAME=dino ZONE=us-central2-b launch/tpu/setup.sh
#
# Settings (environment variables):
#   REPO_URL        git URL to clone on the workers; without it, this checkout is copied over
#                   (without .git and .venv) with `gcloud compute tpus tpu-vm scp`
#   REPO_REF        branch or tag to clone (default: the repository's default branch)
#   PYTHON_VERSION  Python of the environment (default: 3.12)
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
handle_help "$@"
tpu_init

if [[ -n ${REPO_URL:-} ]]; then
  fetch="rm -rf $REMOTE_DIR && git clone --depth 1 ${REPO_REF:+--branch $(printf %q "$REPO_REF")} \
$(printf %q "$REPO_URL") $REMOTE_DIR"
else
  root=$(cd "$(dirname "$0")/../.." && pwd)
  tarball=${TMPDIR:-/tmp}/dino_jax-$NAME.tar.gz
  run tar -czf "$tarball" --exclude=./.git --exclude=./.venv --exclude=__pycache__ \
    --exclude='*.egg-info' -C "$root" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:dino_jax.tar.gz" "${LOC[@]}" --worker=all
  fetch="rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf dino_jax.tar.gz -C $REMOTE_DIR"
fi
install="command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
export PATH=\$HOME/.local/bin:\$PATH && rm -rf $REMOTE_VENV && uv venv --python ${PYTHON_VERSION:-3.12} $REMOTE_VENV \
&& uv pip install --python $REMOTE_VENV/bin/python -e ./$REMOTE_DIR 'jax[tpu]'"
run "${SSH[@]}" --worker=all --command "$fetch && { $install; }"

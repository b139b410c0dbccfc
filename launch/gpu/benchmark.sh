#!/bin/bash
# Our bfloat16 train step beside the official DINO iteration on one GPU, on the same work:
# ViT-S/16, 64 images with 2x224 + 10x96 crops each. The reference side is main_dino.py's
# `--use_fp16 true` iteration (float16 autocast, GradScaler, gradients unscaled before clipping),
# re-implemented in tests/torch_reference.py. Prints each side's images/s (median), MFU (achieved
# FLOP/s over the GPU's dense bf16/fp16 peak) and peak GPU memory, then ends with a markdown table
# for BENCHMARKS.md. Each side runs in its own process under `timeout`, so one failing still
# leaves the other's figures; the defaults end within 8 minutes on an H100 or H200, compilation
# included.
#
# Usage: launch/gpu/benchmark.sh             (from any directory; it runs in the repository root)
#   With internet: pip install -e '.[torch]' 'jax[cuda12]', then launch/gpu/benchmark.sh
#   Offline, where python3 has JAX, flax, optax and PyTorch but not ml_collections (such as the
#   lent H200 machine): on a machine with pip access, in the repository root,
#     echo /.whl/ >>.git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
#   bring .whl along with the checkout (the lent machine: carry [".whl"]), then run there
#     WHEELS=.whl COMMIT=$SHA launch/gpu/benchmark.sh
#   with SHA from `git rev-parse --short HEAD` here, as the copy may have no .git.
#   Check this script on a CPU (both sides tiny, under a minute): DEVICE=cpu launch/gpu/benchmark.sh
#
# Settings (environment variables):
#   DEVICE         cuda (default), or cpu: the `:smoke` sizes, batch 2, 2 local crops
#   GPU            the one GPU both sides use, as CUDA_VISIBLE_DEVICES (default 0)
#   BATCH_SIZE     images per step (default 64; cpu: 2)
#   LOCAL_CROPS    local crops per image (default 10; cpu: 2)
#   STEPS, WARMUP  timed and untimed steps per side (default 20 and 3; cpu: 1 and 0)
#   JAX_TIMEOUT    seconds for our side, startup and compilation included (default 270)
#   TORCH_TIMEOUT  seconds for the reference side (default 150)
#   PYTHON         Python with JAX and PyTorch (default python3)
#   WHEELS         folder of wheels for what PYTHON lacks, installed without an index into a
#                  temporary folder put first on PYTHONPATH
#   COMMIT         commit named in the table (default: git rev-parse, "+dirty" with local changes)
#   LOG_DIR        where each side's log and figures go (default: a new temporary folder)
# Exits 0 when both sides ran, 1 when one failed (its row then says why).
set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "$0")/../common.sh"
handle_help "$@"
[[ $# -eq 0 ]] || die_usage "no arguments are taken: $*"
cd "$(dirname "$0")/../.."

DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
JAX_TIMEOUT=${JAX_TIMEOUT:-270}
TORCH_TIMEOUT=${TORCH_TIMEOUT:-150}
case $DEVICE in
  cuda)
    BATCH_SIZE=${BATCH_SIZE:-64} LOCAL_CROPS=${LOCAL_CROPS:-10}
    STEPS=${STEPS:-20} WARMUP=${WARMUP:-3}
    recipe=configs/vit_small16.py ours_size=() reference_size=()
    # Fail at once without a GPU rather than time the CPU until the timeout.
    export CUDA_VISIBLE_DEVICES=${GPU:-0} JAX_PLATFORMS=cuda
    ;;
  cpu)
    BATCH_SIZE=${BATCH_SIZE:-2} LOCAL_CROPS=${LOCAL_CROPS:-2}
    STEPS=${STEPS:-1} WARMUP=${WARMUP:-0}
    # The stock layers: the CPU attention kernel would be compiled first, then the step twice.
    recipe=configs/vit_small16.py:smoke ours_size=(--config.compute.cpu_tuning=False)
    reference_size=(--smoke)
    export JAX_PLATFORMS=cpu
    ;;
  *) die_usage "DEVICE=$DEVICE: cuda or cpu" ;;
esac
# Output reaches the log as it is printed, so a side killed by its timeout still shows how far
# it got.
export PYTHONUNBUFFERED=1
LOG_DIR=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$LOG_DIR"

if [[ -n ${WHEELS:-} ]]; then
  site=$(mktemp -d)
  run "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" \
    "$WHEELS"/*.whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ ${DRY_RUN:-0} != 1 ]] && ! "$PYTHON" -c 'import ml_collections' 2>/dev/null; then
  echo "warning: $PYTHON lacks ml_collections, so our side will fail: set WHEELS (--help)" >&2
fi

# side NAME SECONDS COMMAND...: runs COMMAND under `timeout`, its output also in LOG_DIR/NAME.log,
# and records its exit status in LOG_DIR/NAME.status.
side() {
  local name=$1 seconds=$2 status=0
  shift 2
  echo "== $name"
  run timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$LOG_DIR/$name.log" || status=$?
  echo "$status" >"$LOG_DIR/$name.status"
}

side ours "$JAX_TIMEOUT" "$PYTHON" -m dino_jax.benchmark step --config "$recipe" \
  "--config.train.batch_size=$BATCH_SIZE" "--config.crops.local_crops_number=$LOCAL_CROPS" \
  "${ours_size[@]}" --config.compute.dtype=bfloat16 --steps "$STEPS" --warmup "$WARMUP"
side reference "$TORCH_TIMEOUT" "$PYTHON" tests/torch_reference.py --device "$DEVICE" --fp16 \
  "${reference_size[@]}" --batch-size "$BATCH_SIZE" --local-crops "$LOCAL_CROPS" \
  --steps "$STEPS" --warmup "$WARMUP" --json "$LOG_DIR/reference.json"
[[ ${DRY_RUN:-0} != 1 ]] || exit 0

if [[ -z ${COMMIT:-} ]]; then
  COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [[ $COMMIT != unknown ]] && ! git diff --quiet HEAD -- 2>/dev/null; then
    COMMIT+=+dirty
  fi
fi

"$PYTHON" - "$LOG_DIR" "$COMMIT" "$JAX_TIMEOUT" "$TORCH_TIMEOUT" "$STEPS" "$WARMUP" <<'EOF'
"""Both sides' figures, then the markdown table; exits 1 unless both sides ran."""

import ast
import datetime
import json
import re
import sys
from pathlib import Path

log_dir, commit, jax_timeout, torch_timeout, steps, warmup = sys.argv[1:]
log_dir = Path(log_dir)


def failure(name, timeout):
    """None when the side exited 0, else why it did not."""
    status = int((log_dir / f"{name}.status").read_text())
    if status == 0:
        return None
    if status in (124, 137):  # timeout's own status, or SIGKILL after its grace period
        return f"failed: timed out after {timeout} s"
    return f"failed: exit {status}"


def number(cell):
    return float(cell.split()[0].rstrip("%"))


def ours_figures():
    """Our side's figures from `benchmark step`'s header line and markdown row."""
    lines = (log_dir / "ours.log").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| config |"))
    row = next(line for line in lines if line.startswith("| configs/"))
    cells = dict(
        zip(
            [c.strip() for c in header.strip("|").split("|")],
            [c.strip() for c in row.strip("|").split("|")],
            strict=True,
        )
    )
    title = next(line for line in lines if re.match(r"\d+ x .*, JAX ", line))
    return {
        "device": re.match(r"\d+ x (.*) \(\w+\), JAX", title).group(1),
        "version": "JAX " + re.search(r"JAX ([^,]+)", title).group(1),
        "precision": cells["dtype"],
        "crops": cells["batch, crops"],
        "images_per_s": number(cells["images/s"]),
        "flops": number(cells["GFLOP/step"]) * 1e9,
        "peak_flops": number(cells["peak TFLOP/s"]) * 1e12,
        "peak_source": re.search(r"\((.*)\)", cells["peak TFLOP/s"]).group(1),
        "mfu": number(cells["MFU"]) / 100,
        "memory_gib": number(cells["peak memory GiB"]),
    }


def reference_figures():
    r = json.loads((log_dir / "reference.json").read_text())
    memory = r["peak_memory_bytes"]
    return {
        "device": r["device"],
        "version": f"PyTorch {r['torch']}",
        "precision": r["precision"],
        "crops": f"{r['batch_size']}, {r['crops']}",
        "images_per_s": r["images_per_s"],
        "flops": r["flops"],
        "step_s": r["step_s"],
        "memory_gib": None if memory is None else memory / 2**30,
    }


def data_sheet_peak(device):
    """dino_jax.benchmark.PEAK_FLOPS's bfloat16 entry for `device`, read without importing JAX
    (for when our side failed); fp16 and bf16 dense peaks are equal on NVIDIA's tensor cores."""
    tree = ast.parse(Path("dino_jax/benchmark.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and "PEAK_FLOPS" in [t.id for t in node.targets]:
            table = ast.literal_eval(node.value)
            for name in sorted(table, key=len, reverse=True):  # "H100" after "H100 PCIe"
                if name.lower() in device.lower():
                    return table[name]["bfloat16"], f"{name} data sheet"
    return None, None


sides = {}
for name, timeout, read in (
    ("ours", jax_timeout, ours_figures),
    ("reference", torch_timeout, reference_figures),
):
    why = failure(name, timeout)
    try:
        sides[name] = why or read()
    except (OSError, StopIteration, KeyError, ValueError, AttributeError) as error:
        sides[name] = f"failed: no figures in its output ({type(error).__name__})"
ours, reference = sides["ours"], sides["reference"]
both = isinstance(ours, dict) and isinstance(reference, dict)
device = next((s["device"] for s in (reference, ours) if isinstance(s, dict)), "unknown")
# One peak for both: the same GPU, and its dense fp16 and bf16 peaks are equal.
if isinstance(ours, dict):
    peak, source = ours["peak_flops"], ours["peak_source"]
else:
    peak, source = data_sheet_peak(device)
if isinstance(reference, dict):
    achieved = reference["flops"] / reference["step_s"]
    reference["mfu"] = achieved / peak if peak else None

labels = {
    "ours": "dino_jax",
    "reference": "main_dino.py --use_fp16 (tests/torch_reference.py)",
}
print()
for name, figures in sides.items():
    if isinstance(figures, str):
        print(f"{labels[name]}: {figures} (log: {log_dir / name}.log)")
        continue
    mfu = "n/a" if figures["mfu"] is None else f"{100 * figures['mfu']:.1f}%"
    memory = "n/a" if figures["memory_gib"] is None else f"{figures['memory_gib']:.2f} GiB"
    print(
        f"{labels[name]}: {figures['images_per_s']:.1f} images/s, MFU {mfu}, "
        f"peak memory {memory}"
    )
date = datetime.date.today().isoformat()
against = f"{peak / 1e12:.1f} TFLOP/s ({source})" if peak else "no known peak"
print(
    f"\nMedian of {steps} steps after {warmup} warm-up, one process per side. FLOPs per step: "
    "ours from XLA's cost analysis (every op), the reference's from torch.utils.flop_counter "
    f"(matmuls and convolutions). MFU against {against}. Peak memory: JAX's "
    "peak_bytes_in_use, torch.cuda.max_memory_allocated.\n"
)
print(
    "| date | commit | GPU | implementation | precision | batch, crops | images/s | GFLOP/step "
    "| MFU | peak memory GiB | ours / reference |"
)
print("|---|---|---|---|---|---|---:|---:|---:|---:|---:|")
for name, figures in sides.items():
    label = labels[name]
    if isinstance(figures, str):
        print(f"| {date} | {commit} | {device} | {label} | | | {figures} | | | | |")
        continue
    mfu = "n/a" if figures["mfu"] is None else f"{100 * figures['mfu']:.1f}%"
    memory = "n/a" if figures["memory_gib"] is None else f"{figures['memory_gib']:.2f}"
    ratio = ""
    if both and name == "ours":
        ratio = f"{ours['images_per_s'] / reference['images_per_s']:.2f}x"
    print(
        f"| {date} | {commit} | {device} | {label} ({figures['version']}) "
        f"| {figures['precision']} | {figures['crops']} | {figures['images_per_s']:.1f} "
        f"| {figures['flops'] / 1e9:.1f} | {mfu} | {memory} | {ratio} |"
    )
sys.exit(0 if both else 1)
EOF

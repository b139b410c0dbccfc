"""The command line that draws runs' metrics, to look at one run or to compare several.

    python -m dino_jax.plot runs/demo
    python -m dino_jax.plot runs/frozen runs/unfrozen --keys knn_top1,knn_top1_retain \\
        --out compare.png

One panel per metric (default: every metric recorded), one line per run, labelled by the
workdir's name or by `--labels`. Reads metrics.jsonl (`dino_jax.metrics.read_metrics`); writes
metrics.png in the first workdir unless `--out` names the PNG.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from etils import epath

from dino_jax.metrics import plot_metrics


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dino_jax.plot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("workdirs", nargs="+", help="run directories holding metrics.jsonl")
    parser.add_argument("--keys", help="comma-separated metrics to draw (default: all)")
    parser.add_argument("--labels", help="comma-separated legend labels, one per workdir")
    parser.add_argument("--out", help="the PNG to write (default: FIRST_WORKDIR/metrics.png)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    labels = args.labels.split(",") if args.labels else [epath.Path(w).name for w in args.workdirs]
    if len(labels) != len(args.workdirs) or len(set(labels)) != len(labels):
        sys.exit(
            f"--labels gives {len(labels)} distinct names for {len(args.workdirs)} workdirs: give "
            "one different label per workdir, in their order."
        )
    keys = args.keys.split(",") if args.keys else None
    for workdir in args.workdirs:
        if not epath.Path(workdir).is_dir():
            sys.exit(f"{workdir} is not a directory: give the workdirs of training runs.")
    runs = dict(zip(labels, args.workdirs, strict=True))
    try:
        print(plot_metrics(runs if len(runs) > 1 else args.workdirs[0], keys, args.out))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(str(e))


if __name__ == "__main__":
    main()

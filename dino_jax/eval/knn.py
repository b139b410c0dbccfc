"""The k-NN evaluation of a checkpoint's backbone as a command (the reference's `eval_knn.py`):
features of a labelled train and val set, then the weighted k-NN vote of eval/maths/knn.py.

    python -m dino_jax.eval.knn --checkpoint runs/demo/export --train synthetic:textures \\
        --resize 72 --crop 64 --out runs/demo/knn.json
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dino_jax.core import parallel
from dino_jax.eval import cli
from dino_jax.eval.maths.knn import KS, TEMPERATURE, knn_classify


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dino_jax.eval.knn",
        description="Weighted k-NN accuracy of a backbone's features (the reference's eval_knn).",
    )
    cli.add_checkpoint_args(parser)
    cli.add_distributed_args(parser)
    cli.add_data_args(parser)
    parser.add_argument("--temperature", type=float, default=TEMPERATURE, help="Vote weight T.")
    parser.add_argument(
        "--ks", default=",".join(map(str, KS)), help="Comma-separated numbers of neighbours."
    )
    parser.add_argument("--out", default=None, help="Write the results to this JSON file.")
    return parser.parse_args(argv)


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise ValueError(f"--ks={text!r} is not a comma-separated list of positive integers.")
    return ks


def evaluate(args: argparse.Namespace) -> dict:
    """Features of both sets, then the k-NN vote: the results as a JSON-ready dict."""
    ks = parse_ks(args.ks)
    mesh = parallel.make_mesh((("data", -1),))
    cli.check_batch_size(args.batch_size, mesh)
    val = args.val or args.train
    sets = {"train": (args.train, args.train_split, args.train_examples)}
    sets["val"] = (val, args.val_split, args.val_examples)
    sources = {
        name: cli.labelled_source(spec, split, args.data_dir)
        for name, (spec, split, _) in sets.items()
    }
    cli.check_disjoint(
        (args.train, args.train_split, sources["train"]), (val, args.val_split, sources["val"])
    )
    model, variables = cli.load_backbone(args.checkpoint, mesh, args.arch, args.patch_size)
    features = {}
    for name, (spec, split, limit) in sets.items():
        config = cli.data_config(spec, args.data_dir, args.resize, args.crop, args.num_workers)
        features[name] = cli.labelled_features(
            model,
            variables,
            config,
            split,
            sources[name],
            batch_size=args.batch_size,
            limit=limit,
            mesh=mesh,
            desc=f"features {name}",
        )
    accuracy = knn_classify(*features["train"], *features["val"], ks, args.temperature)
    return {
        "checkpoint": str(args.checkpoint),
        "train": {
            "source": args.train,
            "split": args.train_split,
            "examples": len(features["train"][0]),
        },
        "val": {"source": val, "split": args.val_split, "examples": len(features["val"][0])},
        "temperature": args.temperature,
        "knn": {str(k): {"top1": top1, "top5": top5} for k, (top1, top5) in accuracy.items()},
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cli.initialize_distributed(args)
    cli.setup_logging()
    try:
        results = evaluate(args)
    except (ValueError, FileNotFoundError) as e:
        # Bad paths and settings are the user's to fix: the message, not a traceback.
        logging.getLogger("dino_jax").error("%s", e)
        sys.exit(1)
    for k, acc in results["knn"].items():
        print(f"{k}-NN (T={args.temperature}): top-1 {acc['top1']:.2f}%  top-5 {acc['top5']:.2f}%")
    if args.out:
        cli.write_json(args.out, results)


if __name__ == "__main__":
    main()

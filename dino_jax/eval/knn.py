"""Weighted k-NN classification on L2-normalised features (the reference's `eval_knn.py`).

Each test image takes the k most cosine-similar training features; each votes for its label with
weight exp(similarity / T). Train and test sets are processed in chunks, so the test x train
similarity matrix never exists in full.

As a command, the k-NN evaluation of a checkpoint's backbone (SPEC 5):

    python -m dino_jax.eval.knn --checkpoint runs/demo/export --train synthetic:textures \
        --resize 72 --crop 64 --out runs/demo/knn.json
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax import parallel
from dino_jax.eval import cli

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


def l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@partial(jax.jit, static_argnames="k")
def _merge_top_k(best_sim, best_idx, sim, offset, k: int):
    """Running top-k over train chunks: [n, k] so far + [n, chunk] new -> [n, k]."""
    idx = jnp.broadcast_to(jnp.arange(sim.shape[1]) + offset, sim.shape)
    sims, picks = jax.lax.top_k(jnp.concatenate([best_sim, sim], axis=1), k)
    return sims, jnp.take_along_axis(jnp.concatenate([best_idx, idx], axis=1), picks, axis=1)


def nearest_neighbours(
    train: np.ndarray, test: np.ndarray, k: int, train_chunk: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine similarities and train indices for every test row, best first: [n_test, k]."""
    test = jnp.asarray(test, jnp.float32)
    best_sim = jnp.full((test.shape[0], k), -jnp.inf, jnp.float32)
    best_idx = jnp.zeros((test.shape[0], k), jnp.int32)
    for start in range(0, train.shape[0], train_chunk):
        chunk = jnp.asarray(train[start : start + train_chunk], jnp.float32)
        sim = jnp.matmul(test, chunk.T, precision=jax.lax.Precision.HIGHEST)
        best_sim, best_idx = _merge_top_k(best_sim, best_idx, sim, start, k)
    return np.asarray(best_sim), np.asarray(best_idx)


def knn_classify(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    ks: Sequence[int] = KS,
    temperature: float = TEMPERATURE,
    test_chunk: int = 1024,
) -> dict[int, tuple[float, float]]:
    """{k: (top-1 %, top-5 %)} of the weighted k-NN vote. Features need not be normalised."""
    train = np.asarray(l2_normalize(jnp.asarray(train_features, jnp.float32)))
    test = np.asarray(l2_normalize(jnp.asarray(test_features, jnp.float32)))
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    ks = [min(k, len(train)) for k in ks]
    correct = {k: np.zeros(2) for k in ks}
    for start in range(0, len(test), test_chunk):
        sims, idx = nearest_neighbours(train, test[start : start + test_chunk], max(ks))
        targets = test_labels[start : start + test_chunk]
        for k in ks:
            ranked = _vote(sims[:, :k], train_labels[idx[:, :k]], num_classes, temperature)
            # As the reference: "top-5" looks at min(5, k) classes (at most k got votes).
            hits = ranked[:, : min(5, k)] == targets[:, None]
            correct[k] += [hits[:, 0].sum(), hits.any(axis=1).sum()]
    return {k: tuple(100.0 * correct[k] / len(test)) for k in ks}


def _vote(sims: np.ndarray, labels: np.ndarray, num_classes: int, temperature: float):
    """Classes ranked by the summed weights exp(sim / T) of the neighbours voting for them."""
    weights = np.exp(sims / temperature)
    scores = np.zeros((len(sims), num_classes))
    np.add.at(scores, (np.arange(len(sims))[:, None], labels), weights)
    return np.argsort(-scores, axis=1, kind="stable")


# ---------------------------------------------------------------------------------------------
# The command.


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

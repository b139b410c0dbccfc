"""Weighted k-NN classification on L2-normalised features (the reference's `eval_knn.py`).

Each test image takes the k most cosine-similar training features; each votes for its label with
weight exp(similarity / T). Train and test sets are processed in chunks, so the test x train
similarity matrix never exists in full.

The command is `python -m dino_jax.eval.knn` (eval/knn.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax.models.head import l2_normalize

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


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

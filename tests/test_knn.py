"""Weighted k-NN against a direct NumPy transcription of the reference's knn_classifier."""

import numpy as np
import pytest

from dino_jax.eval.maths.knn import knn_classify, nearest_neighbours


def reference_knn(train, train_labels, test, test_labels, k, t, num_classes):
    """The reference's vote (eval_knn.py: knn_classifier) on the full similarity matrix."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sim = test @ train.T
    idx = np.argsort(-sim, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sim, idx, axis=1) / t)
    probs = np.zeros((len(test), num_classes))
    for i in range(len(test)):
        for j in range(k):
            probs[i, train_labels[idx[i, j]]] += weights[i, j]
    ranked = np.argsort(-probs, axis=1)
    top1 = np.mean(ranked[:, 0] == test_labels) * 100
    top5 = np.mean((ranked[:, : min(5, k)] == test_labels[:, None]).any(1)) * 100
    return top1, top5


def test_hand_made_case():
    # Two clusters on the unit circle; the test point near cluster 1 has three class-1 neighbours.
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]])
    labels = np.array([0, 0, 1, 1, 1])
    test = np.array([[0.05, 1.0], [1.0, 0.05]])
    result = knn_classify(train, labels, test, np.array([1, 0]), ks=(1, 3))
    assert result[1] == (100.0, 100.0) and result[3] == (100.0, 100.0)
    wrong = knn_classify(train, labels, test, np.array([0, 1]), ks=(1,))
    assert wrong[1][0] == 0.0


@pytest.mark.parametrize("k", [1, 5, 20])
def test_matches_reference_with_chunks(k):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 16))
    train_labels = rng.integers(0, 6, 300)
    test_labels = rng.integers(0, 6, 70)
    train = centers[train_labels] + rng.normal(scale=1.5, size=(300, 16))
    test = centers[test_labels] + rng.normal(scale=1.5, size=(70, 16))
    expected = reference_knn(train, train_labels, test, test_labels, k, 0.07, 6)
    got = knn_classify(train, train_labels, test, test_labels, ks=(k,), test_chunk=16)
    np.testing.assert_allclose(got[k], expected, atol=1e-9)
    assert 20 < expected[0] < 100  # not a degenerate case


def test_chunked_neighbours_equal_full_search():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(1000, 8)).astype(np.float32)
    test = rng.normal(size=(5, 8)).astype(np.float32)
    sims, idx = nearest_neighbours(train, test, k=7, train_chunk=64)
    full = test @ train.T
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :7])
    np.testing.assert_allclose(sims, np.sort(full, axis=1)[:, ::-1][:, :7], rtol=1e-5)

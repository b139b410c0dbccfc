"""The k-NN evaluation: the weighted vote against NumPy on hand-made features, and the command on a
tiny exported teacher over synthetic:shapes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from dino_jax.data.pipeline import MEAN, STD, resize_center_crop
from dino_jax.data.sources import sample_indices
from dino_jax.data.synthetic import ShapesSource
from dino_jax.eval import knn
from dino_jax.eval.maths.knn import knn_classify
from dino_jax.interop.hub import load_pretrained

REPO = Path(__file__).resolve().parent.parent


def numpy_knn(train, train_labels, test, test_labels, k, t, num_classes):
    """eval_knn.py: knn_classifier on the full similarity matrix: top-k cosine neighbours vote
    exp(sim / T); classes ranked by their summed votes (equal sums: the lower class first); top-5
    over min(5, k)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    top1 = top5 = 0
    for query, target in zip(test, test_labels, strict=True):
        sims = train @ query
        neighbours = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
        votes = np.zeros(num_classes)
        for j in neighbours:
            votes[train_labels[j]] += np.exp(sims[j] / t)
        ranked = sorted(range(num_classes), key=lambda c: (-votes[c], c))
        top1 += ranked[0] == target
        top5 += target in ranked[: min(5, k)]
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


def at_angles(*angles):
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def test_one_close_neighbour_outvotes_two_far_ones_at_t_007():
    # Query at angle 0: class 0 at 0.1 rad, two of class 1 at 0.5 rad. With T = 0.07 the close
    # one weighs exp((cos 0.1 - cos 0.5) / 0.07) = 5.3 times each far one; with T = 1 only 1.13.
    train = at_angles(0.1, 0.5, -0.5)
    labels = np.array([0, 1, 1])
    query, target = at_angles(0.0), np.array([0])
    assert knn_classify(train, labels, query, target, ks=(3,))[3][0] == 100.0
    assert knn_classify(train, labels, query, target, ks=(3,), temperature=1.0)[3][0] == 0.0
    # k = 1 sees only the closest one.
    assert knn_classify(train, labels, query, target, ks=(1,), temperature=1.0)[1][0] == 100.0


def test_top5_misses_the_sixth_class():
    # Seven neighbours of seven classes, each farther than the last: the farthest class ranks 7th.
    train = at_angles(*np.linspace(0.1, 0.7, 7))
    labels = np.arange(7)
    query = at_angles(0.0)
    result = knn_classify(train, labels, query, np.array([6]), ks=(7,))
    assert result[7] == (0.0, 0.0)
    result = knn_classify(train, labels, query, np.array([4]), ks=(7,))
    assert result[7] == (0.0, 100.0)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_hand_made_set_equals_numpy_for_several_k(temperature):
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(7, 5))
    train_labels = np.repeat(np.arange(7), 4)
    train = centers[train_labels] + rng.normal(scale=0.8, size=(28, 5))
    test_labels = rng.integers(0, 7, 40)
    test = centers[test_labels] + rng.normal(scale=0.8, size=(40, 5))
    ks = (1, 3, 10, 20, 28)
    got = knn_classify(train, train_labels, test, test_labels, ks, temperature, test_chunk=7)
    for k in ks:
        want = numpy_knn(train, train_labels, test, test_labels, k, temperature, 7)
        np.testing.assert_allclose(got[k], want, atol=1e-9, err_msg=f"k={k}")


def test_k_larger_than_the_memory_is_clamped():
    train, labels = at_angles(0.0, 1.0), np.array([0, 1])
    result = knn_classify(train, labels, at_angles(0.1), np.array([0]), ks=(20,))
    assert result == {2: (100.0, 100.0)}


def direct_features(export_dir, split, count):
    """The teacher's cls features of the `count` scenes the command samples (class-balanced, see
    test_sources): resize 40, centre crop 32."""
    model, variables = load_pretrained(export_dir)
    source = ShapesSource(split)
    picked = sample_indices(source, count)
    assert len(picked) == count and picked.max() >= count  # not the first `count`
    images = np.stack([resize_center_crop(source[i]["image"], 40, 32, 3) for i in picked])
    x = (images / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
    labels = np.array([source[i]["label"] for i in picked])
    return np.asarray(jax.jit(model.apply)(variables, x.astype(np.float32))), labels


@pytest.mark.slow
def test_command_writes_the_accuracies_of_the_teacher(export_dir, tmp_path):
    out = tmp_path / "knn.json"
    command = [
        sys.executable, "-m", "dino_jax.eval.knn", f"--checkpoint={export_dir}",
        "--train=synthetic:shapes", "--train_examples=72", "--val_examples=40", "--ks=1,5,20",
        "--resize=40", "--crop=32", "--batch_size=32", f"--out={out}",
    ]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results["train"] == {"source": "synthetic:shapes", "split": "train", "examples": 72}
    assert results["val"] == {"source": "synthetic:shapes", "split": "val", "examples": 40}
    assert results["temperature"] == 0.07 and sorted(results["knn"]) == ["1", "20", "5"]
    # The same vote on features computed here, image by image, on one device.
    train, train_labels = direct_features(export_dir, "train", 72)
    val, val_labels = direct_features(export_dir, "val", 40)
    for k in (1, 5, 20):
        want = numpy_knn(train, train_labels, val, val_labels, k, 0.07, 10)
        got = results["knn"][str(k)]
        np.testing.assert_allclose((got["top1"], got["top5"]), want, atol=1e-9)
        assert f"{k}-NN (T=0.07): top-1 {want[0]:.2f}%  top-5 {want[1]:.2f}%" in proc.stdout


def test_bad_input_is_named(export_dir, tmp_path):
    def run(*extra):
        args = knn.parse_args(["--train=synthetic:shapes", "--batch_size=8", *extra])
        return knn.evaluate(args)

    with pytest.raises(FileNotFoundError, match="nowhere"):
        run(f"--checkpoint={tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="synthetic:circles"):
        run(f"--checkpoint={export_dir}", "--val=synthetic:circles")
    with pytest.raises(ValueError, match=r"batch_size=12 .* multiple of 8"):
        run(f"--checkpoint={export_dir}", "--batch_size=12")
    with pytest.raises(ValueError, match="--ks"):
        run(f"--checkpoint={export_dir}", "--ks=10,x")
    flat = tmp_path / "flat"  # images without class sub-folders: nothing to vote with
    flat.mkdir()
    Image.new("RGB", (40, 40)).save(flat / "a.png")
    with pytest.raises(ValueError, match="no labels"):
        run(f"--checkpoint={export_dir}", f"--val=folder:{flat}")


def test_a_folder_without_splits_is_refused_as_its_own_test_set(export_dir, tmp_path):
    for name, colour in (("a", "red"), ("b", "blue")):
        (tmp_path / name).mkdir()
        Image.new("RGB", (40, 40), colour).save(tmp_path / name / "0.png")
    args = knn.parse_args(
        [f"--checkpoint={export_dir}", f"--train=folder:{tmp_path}", "--batch_size=8"]
    )
    with pytest.raises(ValueError, match=r"would be training images.*no train/ and val/ sub-"):
        knn.evaluate(args)

"""The k-NN monitor on your own images: train/ as the memory, val/ as the queries, class-balanced
samples of each, the vote against NumPy, and the refusal of queries that sit in the memory."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino_jax.core import parallel
from dino_jax.core.config import load_config
from dino_jax.data.pipeline import MEAN, STD, resize_center_crop
from dino_jax.data.sources import make_source
from dino_jax.eval.monitor import KnnMonitor
from dino_jax.interop.hub import load_pretrained
from dino_jax.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("amber", "blue", "green")
TINT = {"amber": (8, 4, 0), "blue": (0, 0, 8), "green": (0, 8, 0)}
# The monitor of the runs below: 3 classes x 8 train and x 4 val images.
MONITOR = {
    "eval.knn_every_steps": 0,  # before and after training
    "eval.knn_train_examples": 13,
    "eval.knn_val_examples": 7,
    "eval.knn_k": 5,
}


def noisy_jpegs(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """counts {"train": 8, ...} (or {"": 8} for no split folders) images per class: noise with a
    weak class tint, so that k-NN is neither chance nor certain."""
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 196, (28, 36, 3)) + np.asarray(TINT[name])
                buffer = io.BytesIO()
                Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
                (folder / f"{i:03d}.jpg").write_bytes(buffer.getvalue())
    return root


def train_cli(workdir, *overrides, devices=2):
    command = [
        sys.executable, "-m", "dino_jax.train", "--config=configs/demo.py:smoke",
        f"--workdir={workdir}", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return proc.returncode, proc.stdout


def smoke_config(**overrides):
    config = load_config(f"{REPO / 'configs' / 'demo.py'}:smoke")
    for key, value in {**MONITOR, **overrides}.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    return config


def numpy_knn_top1(train, train_labels, test, test_labels, k, t=0.07):
    """The reference's eval_knn.py: knn_classifier, on the whole similarity matrix: the k most
    cosine-similar memory images vote exp(sim / T) for their labels."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = test @ train.T
    hits = 0
    for row, target in zip(sims, test_labels, strict=True):
        top = np.argsort(-row)[:k]
        votes = np.zeros(train_labels.max() + 1)
        np.add.at(votes, train_labels[top], np.exp(row[top] / t))
        hits += np.argmax(votes) == target
    return 100.0 * hits / len(test)


def teacher_features(export_dir, paths, resize, crop):
    """The exported teacher's features of these image files, one device, no data pipeline."""
    model, variables = load_pretrained(export_dir)
    images = [
        resize_center_crop(np.asarray(Image.open(p).convert("RGB")), resize, crop, Image.BICUBIC)
        for p in paths
    ]
    x = (np.stack(images) / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
    return np.asarray(model.apply(variables, x.astype(np.float32)), np.float64)


@pytest.mark.slow
def test_train_and_val_folders_are_memory_and_queries_and_the_vote_is_numpys(tmp_path):
    root = noisy_jpegs(tmp_path / "pets", {"train": 8, "val": 4})
    workdir = tmp_path / "run"
    overrides = {**MONITOR, "data.source": f"folder:{root}"}
    code, out = train_cli(workdir, *(f"--config.{k}={v}" for k, v in overrides.items()))
    assert code == 0, out
    assert (
        f"k-NN monitor: a memory of 13 images of FolderSource('{root}/train', 24 images), "
        f"7 queries of FolderSource('{root}/val', 12 images)" in out
    ), out

    # Which images: the monitor's own choice, rebuilt here from the same settings.
    config = smoke_config(**{"data.source": f"folder:{root}"})
    monitor = KnnMonitor(config, parallel.make_mesh(config.compute.mesh))
    memory = [make_source(f"folder:{root}", "train").paths[i] for i in monitor.indices["train"]]
    queries = [make_source(f"folder:{root}", "val").paths[i] for i in monitor.indices["val"]]
    assert all(p.parent.parent == root / "train" for p in memory)
    assert all(p.parent.parent == root / "val" for p in queries)
    for images, counts in ((memory, [4, 4, 5]), (queries, [2, 2, 3])):  # every class, balanced
        classes = [p.parent.name for p in images]
        assert sorted(classes.count(c) for c in CLASSES) == counts, classes

    # The vote of the trained teacher, computed here, equals what the run logged.
    data = config.data
    features = [
        teacher_features(workdir / "export", paths, data.eval_resize_size, data.eval_crop_size)
        for paths in (memory, queries)
    ]
    labels = [np.array([CLASSES.index(p.parent.name) for p in ps]) for ps in (memory, queries)]
    want = numpy_knn_top1(features[0], labels[0], features[1], labels[1], k=5)
    knn = {m["step"]: m["knn_top1"] for m in read_metrics(workdir) if "knn_top1" in m}
    assert sorted(knn) == [0, 4]
    assert knn[4] == pytest.approx(want, abs=1e-9), (knn, want)
    assert f"k-NN top-1 of the trained teacher: {want:.1f}%" in out
    # Neither a self-match (100%) nor a degenerate vote: the queries are new images.
    assert 0.0 < want < 100.0, want


@pytest.mark.slow
def test_queries_that_sit_in_the_memory_are_refused_before_training(tmp_path):
    flat = noisy_jpegs(tmp_path / "flat", {"": 3})  # class folders, no train/ and val/
    workdir = tmp_path / "run"
    code, out = train_cli(
        workdir, f"--config.data.source=folder:{flat}", "--config.eval.knn_every_steps=0"
    )
    assert code == 1, out
    assert "Traceback" not in out, out
    (line,) = [line for line in out.splitlines() if " ERROR " in line]
    assert "queries (folder:" in line and "would be images of its memory" in line, line
    assert "no train/ and val/ sub-folders" in line and "data.eval_source" in line, line
    assert not (workdir / "checkpoints").exists()

    # The same files named twice: the split tree's train/ as the queries' own source.
    tree = noisy_jpegs(tmp_path / "tree", {"train": 2, "val": 1})
    mesh = parallel.make_mesh((("data", -1),))
    config = smoke_config(**{"data.source": f"folder:{tree}"})
    config.data.eval_source = f"folder:{tree}/../tree/train"
    with pytest.raises(ValueError, match=r"6 image file\(s\) are in both"):
        KnnMonitor(config, mesh)
    # A flat folder with a flat folder of other images as the queries: accepted.
    other = noisy_jpegs(tmp_path / "other", {"": 1}, seed=1)
    config = smoke_config(
        **{"data.source": f"folder:{flat}", "data.eval_source": f"folder:{other}"}
    )
    monitor = KnnMonitor(config, mesh)
    assert (len(monitor.indices["train"]), len(monitor.indices["val"])) == (9, 3)

"""grain pipelines: determinism across workers and processes, exact resume, epochs, eval order."""

import json

import numpy as np
import pytest
from absl import flags
from PIL import Image

from dino_jax.data.pipeline import (
    batches_per_epoch,
    eval_dataset,
    resize_center_crop,
    train_dataset,
)


def in_memory_source(n, seed=0):
    """Records with label == index, so that batches say which examples they hold."""
    rng = np.random.default_rng(seed)
    return [
        {"image": rng.integers(0, 256, (48, 40, 3), np.uint8), "label": np.int32(i)}
        for i in range(n)
    ]


def take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture
def config(tiny_config):
    return tiny_config(batch_size=4)


def test_batch_layout(config):
    (batch,) = take(
        train_dataset(config, in_memory_source(12), process_index=0, process_count=1), 1
    )
    assert batch["global"].shape == (4, 2, 32, 32, 3) and batch["global"].dtype == np.float32
    assert batch["local"].shape == (4, 2, 16, 16, 3)
    assert batch["label"].shape == (4,)


def test_workers_do_not_change_batches(config):
    flags.FLAGS.mark_as_parsed()  # grain's multiprocessing reads absl flags
    source = in_memory_source(12)
    kw = {"process_index": 0, "process_count": 1}
    inline = take(train_dataset(config, source, **kw), 4)
    config.data.num_workers = 2
    workers = take(train_dataset(config, source, **kw), 4)
    assert_batches_equal(inline, workers)


def test_resume_from_saved_iterator_state(config):
    source = in_memory_source(12)
    it = iter(train_dataset(config, source, process_index=0, process_count=1))
    for _ in range(4):  # past the first epoch of 3 batches
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # the state travels as JSON in checkpoints
    expected = [next(it) for _ in range(3)]
    resumed = iter(train_dataset(config, source, process_index=0, process_count=1))
    resumed.set_state(state)
    assert_batches_equal([next(resumed) for _ in range(3)], expected)


def test_processes_get_disjoint_slices_of_the_same_global_batches(config):
    source = in_memory_source(16)
    config.train.batch_size = 8
    single = take(train_dataset(config, source, process_index=0, process_count=1), 2)
    parts = [
        take(train_dataset(config, source, process_index=p, process_count=2), 2) for p in (0, 1)
    ]
    for step, whole in enumerate(single):
        first, second = parts[0][step], parts[1][step]
        assert not set(first["label"]) & set(second["label"])
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])


def test_each_epoch_is_a_new_permutation_without_the_remainder(config):
    source = in_memory_source(10)  # 2 batches of 4 per epoch; 2 examples dropped each epoch
    assert batches_per_epoch(config, len(source)) == 2
    batches = take(train_dataset(config, source, process_index=0, process_count=1), 4)
    epochs = [np.concatenate([b["label"] for b in batches[i : i + 2]]) for i in (0, 2)]
    for labels in epochs:
        assert len(set(labels)) == 8 and set(labels) <= set(range(10))
    assert not np.array_equal(epochs[0], epochs[1])


def test_too_little_data_for_one_batch(config):
    with pytest.raises(ValueError, match="fewer than one batch of batch_size=4"):
        train_dataset(config, in_memory_source(3), process_index=0, process_count=1)


def test_batch_not_divisible_by_processes(config):
    with pytest.raises(ValueError, match="batch_size=4 is not divisible by 3 processes"):
        train_dataset(config, in_memory_source(12), process_index=0, process_count=3)


def test_eval_dataset_in_order_and_padded(config):
    config.data.eval_resize_size, config.data.eval_crop_size = 36, 32
    source = in_memory_source(10)
    parts = [
        take(eval_dataset(config, "val", 4, source, process_index=p, process_count=2), 3)
        for p in (0, 1)
    ]
    labels = np.concatenate(
        [np.concatenate([parts[0][k]["label"], parts[1][k]["label"]]) for k in range(3)]
    )
    valid = np.concatenate(
        [np.concatenate([parts[0][k]["valid"], parts[1][k]["valid"]]) for k in range(3)]
    )
    np.testing.assert_array_equal(labels, [*range(10), -1, -1])
    np.testing.assert_array_equal(valid, [True] * 10 + [False] * 2)
    assert parts[0][0]["image"].shape == (2, 32, 32, 3)


def test_resize_center_crop_follows_torchvision():
    image = np.random.default_rng(0).integers(0, 256, (200, 300, 3), np.uint8)  # H 200, W 300
    got = resize_center_crop(image, 256, 224, Image.BICUBIC)
    # Shorter side to 256: 384 x 256; centre crop 224: left (384-224)/2 = 80, top (256-224)/2 = 16.
    resized = Image.fromarray(image).resize((384, 256), Image.BICUBIC)
    np.testing.assert_array_equal(got, np.asarray(resized)[16:240, 80:304])

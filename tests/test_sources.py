"""Sources: image folders (with bad files), tfds data sources, the synthetic dataset, errors."""

import io
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dino_jax.data.sources import (
    LABEL_POOL_FACTOR,
    DecodedSource,
    FolderSource,
    Subset,
    balanced_indices,
    balanced_subset,
    make_source,
    sample_indices,
    shared_examples,
)


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def rgb(seed, size=(40, 30)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), np.uint8))


@pytest.fixture
def class_folder(tmp_path):
    """cat/ and dog/ with every supported format and odd modes, plus unreadable files."""
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat" / "a.jpg").write_bytes(encode(rgb(0), "JPEG"))
    (tmp_path / "cat" / "b.png").write_bytes(encode(rgb(1).convert("P"), "PNG"))
    (tmp_path / "cat" / "c.webp").write_bytes(encode(rgb(2), "WEBP"))
    (tmp_path / "cat" / "d.bmp").write_bytes(encode(rgb(3).convert("L"), "BMP"))
    (tmp_path / "dog" / "e.jpg").write_bytes(encode(rgb(4).convert("CMYK"), "JPEG"))
    (tmp_path / "dog" / "f.png").write_bytes(encode(rgb(5).convert("RGBA"), "PNG"))
    sixteen = Image.fromarray(np.full((20, 20), 40000, np.uint16))
    (tmp_path / "dog" / "g.png").write_bytes(encode(sixteen, "PNG"))
    (tmp_path / "dog" / "h_corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "dog" / "i_truncated.jpg").write_bytes(encode(rgb(6, (300, 200)), "JPEG")[:300])
    (tmp_path / "dog" / "j_text.png").write_text("hello")
    (tmp_path / "dog" / "notes.txt").write_text("not an image suffix: ignored")
    return tmp_path


def test_folder_labels_from_sorted_class_folders(class_folder):
    source = FolderSource(str(class_folder))
    assert source.class_names == ["cat", "dog"]
    assert len(source) == 10  # notes.txt is not an image
    labels = {p.split("/")[-1]: source[i]["label"] for i, p in enumerate(map(str, source.paths))}
    assert labels["a.jpg"] == 0 and labels["e.jpg"] == 1


def test_flat_folder_has_no_labels(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(encode(rgb(i), "PNG"))
    source = FolderSource(str(tmp_path))
    assert [source[i]["label"] for i in range(3)] == [-1, -1, -1]
    assert source.class_names == []


def test_decoded_source_converts_modes_and_skips_bad_files(class_folder, caplog):
    source = DecodedSource(FolderSource(str(class_folder)))
    names = [p.name for p in source.source.paths]
    with caplog.at_level(logging.WARNING):
        records = [source[i] for i in range(len(source))]
    for record in records:
        assert record["image"].dtype == np.uint8 and record["image"].shape[-1] == 3
    bad = [i for i, n in enumerate(names) if n.startswith(("h_", "i_", "j_"))]
    # Each unreadable file is replaced by the next readable one (wrapping around).
    for i in bad:
        replacement = next(j % len(names) for j in range(i, i + 10) if j % len(names) not in bad)
        np.testing.assert_array_equal(records[i]["image"], records[replacement]["image"])
    assert len(source.skipped) >= 3
    assert "h_corrupt.jpg" in caplog.text and "Skipped" in caplog.text
    # A second epoch meets the same files again: counted once each, each path shown once.
    distinct = len(source.skipped)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _ = [source[i] for i in range(len(source))]
    assert len(source.skipped) == distinct
    last = caplog.records[-1].getMessage()
    assert f"Skipped {distinct} distinct unreadable file(s)" in last
    shown = last.split("(first: ")[1].split(")")[0].split(", ")
    assert len(shown) == len(set(shown)), last
    # 16-bit and CMYK decode to plausible RGB values, not garbage.
    sixteen = records[names.index("g.png")]["image"]
    assert np.all(sixteen == sixteen[0, 0, 0]) and 140 < sixteen[0, 0, 0] < 170  # 40000/65535


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderSource(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="holds no images"):
        FolderSource(str(tmp_path))


def fake_tfds_source(self, split, decoders=None, **kwargs):
    """What tfds.data_source returns with SkipDecoding: encoded image bytes and labels."""
    assert isinstance(decoders["image"], tfds.decode.SkipDecoding)
    return [{"image": encode(rgb(i), "PNG"), "label": np.int64(i % 3)} for i in range(6)]


def test_tfds_source_decodes_in_our_workers():
    with tfds.testing.mock_data(num_examples=6, as_data_source_fn=fake_tfds_source):
        source = DecodedSource(make_source("tfds:mnist", "train"))
        assert len(source) == 6
        record = source[4]
    np.testing.assert_array_equal(record["image"], np.asarray(rgb(4)))
    assert record["label"] == 1


def test_unknown_sources_fail_clearly():
    with pytest.raises(ValueError, match="not_a_dataset_xyz"):
        make_source("tfds:not_a_dataset_xyz", "train")
    with pytest.raises(ValueError, match=r"Unknown data\.source='imagenet'"):
        make_source("imagenet")


def test_synthetic_source_by_name():
    source = make_source("synthetic:shapes", "val")
    record = DecodedSource(source)[0]
    assert record["image"].dtype == np.uint8 and "mask" in record


# ---------------------------------------------------------------------------------------------
# Splits of a folder, evaluation subsets, and sources that share examples.


def image_tree(root, layout, size=(12, 12)):
    """layout: {"train/cat": 3, ...} -> that many small PNGs in each folder."""
    for i, (folder, count) in enumerate(layout.items()):
        (root / folder).mkdir(parents=True)
        for j in range(count):
            (root / folder / f"{j}.png").write_bytes(encode(rgb(10 * i + j, size), "PNG"))
    return root


def test_folder_with_train_and_val_has_its_splits_there(tmp_path):
    image_tree(tmp_path, {"train/cat": 3, "train/dog": 2, "val/cat": 1, "val/dog": 1})
    train, val = (
        make_source(f"folder:{tmp_path}", "train"),
        make_source(f"folder:{tmp_path}", "val"),
    )
    assert (len(train), len(val)) == (5, 2) and train.class_names == val.class_names == [
        "cat",
        "dog",
    ]
    assert all(p.parts[-3] == "train" for p in train.paths)
    assert all(p.parts[-3] == "val" for p in val.paths)
    assert [val[i]["label"] for i in range(2)] == [0, 1]
    with pytest.raises(FileNotFoundError, match=r"split into train/, val/ but has no validation/"):
        make_source(f"folder:{tmp_path}", "validation")
    # A class missing from one split keeps the labels of the others.
    image_tree(tmp_path, {"train/emu": 1})
    val = make_source(f"folder:{tmp_path}", "val")
    assert val.class_names == ["cat", "dog", "emu"] and val[1]["label"] == 1
    assert make_source(f"folder:{tmp_path}", "train")[5]["label"] == 2


def test_folder_without_split_folders_is_one_split(tmp_path):
    image_tree(tmp_path, {"cat": 2, "dog": 2})
    for split in ("train", "val"):
        source = make_source(f"folder:{tmp_path}", split)
        assert len(source) == 4 and source.split is None
    np.testing.assert_array_equal(source.labels(), [0, 0, 1, 1])


def test_balanced_indices_round_robin_over_the_classes():
    sizes = [50, 80, 30, 40]  # sorted by class, as a folder lists its class sub-folders
    labels = np.repeat(np.arange(4), sizes)
    starts = np.cumsum([0, *sizes])
    picked = balanced_indices(labels, 41, seed=3)
    assert len(picked) == len(set(picked)) == 41 and list(picked) == sorted(picked)
    counts = np.bincount(labels[picked], minlength=4)
    assert sorted(counts) == [10, 10, 10, 11]  # 41 = 4 x 10 + 1
    np.testing.assert_array_equal(balanced_indices(labels, 41, seed=3), picked)
    assert not np.array_equal(balanced_indices(labels, 41, seed=4), picked)
    # Drawn from the whole of every class, not its first items.
    for c in range(4):
        within = picked[labels[picked] == c] - starts[c]
        assert within.max() >= counts[c] and within.max() > sizes[c] // 2, (c, within)
    # A class with too few items gives them all; the others share its turns, evenly.
    labels = np.repeat(np.arange(3), [2, 30, 30])
    counts = np.bincount(labels[balanced_indices(labels, 21)], minlength=3)
    assert counts[0] == 2 and sorted(counts[1:]) == [9, 10]
    np.testing.assert_array_equal(balanced_indices(labels, 100), np.arange(62))


class Records:
    """A source of `labels` whose records cost a read each (as tfds's): reads are counted."""

    def __init__(self, labels, batched=False):
        self.label_list, self.reads = list(labels), 0
        if batched:
            self.__getitems__ = lambda keys: [self[k] for k in keys]

    def __len__(self):
        return len(self.label_list)

    def __getitem__(self, index):
        self.reads += 1
        return {"image": b"", "label": self.label_list[index]}


@pytest.mark.parametrize("batched", [False, True])
def test_sample_of_a_costly_source_reads_a_bounded_pool(batched):
    labels = np.arange(10_000) % 5
    source = Records(labels, batched)
    picked = sample_indices(DecodedSource(source), 30)
    assert source.reads == LABEL_POOL_FACTOR * 30  # a pool, not the 10,000 records
    assert np.array_equal(np.bincount(labels[picked]), [6] * 5)
    assert picked.max() > 5000  # the pool spans the whole split
    np.testing.assert_array_equal(sample_indices(source, 30), picked)
    small = Records(labels[:100])
    assert len(sample_indices(small, 30)) == 30 and small.reads == 100  # small: every label
    assert list(sample_indices(small, 0)) == list(range(100))


def test_folder_sample_reads_labels_from_paths_only(tmp_path):
    image_tree(tmp_path, {"a": 6, "b": 6, "c": 6})
    source = FolderSource(str(tmp_path))
    for path in source.paths:
        path.write_bytes(b"unreadable now: labels must come from the paths")
    picked = sample_indices(source, 7)
    assert sorted(np.bincount(source.labels()[picked])) == [2, 2, 3]
    assert isinstance(balanced_subset(source, 7), Subset) and balanced_subset(source, 0) is source


def test_textures_labels_without_images_equal_the_records():
    source = make_source("synthetic:textures", "val")
    labels = source.labels()
    assert len(labels) == len(source)
    assert [labels[i] for i in range(0, 2000, 97)] == [
        source[i]["label"] for i in range(0, 2000, 97)
    ]


def test_shared_examples_of_folders_synthetic_and_tfds(tmp_path):
    tree = image_tree(tmp_path / "tree", {"train/a": 2, "train/b": 2, "val/a": 1, "val/b": 1})
    flat = image_tree(tmp_path / "flat", {"a": 2, "b": 2})
    assert (
        shared_examples(
            make_source(f"folder:{tree}", "train"), make_source(f"folder:{tree}", "val")
        )
        is None
    )
    why = shared_examples(
        make_source(f"folder:{flat}", "train"), make_source(f"folder:{flat}", "val")
    )
    assert "4 image file(s) are in both" in why and "no train/ and val/ sub-folders" in why
    # The same files under another spelling of the path.
    other = make_source(f"folder:{tmp_path}/flat/../tree/train", "val")
    assert "4 image file(s)" in shared_examples(make_source(f"folder:{tree}", "train"), other)
    shapes = [make_source("synthetic:shapes", split) for split in ("train", "val", "train")]
    assert shared_examples(shapes[0], shapes[1]) is None
    assert shared_examples(shapes[0], shapes[2]) == "both are the 'train' split of synthetic:shapes"
    assert shared_examples(shapes[0], make_source("synthetic:textures", "train")) is None

    template = tfds.core.ShardedFileTemplate(
        data_dir="/d", dataset_name="x", split="train", filetype_suffix="array_record"
    )
    info = SimpleNamespace(
        splits=tfds.core.SplitDict(
            [tfds.core.SplitInfo("train", [10, 10], 0, filename_template=template)]
        )
    )

    def tfds_split(split):
        return SimpleNamespace(dataset_info=info, split=split)

    assert shared_examples(tfds_split("train[:50%]"), tfds_split("train[50%:]")) is None
    assert "x-train.array_record-00000-of-00002" in shared_examples(
        tfds_split("train[:50%]"), tfds_split("train")
    )

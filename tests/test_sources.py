"""Sources: image folders (with bad files), tfds data sources, the synthetic dataset, errors."""

import io
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dino_jax.data.sources import DecodedSource, FolderSource, make_source


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

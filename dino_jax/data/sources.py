"""Where images come from: tfds ArrayRecord datasets, image folders, and the built-in datasets.

`make_source("tfds:imagenet2012" | "folder:/path" | "synthetic:shapes" | "synthetic:textures" |
"synthetic:objects", split)` returns a random-access source of records `{"image": encoded bytes
or uint8 [H, W, 3], "label": int}`.
`DecodedSource` turns those into RGB arrays in the workers, skipping (and counting) unreadable
files so that one bad JPEG never stops a run.
`sample_indices` picks the seeded, class-balanced examples that every evaluation uses when it
takes N examples of a split; `shared_examples` tells whether two sources may hold the same example
(a k-NN query must never sit in the memory).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from dino_jax.data.augment import decode_image
from dino_jax.data.objects import ObjectsSource
from dino_jax.data.synthetic import ShapesSource, SyntheticSource
from dino_jax.data.textures import TexturesSource

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
NO_LABEL = -1
# Give up after this many unreadable files in a row: the data is broken, not a file.
MAX_CONSECUTIVE_FAILURES = 100
# How many failing paths a warning names.
REPORTED_PATHS = 5
# A folder holding train/ and one of the others is a tree of splits (ImageFolder's ROOT/train and
# ROOT/val, as the reference's --data_path): the split names the sub-folder.
SPLIT_FOLDERS = ("train", "val", "validation", "test")
# Evaluation subsets are the same in every run, whatever the training seed.
SUBSET_SEED = 0
# Sources whose labels cost a record read each (tfds, synthetic:shapes) are sampled from a
# uniform random pool of this many times the examples wanted: see `sample_indices`.
LABEL_POOL_FACTOR = 4
# Records read per call when reading labels.
LABEL_CHUNK = 1024

log = logging.getLogger(__name__)


class FolderSource:
    """Images under a directory: class sub-folders give labels (sorted names), a flat folder none.

    A directory holding `train/` and `val/` (or `validation/`, `test/`) is a tree of splits:
    `split` names the sub-folder to read. Any other directory is one split, whatever `split`
    (then `self.split` is None). Works for local paths and gs:// (etils.epath). Files are read,
    not decoded, here.
    """

    def __init__(self, root: str, split: str | None = None):
        top = epath.Path(root)
        if not top.is_dir():
            raise FileNotFoundError(f"folder:{root} does not exist or is not a directory.")
        splits = split_folders(top)
        self.split = split if splits and split is not None else None
        self.root = top / split if self.split else top
        if self.split and split not in splits:
            raise FileNotFoundError(
                f"folder:{root} is split into {', '.join(s + '/' for s in splits)} but has no "
                f"{split}/: set data.split / data.eval_split (--train_split / --val_split in the "
                "evaluation commands) to one of them."
            )
        self.paths = sorted(_image_files(self.root))
        if not self.paths:
            raise ValueError(
                f"folder:{root} holds no images ({', '.join(IMAGE_SUFFIXES)}): point it at the "
                "directory that contains the images or their class sub-folders."
            )
        names = {p.parent.name for p in self.paths if p.parent != self.root}
        if self.split:  # one label per class in every split, even if a split lacks a class
            names |= {d.name for s in splits for d in (top / s).iterdir() if d.is_dir()}
        self.class_names = sorted(names)
        if self.class_names and any(p.parent == self.root for p in self.paths):
            log.warning("folder:%s mixes images at its top level with class folders", root)
        self._label = {name: i for i, name in enumerate(self.class_names)}

    def __len__(self) -> int:
        return len(self.paths)

    def _label_of(self, path: epath.Path) -> int:
        return self._label.get(path.parent.name, NO_LABEL) if path.parent != self.root else NO_LABEL

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        return {"image": path.read_bytes(), "label": self._label_of(path), "path": str(path)}

    def labels(self) -> np.ndarray:
        """Every image's label, from its path alone (no file is read)."""
        return np.array([self._label_of(p) for p in self.paths], np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r}, {len(self)} images)"


def split_folders(root: epath.Path) -> list[str]:
    """The split sub-folders of `root` if it is a tree of splits (train/ and another), else []."""
    found = [name for name in SPLIT_FOLDERS if (root / name).is_dir()]
    return found if "train" in found and len(found) > 1 else []


def _image_files(root: epath.Path):
    """Image files under `root`, recursively (a walk, since gs:// globs lack `**`)."""
    folders = [root]
    while folders:
        for path in folders.pop().iterdir():
            if path.is_dir():
                folders.append(path)
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                yield path


def tfds_source(name: str, split: str, data_dir: str | None = None) -> Sequence:
    """A tfds ArrayRecord data source whose images stay encoded (decoded later, in the workers)."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(
            name,
            split=split,
            data_dir=data_dir or None,
            download=False,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"tfds:{name} is not a tfds dataset name ({e}).") from e
    except (AssertionError, FileNotFoundError, KeyError, NotImplementedError) as e:
        # Not built, built without that split (tfds: "splits is empty"), or built as TFRecord,
        # which has no random access.
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FileNotFoundError(
            f"tfds:{name} split {split!r} is not prepared as ArrayRecord under "
            f"data_dir={data_dir!r}: build it with `tfds build {name} "
            f"--file_format=array_record` (ImageNet needs its manual download) and point "
            f"data.data_dir at it. ({first_line})"
        ) from e


# The built-in datasets, generated on the fly.
SYNTHETIC = {"shapes": ShapesSource, "textures": TexturesSource, "objects": ObjectsSource}


def make_source(spec: str, split: str = "train", data_dir: str | None = None):
    """The source named by `spec`: "tfds:NAME", "folder:PATH", "synthetic:shapes",
    "synthetic:textures" or "synthetic:objects"."""
    kind, _, arg = spec.partition(":")
    if kind == "tfds" and arg:
        return tfds_source(arg, split, data_dir)
    if kind == "folder" and arg:
        return FolderSource(arg, split)
    if kind == "synthetic" and arg in SYNTHETIC:
        return SYNTHETIC[arg](split=split)
    raise ValueError(
        f"Unknown data.source={spec!r}; use 'tfds:NAME', 'folder:PATH', 'synthetic:shapes', "
        "'synthetic:textures' or 'synthetic:objects'."
    )


class DecodedSource:
    """Records as `{"image": uint8 [H, W, 3], "label": int32}`; unreadable images are skipped.

    A file that cannot be decoded is replaced by the next readable one, so indices stay dense and
    batches keep their size and order whatever the number of workers. Each process counts the
    distinct files it skipped (a file comes round again every epoch) and logs them with the first
    paths.
    """

    def __init__(self, source: Sequence, min_side: int | None = None):
        self.source = source
        self.min_side = min_side
        self.skipped: dict[str, int] = {}  # path -> times skipped, in the order first seen

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            record = self.source[(index + attempt) % len(self.source)]
            try:
                return self._decode(record)
            except Exception as e:
                self._count_skip(record, index + attempt, e)
        raise RuntimeError(
            f"{MAX_CONSECUTIVE_FAILURES} unreadable images in a row from index {index} of "
            f"{self.source!r}: the data looks broken "
            f"(first: {list(self.skipped)[:REPORTED_PATHS]})."
        )

    def _decode(self, record: dict[str, Any]) -> dict[str, Any]:
        image = record["image"]
        if isinstance(image, bytes | np.bytes_):
            image = decode_image(bytes(image), self.min_side)
        out = {"image": np.asarray(image, np.uint8), "label": np.int32(record.get("label", -1))}
        if "mask" in record:
            out["mask"] = np.asarray(record["mask"], np.uint8)
        return out

    def _count_skip(self, record: dict[str, Any], index: int, error: Exception) -> None:
        path = str(record.get("path", f"index {index}"))
        self.skipped[path] = self.skipped.get(path, 0) + 1
        log.warning(
            "Skipped %d distinct unreadable file(s) so far, %d time(s) in all (first: %s); "
            "latest: %s",
            len(self.skipped),
            sum(self.skipped.values()),
            ", ".join(list(self.skipped)[:REPORTED_PATHS]),
            error,
        )

    def __repr__(self) -> str:
        return f"DecodedSource({self.source!r})"


class Subset:
    """The examples `indices` of `source`, in that order: a random-access view for grain."""

    def __init__(self, source: Sequence, indices: Sequence[int]):
        self.source = source
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[int(self.indices[index])]

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, {len(self)} examples)"


def balanced_indices(labels: Sequence[int], n: int, seed: int = SUBSET_SEED) -> np.ndarray:
    """Positions (ascending) of `n` items of `labels`, class-balanced: round-robin over the
    classes, each class's items taken in a seeded random order, the classes of every round in a
    seeded order too (so that no class always gets the remainder). Per-class counts differ by at
    most 1 while every class has items left; a class that runs out leaves its turns to the others.
    The same `labels`, `n` and `seed` give the same positions.
    """
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, cls = np.unique(labels, return_inverse=True)
    cls = cls.reshape(-1)
    # Each class's items in a seeded order: group a random permutation by class, stably.
    order = rng.permutation(len(labels))
    grouped = order[np.argsort(cls[order], kind="stable")]
    starts = np.searchsorted(cls[grouped], np.arange(len(classes)))
    rank = np.empty(len(labels), np.int64)  # an item's turn within its class
    rank[grouped] = np.arange(len(labels)) - starts[cls[grouped]]
    turn = rng.permutation(len(classes))  # the classes' order within a round
    return np.sort(np.lexsort((turn[cls], rank))[: max(n, 0)])


def read_labels(source: Sequence, indices: Sequence[int]) -> np.ndarray:
    """The labels of `source[indices]` (NO_LABEL where none): from the source's own `labels()`
    when it has one (a folder's paths, synthetic:textures), else from its records, read in
    chunks (`__getitems__` where the source has it, as tfds data sources do)."""
    raw = source.source if isinstance(source, DecodedSource) else source
    indices = np.asarray(indices, np.int64)
    if callable(getattr(raw, "labels", None)):
        return np.asarray(raw.labels(), np.int64)[indices]
    get_many = getattr(raw, "__getitems__", None)
    labels = []
    for start in range(0, len(indices), LABEL_CHUNK):
        chunk = [int(i) for i in indices[start : start + LABEL_CHUNK]]
        records = get_many(chunk) if get_many else [raw[i] for i in chunk]
        labels.extend(int(record.get("label", NO_LABEL)) for record in records)
    return np.asarray(labels, np.int64)


def sample_indices(source: Sequence, n: int, seed: int = SUBSET_SEED) -> np.ndarray:
    """Indices (ascending) of a seeded, class-balanced sample of `n` examples of the whole
    `source` (all of them when n <= 0 or n >= len): see `balanced_indices`.

    Labels come from `read_labels`. Where they are cheap (`labels()`: folders, textures) or the
    split is at most LABEL_POOL_FACTOR * n examples, every label is read, and the sample is exactly
    balanced. Otherwise (a large tfds split, synthetic:shapes) reading every record would cost a
    pass over the images (ImageNet's train split: ~140 GB), so only the labels of a seeded uniform
    random pool of LABEL_POOL_FACTOR * n examples of the whole split are read, and the sample is
    balanced within that pool: exactly balanced unless a class has fewer than n / C examples in
    the pool (for ImageNet's 1000 classes and n = 10,000: 40 expected per class, 10 needed).
    """
    size = len(source)
    if n <= 0 or n >= size:
        return np.arange(size)
    raw = source.source if isinstance(source, DecodedSource) else source
    if callable(getattr(raw, "labels", None)) or size <= LABEL_POOL_FACTOR * n:
        pool = np.arange(size)
    else:
        rng = np.random.default_rng(seed)
        pool = np.sort(rng.choice(size, LABEL_POOL_FACTOR * n, replace=False))
    return pool[balanced_indices(read_labels(source, pool), n, seed)]


def balanced_subset(source: Sequence, n: int, seed: int = SUBSET_SEED) -> Sequence:
    """`source` itself when n <= 0 or n >= len(source), else its `sample_indices` subset."""
    if n <= 0 or n >= len(source):
        return source
    return Subset(source, sample_indices(source, n, seed))


def shared_examples(a: Sequence, b: Sequence) -> str | None:
    """Why sources `a` and `b` (as make_source builds them, possibly decoded) may hold the same
    example, or None if they cannot: folders by their files' real paths, synthetic data by
    (dataset, split, seed), tfds splits by the records of the shards they read. Sources of other
    kinds are taken to share examples only when they are the same object."""
    a = a.source if isinstance(a, DecodedSource) else a
    b = b.source if isinstance(b, DecodedSource) else b
    if isinstance(a, FolderSource) and isinstance(b, FolderSource):
        common = _real_paths(a) & _real_paths(b)
        if not common:
            return None
        single = [str(s.root) for s in (a, b) if s.split is None]
        why = f"{len(common)} image file(s) are in both ({sorted(common)[0]}, ...)"
        if single:
            why += (
                f"; {single[0]} has no train/ and val/ sub-folders, so it is one split "
                "whatever the split named"
            )
        return why
    if isinstance(a, SyntheticSource) and isinstance(b, SyntheticSource):
        same = (a.name, a.split, a.seed) == (b.name, b.split, b.seed)
        return f"both are the {a.split!r} split of {a.name}" if same else None
    shards_a, shards_b = _tfds_shards(a), _tfds_shards(b)
    if shards_a is not None and shards_b is not None:
        for file, start, end in shards_a:
            for other, other_start, other_end in shards_b:
                if file == other and start < other_end and other_start < end:
                    return f"both read records of {os.path.basename(file)}"
        return None
    return "they are the same source" if a is b else None


def _real_paths(source: FolderSource) -> set[str]:
    """The source's file paths with its root resolved (symlinks, `..`, relative paths)."""
    root = str(source.root)
    real = root if "://" in root else os.path.realpath(root)
    return {real + str(path)[len(root) :] for path in source.paths}


def _tfds_shards(source) -> list[tuple[str, int, int]] | None:
    """(file, first, end) record ranges a tfds data source reads, or None for other sources."""
    info, split = getattr(source, "dataset_info", None), getattr(source, "split", None)
    if info is None or split is None:
        return None
    try:
        instructions = info.splits[split].file_instructions
    except (KeyError, ValueError, AttributeError):
        return None
    return [(f.filename, f.skip, f.skip + f.take) for f in instructions]

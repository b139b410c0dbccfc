"""Where images come from: tfds ArrayRecord datasets, image folders, and the built-in datasets.

`make_source("tfds:imagenet2012" | "folder:/path" | "synthetic:shapes" | "synthetic:textures",
split)` returns a random-access source of records `{"image": encoded bytes or uint8 [H, W, 3],
"label": int}`.
`DecodedSource` turns those into RGB arrays in the workers, skipping (and counting) unreadable
files so that one bad JPEG never stops a run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from dino_jax.data.augment import decode_image
from dino_jax.data.synthetic import ShapesSource
from dino_jax.data.textures import TexturesSource

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
NO_LABEL = -1
# Give up after this many unreadable files in a row: the data is broken, not a file.
MAX_CONSECUTIVE_FAILURES = 100
# How many failing paths a warning names.
REPORTED_PATHS = 5

log = logging.getLogger(__name__)


class FolderSource:
    """Images under a directory: class sub-folders give labels (sorted names), a flat folder none.

    Works for local paths and gs:// (etils.epath). Files are read, not decoded, here.
    """

    def __init__(self, root: str):
        self.root = epath.Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"folder:{root} does not exist or is not a directory.")
        self.paths = sorted(_image_files(self.root))
        if not self.paths:
            raise ValueError(
                f"folder:{root} holds no images ({', '.join(IMAGE_SUFFIXES)}): point it at the "
                "directory that contains the images or their class sub-folders."
            )
        self.class_names = sorted({p.parent.name for p in self.paths if p.parent != self.root})
        if self.class_names and any(p.parent == self.root for p in self.paths):
            log.warning("folder:%s mixes images at its top level with class folders", root)
        self._label = {name: i for i, name in enumerate(self.class_names)}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        label = (
            self._label.get(path.parent.name, NO_LABEL) if path.parent != self.root else NO_LABEL
        )
        return {"image": path.read_bytes(), "label": label, "path": str(path)}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r}, {len(self)} images)"


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
SYNTHETIC = {"shapes": ShapesSource, "textures": TexturesSource}


def make_source(spec: str, split: str = "train", data_dir: str | None = None):
    """The source named by `spec`: "tfds:NAME", "folder:PATH", "synthetic:shapes" or
    "synthetic:textures"."""
    kind, _, arg = spec.partition(":")
    if kind == "tfds" and arg:
        return tfds_source(arg, split, data_dir)
    if kind == "folder" and arg:
        return FolderSource(arg)
    if kind == "synthetic" and arg in SYNTHETIC:
        return SYNTHETIC[arg](split=split)
    raise ValueError(
        f"Unknown data.source={spec!r}; use 'tfds:NAME', 'folder:PATH', 'synthetic:shapes' or "
        "'synthetic:textures'."
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

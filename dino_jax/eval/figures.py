"""Figures a person looks at: attention maps with their masks (the paper's Figure 1 and the
reference's visualize_attention.py), and the monitors' curves over training steps."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from etils import epath
from matplotlib.figure import Figure

MASK_COLOUR = np.array([1.0, 0.25, 0.1])  # the overlay's colour, RGB in [0, 1]
TRUTH_COLOUR = "lime"
PANELS_PER_ROW = 5


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The uint8 image with `mask` tinted in MASK_COLOUR (the reference's apply_mask)."""
    weight = alpha * mask.astype(np.float32)[..., None]
    return (image * (1.0 - weight) + weight * MASK_COLOUR * 255.0).astype(np.uint8)


def _panel(ax, title: str, picture: np.ndarray, outlines: Sequence[tuple[np.ndarray, str]]):
    ax.imshow(picture)
    for outline, colour in outlines:
        if outline is not None and outline.any():
            ax.contour(outline.astype(np.float32), levels=[0.5], colors=colour, linewidths=1.5)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def figure_of(panels: list[tuple[str, np.ndarray, np.ndarray | None, str]]) -> Figure:
    """A grid of (title, picture, outline mask or None, outline colour) panels."""
    cols = min(PANELS_PER_ROW, len(panels))
    rows = math.ceil(len(panels) / cols)
    figure = Figure(figsize=(3 * cols, 3 * rows), layout="constrained")
    for i, (title, picture, outline, colour) in enumerate(panels):
        _panel(figure.add_subplot(rows, cols, i + 1), title, picture, [(outline, colour)])
    return figure


def attention_figure(
    images: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray,
    truth: np.ndarray,
    scores: np.ndarray,
    title: str,
) -> Figure:
    """One row per scene: the image with its true mask outlined, each head's attention map, and
    the image tinted by the mask of the heads' mean map (with the true outline beside it).

    images uint8 [S, H, W, 3]; maps [S, heads, H, W] and masks bool [S, heads + 1, H, W] at pixel
    resolution (each head's, then the mean map's); truth bool [S, H, W]; scores [S, heads + 1]
    Jaccard of each mask with the truth.
    """
    scenes, heads = maps.shape[:2]
    cols = heads + 2
    figure = Figure(figsize=(1.9 * cols, 2.0 * scenes + 0.4), layout="constrained")
    figure.suptitle(title, fontsize=11)
    for s in range(scenes):
        row = [
            ("image, true mask" if s == 0 else "", images[s], [(truth[s], TRUTH_COLOUR)]),
            *(
                (f"head {h}  J={scores[s, h]:.2f}", maps[s, h], [(masks[s, h], "white")])
                for h in range(heads)
            ),
            (
                f"mean map  J={scores[s, -1]:.2f}",
                overlay(images[s], masks[s, -1]),
                [(truth[s], TRUTH_COLOUR)],
            ),
        ]
        for c, (name, picture, outlines) in enumerate(row):
            _panel(figure.add_subplot(scenes, cols, s * cols + c + 1), name, picture, outlines)
    return figure


# The monitors' figures in metrics.jsonl, and how the curves name them.
CURVES = {
    "knn_top1": "k-NN top-1 of the teacher (%)",
    "knn_top1_retain": "k-NN top-1 on eval.knn_retain_source (%)",
    "jaccard_mean_map": "Jaccard of the mean map's mask",
    "jaccard_best_head": "Jaccard of the best head's mask",
    "patch_jaccard": "Jaccard of the patch features' linear probe",
}


def monitor_figure(records: Sequence[dict]) -> Figure | None:
    """The monitors' figures over training steps, one panel per kind, from metrics records
    (`metrics.read_metrics`); None when no record has one."""
    panels = [
        ("k-NN", ["knn_top1", "knn_top1_retain"]),
        ("segmentation", ["jaccard_mean_map", "jaccard_best_head", "patch_jaccard"]),
    ]
    panels = [(name, [k for k in keys if any(k in r for r in records)]) for name, keys in panels]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        return None
    figure = Figure(figsize=(5 * len(panels), 3.4), layout="constrained")
    for i, (name, keys) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), i + 1)
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o", label=CURVES[key])
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure


def save(figure: Figure, path: epath.PathLike, dpi: int = 100) -> None:
    """The figure as a PNG at `path` (any epath: local or a bucket), its directory made."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    path.write_bytes(buffer.getvalue())

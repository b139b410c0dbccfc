"""The attention-map command (the reference's `visualize_attention.py`): a ViT's last-block
cls-attention maps of one image, per head, with the masks that keep 60% of each map's mass; or
their Jaccard index against the true foreground masks of a dataset. The maths is
eval/maths/attention.py.

    # one image (a file, or scene --index of synthetic:shapes val when --image is left out)
    python -m dino_jax.visualize_attention --checkpoint runs/demo/export \\
        --out runs/demo/attention [--image photo.jpg] [--image_size 480] [--threshold 0.6]
    # the masks' Jaccard index on 500 scenes
    python -m dino_jax.visualize_attention --checkpoint runs/demo/export \\
        --jaccard synthetic:shapes --examples 500 --image_size 128 --out runs/demo/attention
    # DINOv2's picture: the patch features' principal components as RGB (eval/maths/pca.py)
    python -m dino_jax.visualize_attention --pca --checkpoint dinov2_vits14_pretrain.pth \\
        --image a.jpg b.jpg c.jpg --image_size 448 --out runs/pca

The image is resized to image_size x image_size (the reference's default) and cropped to a
multiple of the patch size. Written to --out: img.png, attn-head<i>.png (each head's map),
mask_th<t>_head<i>.png (the image with head i's mask), attention.png (all of it on one page,
the mean map with its mask's outline), and jaccard.json in the Jaccard mode. With --pca, for the
images together (4 scenes from --index without --image): pca.png (each image beside its
features' first three foreground components as RGB, the foreground outlined) and pca_<i>.png.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import sys
from collections.abc import Sequence

import jax
import matplotlib.image
import numpy as np
from etils import epath
from PIL import Image

from dino_jax.core import parallel
from dino_jax.data.augment import decode_image
from dino_jax.data.pipeline import eval_dataset
from dino_jax.data.sources import DecodedSource, make_source
from dino_jax.data.synthetic import ShapesSource
from dino_jax.eval import cli, figures
from dino_jax.eval.figures import TRUTH_COLOUR, figure_of, overlay
from dino_jax.eval.maths import attention, pca
from dino_jax.interop import hub

log = logging.getLogger("dino_jax")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dino_jax.visualize_attention",
        description="Self-attention maps of a ViT and their masks (the reference's).",
    )
    cli.add_checkpoint_args(parser)
    cli.add_distributed_args(parser)
    parser.add_argument(
        "--image", nargs="+", default=None, help="Image file(s) (default: synthetic scenes)."
    )
    parser.add_argument("--index", type=int, default=0, help="Scene of synthetic:shapes val.")
    parser.add_argument("--image_size", type=int, default=480, help="Resize to this square.")
    parser.add_argument("--threshold", type=float, default=attention.THRESHOLD, help="Mass kept.")
    parser.add_argument("--out", default=None, help="Directory for the PNGs and JSON.")
    parser.add_argument("--jaccard", default=None, help="Score on a source with masks instead.")
    parser.add_argument("--split", default="val", help="Split of --jaccard.")
    parser.add_argument("--examples", type=int, default=500, help="Images of --jaccard (0: all).")
    parser.add_argument("--batch_size", type=int, default=64, help="Global batch of --jaccard.")
    parser.add_argument("--data_dir", default="", help="tfds data_dir of a tfds: --jaccard.")
    parser.add_argument(
        "--pca", action="store_true", help="DINOv2's PCA picture of the patch features instead."
    )
    parser.add_argument(
        "--pca_threshold", type=float, default=0.0, help="Foreground: first component above it."
    )
    args = parser.parse_args(argv)
    if args.image and len(args.image) > 1 and not args.pca:
        parser.error("the attention maps take one --image; several are for --pca.")
    if (args.jaccard is None or args.pca) and args.out is None:
        parser.error("--out DIR is required to write the pictures.")
    if not 0.0 < args.threshold < 1.0:
        parser.error(f"--threshold={args.threshold} must be between 0 and 1 (0.6 keeps 60%).")
    return args


# ---------------------------------------------------------------------------------------------
# Input.


def read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an image file; a clear error when it is missing or unreadable."""
    file = epath.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"No image file at {path}: check the --image path.")
    try:
        return decode_image(file.read_bytes())
    except ValueError as e:
        raise ValueError(
            f"{path} is not a readable image ({e}); give a JPEG, PNG, WebP or BMP."
        ) from e


def square(image: np.ndarray, size: int, patch_size: int, resample: int) -> np.ndarray:
    """Resize to size x size, then keep the top-left multiple of the patch size (as the
    reference does)."""
    side = size - size % patch_size
    if side == 0:
        raise ValueError(f"--image_size={size} is smaller than the patch size {patch_size}.")
    return np.asarray(Image.fromarray(image).resize((size, size), resample))[:side, :side]


def load_input(args: argparse.Namespace, patch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(image uint8 [S, S, 3], true mask [S, S] or None) at the model's input size."""
    if args.image is not None:
        image, truth = read_image(args.image[0]), None
    else:
        example = ShapesSource("val")[args.index]
        image, truth = example["image"], example["mask"]
        log.info("No --image: scene %d of synthetic:shapes val, with its true mask", args.index)
    image = square(image, args.image_size, patch_size, Image.BILINEAR)
    if truth is not None:
        truth = square(truth, args.image_size, patch_size, Image.NEAREST)
    return image, truth


# ---------------------------------------------------------------------------------------------
# Output.


def save_png(path: epath.Path, array: np.ndarray, **imsave_kwargs) -> None:
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, array, format="png", **imsave_kwargs)
    path.write_bytes(buffer.getvalue())


def write_maps(
    out: epath.Path,
    image: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray,
    threshold: float,
    scores: np.ndarray | None,
    truth: np.ndarray | None,
) -> None:
    """The reference's files, plus attention.png. maps [heads, S, S], masks [heads + 1, S, S]
    (each head's, then the mean map's), scores [heads + 1] Jaccard with `truth` or None."""
    out.mkdir(parents=True, exist_ok=True)
    save_png(out / "img.png", image)
    for head, head_map in enumerate(maps):
        save_png(out / f"attn-head{head}.png", head_map)
        save_png(out / f"mask_th{threshold}_head{head}.png", overlay(image, masks[head]))

    def title(name: str, i: int) -> str:
        return name if scores is None else f"{name}  J={scores[i]:.2f}"

    panels = [("image" + (", true mask" if truth is not None else ""), image, truth, TRUTH_COLOUR)]
    panels += [(title(f"head {h}", h), m, masks[h], "white") for h, m in enumerate(maps)]
    mean_title = title(f"mean map, {threshold:.0%} mass", len(maps))
    panels.append((mean_title, overlay(image, masks[-1]), masks[-1], "white"))
    figures.save(figure_of(panels), out / "attention.png")


def visualize(args: argparse.Namespace) -> dict[str, np.ndarray | None]:
    """The maps and masks of one image, written to args.out. Returns them: {"image" uint8
    [S, S, 3], "maps" [heads, S, S], "masks" bool [heads + 1, S, S] (the last the mean map's),
    "scores" Jaccard [heads + 1] with the true mask, None for an image file}."""
    model, variables = hub.load_pretrained(args.checkpoint, args.arch, args.patch_size)
    patch = getattr(model, "patch_size", 1)
    image, truth = load_input(args, patch)
    maps = hub.attention_maps(model, variables, image[None])[0]  # [heads, h, w]
    masks = np.asarray(attention.upsample(attention.head_masks(maps, args.threshold), patch))
    scores = None if truth is None else np.asarray(attention.jaccard(masks, truth[None]))
    maps = np.asarray(attention.upsample(maps, patch))
    result = {"image": image, "maps": maps, "masks": masks, "scores": scores}
    if jax.process_index() != 0:
        return result  # one image: every process computes it, process 0 writes it
    write_maps(epath.Path(args.out), image, maps, masks, args.threshold, scores, truth)
    print(f"{len(maps)} heads' maps and masks ({args.threshold:.0%} of the mass) in {args.out}")
    if scores is not None:
        best = int(np.argmax(scores[:-1]))
        print(
            f"Jaccard with the true mask: mean map {scores[-1]:.3f}, best head {best} "
            f"{scores[best]:.3f}"
        )
    return result


def pca_picture(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """DINOv2's picture of the images' patch features (eval/maths/pca.py), written to args.out.
    Returns {"images" uint8 [B, S, S, 3], "rgb" [B, S/p, S/p, 3], "foreground" [B, S/p, S/p]}."""
    model, variables = hub.load_pretrained(args.checkpoint, args.arch, args.patch_size)
    patch = getattr(model, "patch_size", 1)
    if args.image:
        pictures = [read_image(path) for path in args.image]
    else:
        pictures = [ShapesSource("val")[args.index + i]["image"] for i in range(4)]
        log.info("No --image: scenes %d-%d of synthetic:shapes val", args.index, args.index + 3)
    images = np.stack([square(p, args.image_size, patch, Image.BILINEAR) for p in pictures])
    features = np.asarray(hub.patch_features(model, variables, images))
    rgb, mask = pca.pca_rgb(features, args.pca_threshold)
    result = {"images": images, "rgb": rgb, "foreground": mask}
    if jax.process_index() != 0:
        return result
    out = epath.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    panels = []
    for i, (image, colours, fg) in enumerate(zip(images, rgb, mask, strict=True)):
        pixels = np.repeat(np.repeat(colours, patch, axis=0), patch, axis=1)
        save_png(out / f"pca_{i}.png", pixels)
        outline = np.repeat(np.repeat(fg, patch, axis=0), patch, axis=1)
        panels += [(f"image {i}", image, None, "white"), (f"PCA {i}", pixels, outline, "white")]
    figures.save(figure_of(panels), out / "pca.png")
    print(f"The patch features' principal components of {len(images)} images in {args.out}")
    return result


def score(args: argparse.Namespace) -> dict:
    """The Jaccard index of the masks over args.examples images of args.jaccard."""
    mesh = parallel.make_mesh((("data", -1),))
    cli.check_batch_size(args.batch_size, mesh)
    source = DecodedSource(make_source(args.jaccard, args.split, args.data_dir))
    if "mask" not in source[0]:
        raise ValueError(
            f"{args.jaccard} has no foreground masks: use synthetic:objects or synthetic:shapes."
        )
    model, variables = cli.load_backbone(args.checkpoint, mesh, args.arch, args.patch_size)
    patch = getattr(model, "patch_size", 1)
    side = args.image_size - args.image_size % patch
    if side == 0:
        raise ValueError(f"--image_size={args.image_size} is smaller than the patch size {patch}.")
    config = cli.data_config(args.jaccard, args.data_dir, side, side)
    size = cli.num_examples(source, args.examples)
    data = eval_dataset(config, args.split, args.batch_size, source, limit=size)
    results = attention.attention_jaccard(
        model,
        variables,
        data,
        mesh,
        threshold=args.threshold,
        num_batches=math.ceil(size / args.batch_size),
    )
    return {
        "checkpoint": str(args.checkpoint),
        "source": args.jaccard,
        "split": args.split,
        "image_size": side,
        "threshold": args.threshold,
        "jaccard": results,
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cli.initialize_distributed(args)
    cli.setup_logging()
    try:
        if args.pca:
            pca_picture(args)
            return
        if args.jaccard is None:
            visualize(args)
            return
        results = score(args)
    except (ValueError, FileNotFoundError, IndexError) as e:
        log.error("%s", e)  # bad paths and settings: the message, not a traceback
        sys.exit(1)
    j = results["jaccard"]
    print(
        f"Jaccard of the {args.threshold:.0%}-mass masks on {j['examples']} images: mean map "
        f"{j['mean_map']:.3f}, best head ({j['best_head_index']}) {j['best_head']:.3f}, "
        f"mean of heads {j['mean_of_heads']:.3f}"
    )
    if args.out:
        cli.write_json(str(epath.Path(args.out) / "jaccard.json"), results)


if __name__ == "__main__":
    main()

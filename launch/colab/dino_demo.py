# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # DINO in JAX: train, look, evaluate
#
# This notebook trains the demo recipe of dino_jax (a small ViT, without labels, on the built-in
# `synthetic:textures` images), plots its loss and collapse monitors, shows the self-attention
# maps of the trained teacher on `synthetic:shapes` scenes with their Jaccard index against the
# true object masks, measures its k-NN accuracy, and loads an official DINO `.pth`.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/)
#
# **In Colab:** File → Open notebook → GitHub, and open `launch/colab/dino_demo.ipynb` of your
# dino_jax repository; then set `DINO_JAX_REPO` in the first cell to that repository's git URL.
# On a CPU runtime the demo trains in about 10 minutes, as `make demo` does; a GPU is faster.
#
# The source of this notebook is `launch/colab/dino_demo.py` (jupytext percent format), paired
# with the `.ipynb`: edit the `.py`, then `jupytext --sync launch/colab/dino_demo.py`.

# %% [markdown]
# ## Install
#
# Skipped when dino_jax is already importable (a local checkout with `pip install -e .`).
# Otherwise the repository is cloned and installed with its PyTorch extra, which reads `.pth`
# files.

# %%
# ruff: noqa: E402
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

# Where to install dino_jax from when it is not installed: the git URL of its repository (your
# fork's, for instance). Set it here, or in the environment before the kernel starts:
#   os.environ["DINO_JAX_REPO"] = "<git URL of the dino_jax repository>"
REPO_URL = os.environ.get("DINO_JAX_REPO", "")
CLONE_DIR = Path("dino_jax_repo")

if importlib.util.find_spec("dino_jax") is None:
    if not REPO_URL:
        raise RuntimeError(
            "dino_jax is not installed: set os.environ['DINO_JAX_REPO'] to the git URL of the "
            "dino_jax repository and run this cell again."
        )
    if not CLONE_DIR.exists():
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, str(CLONE_DIR)], check=True)
    install = [sys.executable, "-m", "pip", "install", "--quiet", f"{CLONE_DIR.absolute()}[torch]"]
    subprocess.run(install, check=True)
    importlib.invalidate_caches()

import dino_jax

# The checkout whose configs/ this notebook trains: the clone above, or the one dino_jax is
# installed from in editable mode.
REPO_ROOT = CLONE_DIR if CLONE_DIR.is_dir() else Path(dino_jax.__file__).resolve().parents[1]
print("dino_jax", dino_jax.__version__, "from", REPO_ROOT)

# %% [markdown]
# ## Settings
#
# `DINO_NOTEBOOK_SMOKE=1` in the environment runs everything at toy size in about a minute on a
# CPU (`configs/demo.py:smoke`, small evaluations, no download): the test suite runs the notebook
# this way. Otherwise the full demo recipe trains (300 steps of 64 images).

# %%
import jax

SMOKE = os.environ.get("DINO_NOTEBOOK_SMOKE") == "1"
RECIPE = str(REPO_ROOT / "configs" / "demo.py") + (":smoke" if SMOKE else "")
# Checkpoints, metrics, the export and this page's figures; orbax wants an absolute path.
WORKDIR = Path("runs/demo_notebook").absolute()
KNN_TRAIN, KNN_VAL = (256, 128) if SMOKE else (5000, 1000)  # k-NN memory and test images
JACCARD_IMAGES = 32 if SMOKE else 500
EVAL_BATCH = 32 if SMOKE else 256  # global batch: a multiple of the device count
SHOW = 3  # scenes whose attention maps are drawn
print("recipe", RECIPE, "| devices", jax.devices())

# %% [markdown]
# ## Train
#
# `dino_jax.train.train(config, workdir)` is what `python -m dino_jax.train --config ...
# --workdir ...` runs. It resumes from the newest checkpoint in `WORKDIR`: interrupting the cell
# saves one and stops, running it again continues. When it ends, the teacher is exported to
# `WORKDIR/export`.

# %%
import signal

from absl import flags
from absl import logging as absl_logging

from dino_jax.core.config import load_config
from dino_jax.eval import cli
from dino_jax.train import train

config = load_config(RECIPE)
# One process prepares the batches, as in the demo (:smoke would prepare them inline). Its grain
# workers read absl flags, which nothing parses in a notebook.
config.data.num_workers = 1
flags.FLAGS.mark_as_parsed()
absl_logging.set_verbosity(absl_logging.WARNING)  # the libraries' messages only when they warn
cli.setup_logging()  # dino_jax's progress messages in the cell's output

# train() turns SIGINT/SIGTERM into "save and stop"; the kernel gets its handlers back after.
handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
try:
    final = train(config, str(WORKDIR))
finally:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
print("final:", {key: round(value, 4) for key, value in sorted(final.items())})

# %% [markdown]
# ## Loss and collapse monitors
#
# `WORKDIR/metrics.jsonl` holds one record per logged step (`dino_jax.metrics.read_metrics`
# reads it; `plot_metrics` draws every metric; TensorBoard reads `WORKDIR/tensorboard`). A
# collapsing teacher shows in two monitors: its mean entropy falls to 0 when every output is
# one-hot, and the KL of its mean output to the uniform distribution rises to log K when every
# image picks the same dimension.

# %%
import math

import matplotlib.pyplot as plt
import numpy as np

from dino_jax.metrics import read_metrics

records = [r for r in read_metrics(WORKDIR) if "loss" in r]
steps = [r["step"] for r in records]
log_k = math.log(config.dino.head_n_prototypes)
figure, axes = plt.subplots(1, 4, figsize=(16, 3.2), layout="constrained")
for ax, key in zip(axes, ["loss", "teacher_entropy", "teacher_kl_uniform", "lr"], strict=True):
    ax.plot(steps, [r[key] for r in records], marker="." if len(steps) < 20 else None)
    if key != "lr":
        ax.axhline(log_k, color="grey", linestyle="--", linewidth=1, label="log K")
        ax.legend()
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
figure.savefig(WORKDIR / "loss.png", dpi=80)
plt.show()

# %% [markdown]
# ## Attention maps of the trained teacher
#
# The last block's attention of the cls token to the patches, one map per head
# (`dino_jax.attention_maps`). Each head's mask keeps the patches holding 60% of its attention
# mass, as in the paper (`eval/maths/attention.py`); J is its Jaccard index with the scene's true
# object mask (outlined in green in the first column). The last column is the mask of the heads'
# mean map.

# %%
from PIL import Image

from dino_jax.data.synthetic import ShapesSource
from dino_jax.eval.maths import attention
from dino_jax.visualize_attention import overlay, square


def val_scenes(count: int, size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, S, S, 3], true masks [n, S, S]) of the first synthetic:shapes val
    scenes, resized to `size` and cropped to a multiple of the patch size."""
    scenes = [ShapesSource("val")[i] for i in range(count)]
    images = [square(s["image"], size, patch_size, Image.BILINEAR) for s in scenes]
    masks = [square(s["mask"], size, patch_size, Image.NEAREST) for s in scenes]
    return np.stack(images), np.stack(masks)


def show_attention(model, variables, images, truth, out_png: Path) -> np.ndarray:
    """Draws each image with its heads' maps and masks; returns Jaccard [n, heads + 1]."""
    patch = model.patch_size
    maps = dino_jax.attention_maps(model, variables, images)  # [n, heads, h, w]
    # Each head's mask, then the mean map's: [n, heads + 1, S, S].
    masks = np.asarray(attention.upsample(attention.head_masks(maps), patch))
    scores = np.asarray(attention.jaccard(masks, truth[:, None]))
    maps = np.asarray(attention.upsample(maps, patch))
    n, heads = maps.shape[:2]
    figure, axes = plt.subplots(
        n, heads + 2, figsize=(2.2 * (heads + 2), 2.3 * n), layout="constrained", squeeze=False
    )
    for i in range(n):
        panels = [("image, true mask", images[i], truth[i], "lime")]
        for h in range(heads):
            panels.append((f"head {h}  J={scores[i, h]:.2f}", maps[i, h], masks[i, h], "white"))
        mean_mask = masks[i, -1]
        mean_title = f"mean map  J={scores[i, -1]:.2f}"
        panels.append((mean_title, overlay(images[i], mean_mask), mean_mask, "white"))
        for ax, (title, picture, outline, colour) in zip(axes[i], panels, strict=True):
            ax.imshow(picture)
            if outline.any():
                ax.contour(outline.astype(np.float32), levels=[0.5], colors=colour, linewidths=1)
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    figure.savefig(out_png, dpi=80)
    plt.show()
    return scores


model, variables = dino_jax.load_pretrained(WORKDIR)  # the teacher of WORKDIR/export
images, truth = val_scenes(SHOW, 128, model.patch_size)
scores = show_attention(model, variables, images, truth, WORKDIR / "attention.png")
print(f"Jaccard of the mean map's mask on these {SHOW} scenes: {scores[:, -1].mean():.3f}")

# %% [markdown]
# The same index over many scenes, as `python -m dino_jax.visualize_attention --jaccard ...`
# computes it (the batch split over every device):

# %%
from dino_jax import visualize_attention

visualize_attention.main(
    f"--checkpoint {WORKDIR}/export --jaccard synthetic:shapes --examples {JACCARD_IMAGES} "
    f"--batch_size {EVAL_BATCH} --image_size 128 --out {WORKDIR}/attention".split()
)

# %% [markdown]
# ## k-NN accuracy
#
# The reference's weighted k-NN on the teacher's cls features (`python -m dino_jax.eval.knn`):
# each held-out scene's k most similar training scenes vote for their shape class. With 10
# classes, chance is 10% top-1.

# %%
import json

from dino_jax.eval import knn

resize, crop = config.data.eval_resize_size, config.data.eval_crop_size  # as in training
knn.main(
    f"--checkpoint {WORKDIR}/export --train synthetic:textures --train_examples {KNN_TRAIN} "
    f"--val_examples {KNN_VAL} --resize {resize} --crop {crop} --batch_size {EVAL_BATCH} "
    f"--ks 10,20 --out {WORKDIR}/knn.json".split()
)
top = json.loads((WORKDIR / "knn.json").read_text())["knn"]["20"]
print(f"k-NN (k=20) of the trained teacher: top-1 {top['top1']:.1f}%, top-5 {top['top5']:.1f}%")

# %% [markdown]
# ## An official DINO checkpoint
#
# The released weights load with one call, arch and patch size read off the tensors:
#
# ```python
# model, variables = dino_jax.load_pretrained("dino_deitsmall16_pretrain.pth")
# ```
#
# The cell below downloads ViT-S/16 (86 MB) and draws its attention on the same scenes. In smoke
# mode, or without a network, it instead writes our trained teacher as a `.pth` in the official
# layout (what `python -m dino_jax.convert export WORKDIR --out teacher.pth` does; the
# reference's `vit_small` loads it with `strict=True`) and loads that file back.

# %%
import urllib.request

from dino_jax.interop import state_dict
from dino_jax.interop import training_state as interop

RELEASE_URL = (
    "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
)
release = WORKDIR / "dino_deitsmall16_pretrain.pth"
if not SMOKE and not release.exists():
    try:
        partial, _ = urllib.request.urlretrieve(RELEASE_URL, str(release) + ".part")
        os.replace(partial, release)
    except OSError as e:  # no network
        print(f"Could not download {RELEASE_URL} ({e}); using our own teacher instead.")

if release.exists():
    official, official_variables = dino_jax.load_pretrained(release)
    print(
        f"{release.name}: ViT with width {official.embed_dim}, depth {official.depth}, "
        f"{official.num_heads} heads, patch {official.patch_size}"
    )
    images224, truth224 = val_scenes(SHOW, 224, official.patch_size)
    scores = show_attention(
        official, official_variables, images224, truth224, WORKDIR / "attention_official.png"
    )
    print(f"Jaccard of the mean map's mask: {scores[:, -1].mean():.3f}")
else:
    ours = WORKDIR / "teacher.pth"
    state = interop.export_backbone(WORKDIR, ours)
    print(
        f"{ours}: {len(state)} tensors in the reference's layout, e.g.",
        {key: tuple(state[key].shape) for key in list(state)[:3]},
    )
    # A .pth holds no head count: load_pretrained infers it for the released widths (192, 384,
    # 768); a file of another width, like the demo's 128, loads into the model it came from.
    probe = np.zeros((1, model.patch_size, model.patch_size, 3), np.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), probe)  # the shapes it must fill
    file_state = state_dict.backbone_state_dict(state_dict.torch_load(ours))
    reloaded = state_dict.from_state_dict(file_state, abstract, state_dict.backbone_key, str(ours))
    difference = np.abs(
        dino_jax.extract_features(model, reloaded, images)
        - dino_jax.extract_features(model, variables, images)
    ).max()
    print(f"Features of the reloaded .pth vs the export: max |difference| = {difference:.2e}")

# %% [markdown]
# ## Attention that finds the objects
#
# The paper's first claim: without labels, the teacher's attention segments objects. The demo's
# textures have no objects; `configs/objects.py` trains on `synthetic:objects`, scenes in which
# the object (its shape, colours and pattern) is what recurs across images while backgrounds,
# clutter, position and lighting vary. Its monitors log the k-NN accuracy and the Jaccard index
# of the attention masks on held-out scenes as it trains, and draw the figures below into
# `WORKDIR/figures/`. The full recipe takes about 20 minutes on 2 CPU cores (600 steps); in smoke
# mode, a few steps.

# %%
from IPython.display import Image as ShowPNG
from IPython.display import display

from dino_jax.metrics import read_metrics

OBJECTS = Path("runs/objects_notebook").absolute()
objects_config = load_config(
    str(REPO_ROOT / "configs" / "objects.py") + (":smoke" if SMOKE else "")
)
objects_config.data.num_workers = 1
try:
    train(objects_config, str(OBJECTS))
finally:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
for record in read_metrics(OBJECTS):
    if "jaccard_mean_map" in record:
        print(
            f"step {record['step']:4d}: k-NN top-1 {record['knn_top1']:5.1f}%, Jaccard of the "
            f"mean map's mask {record['jaccard_mean_map']:.3f}"
        )
display(ShowPNG(str(OBJECTS / "figures" / "monitors.png")))
display(ShowPNG(str(sorted((OBJECTS / "figures").glob("attention_*.png"))[-1])))

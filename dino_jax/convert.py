"""The command line of checkpoint conversion between the official PyTorch layout and dino_jax.

    python -m dino_jax.convert import dino_deitsmall16_pretrain.pth --out exported/
    python -m dino_jax.convert export runs/demo --out teacher_backbone.pth
    python -m dino_jax.convert export runs/demo --format hf --out teacher_hf/
    python -m dino_jax.convert config vitl14.yaml --world-size 32 --out configs/vitl14.py

`import` writes the backbone of an official .pth (DINO's or DINOv2's) or of a Hugging Face
directory as a dino_jax export directory (what `dino_jax.load_pretrained` reads); `export`
writes a teacher backbone (of a dino_jax export or workdir, or any file `import` reads) as a
.pth that the official models load with `strict=True`, or with `--format hf` as a directory that
`transformers.AutoModel.from_pretrained` loads (`dino_jax.interop.hf`). `config` writes DINOv2's
official train YAML (dinov2/configs/train/*.yaml, or a run's config.yaml) as a recipe for
`python -m dino_jax.train --config`, and prints what it cannot honour
(`dino_jax.interop.official_config`).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from etils import epath

from dino_jax import checkpoint
from dino_jax.core import step
from dino_jax.interop import hf, hub, official_config
from dino_jax.interop.state_dict import check_requested, load_torch_backbone
from dino_jax.interop.training_state import export_backbone


def _import_command(args: argparse.Namespace) -> None:
    """A .pth's or a Hugging Face directory's backbone as a dino_jax export directory
    (config.json + the backbone variables)."""
    if hf.is_hf_dir(epath.Path(args.pth)):
        _, variables, config = hf.load_hf(args.pth)
        check_requested(config, args.arch, args.patch_size, args.pth)
    else:
        source = (args.pth, args.arch, args.patch_size, args.which)
        _, variables, config = load_torch_backbone(*source)
    params = {"backbone": variables["params"]}
    stats = {"backbone": variables["batch_stats"]} if "batch_stats" in variables else {}
    state = step.TrainState(
        step=np.zeros((), np.int32),
        student=params,
        teacher=params,
        method_state={},
        opt_state=(),
        batch_stats={"teacher": stats} if stats else {},
    )
    checkpoint.export_teacher(args.out, state, config)
    print(f"Wrote the {config.student.arch} backbone of {args.pth} to {args.out}")


def _export_command(args: argparse.Namespace) -> None:
    if args.format == "hf":
        model, variables = hub.load_pretrained(args.source)
        state = hf.save_hf(model, variables, args.out)
    else:
        state = export_backbone(args.source, args.out)
    print(f"Wrote {len(state)} tensors of the teacher backbone of {args.source} to {args.out}")


def _config_command(args: argparse.Namespace) -> None:
    """The official YAML as a recipe file (or on stdout), its notes on stderr."""
    config, notes = official_config.config_from_yaml(args.yaml, args.world_size)
    world = config.train.batch_size // config.train.rank_batch_size
    source = official_config.recipe_source(config, notes, args.yaml, world, args.out or "RECIPE.py")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.out is None:
        print(source, end="")
        return
    out = epath.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(source)
    print(
        f"Wrote {out}: {config.student.arch}, global batch {config.train.batch_size} "
        f"({world} GPUs x {config.train.rank_batch_size}), {len(notes)} notes above"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed: what `main` runs, in `run`."""
    parser = argparse.ArgumentParser(
        prog="python -m dino_jax.convert",
        description="Convert DINO checkpoints between the official PyTorch layout and dino_jax.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser(
        "import", help="official .pth (release file or full checkpoint) -> dino_jax export dir"
    )
    imp.add_argument("pth", help="the .pth file, or a Hugging Face directory")
    imp.add_argument("--out", required=True, help="export directory to write")
    imp.add_argument("--arch", default=None, help="expected arch (inferred when omitted)")
    imp.add_argument("--patch-size", type=int, default=None, help="expected patch size")
    imp.add_argument(
        "--which",
        default="teacher",
        choices=("teacher", "student"),
        help="network of a full checkpoint",
    )
    imp.set_defaults(run=_import_command)
    exp = commands.add_parser(
        "export", help="dino_jax export dir or workdir -> official backbone .pth"
    )
    exp.add_argument("source", help="dino_jax export directory or training workdir")
    exp.add_argument("--out", required=True, help=".pth file (or --format hf directory) to write")
    exp.add_argument(
        "--format",
        default="pth",
        choices=("pth", "hf"),
        help="pth: the official state dict; hf: a transformers directory (safetensors)",
    )
    exp.set_defaults(run=_export_command)
    cfg = commands.add_parser(
        "config", help="official DINOv2 train YAML -> dino_jax recipe file (configs/*.py)"
    )
    cfg.add_argument("yaml", help="dinov2/configs/train/*.yaml, or an official run's config.yaml")
    cfg.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="GPUs of the official run: global batch = batch_size_per_gpu x N, which scales the "
        "lr (read off a config.yaml's scaled optim.lr when omitted)",
    )
    cfg.add_argument("--out", default=None, help="recipe .py to write (default: stdout)")
    cfg.set_defaults(run=_config_command)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()

"""The command line of checkpoint conversion between the official PyTorch layout and dino_jax.

    python -m dino_jax.convert import dino_deitsmall16_pretrain.pth --out exported/
    python -m dino_jax.convert export runs/demo --out teacher_backbone.pth

`import` writes a .pth's backbone as a dino_jax export directory (what `dino_jax.load_pretrained`
reads); `export` writes a dino_jax teacher backbone as a .pth that the reference's models load
with `strict=True`.
"""

from __future__ import annotations

import argparse

import numpy as np

from dino_jax import checkpoint
from dino_jax.core import step
from dino_jax.interop.state_dict import load_torch_backbone
from dino_jax.interop.training_state import export_backbone


def _import_command(args: argparse.Namespace) -> None:
    """A .pth's backbone as a dino_jax export directory (config.json + the backbone variables)."""
    _, variables, config = load_torch_backbone(args.pth, args.arch, args.patch_size, args.which)
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
    state = export_backbone(args.source, args.out)
    print(f"Wrote {len(state)} tensors of the teacher backbone of {args.source} to {args.out}")


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
    imp.add_argument("pth", help="the .pth file")
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
    exp.add_argument("--out", required=True, help=".pth file to write")
    exp.set_defaults(run=_export_command)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()

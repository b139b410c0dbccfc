"""The command line of checkpoint conversion between the official PyTorch layout and dino_jax.

    python -m dino_jax.convert import dino_deitsmall16_pretrain.pth --out exported/
    python -m dino_jax.convert export runs/demo --out teacher_backbone.pth
    python -m dino_jax.convert export runs/demo --format hf --out teacher_hf/

`import` writes the backbone of an official .pth (DINO's or DINOv2's) or of a Hugging Face
directory as a dino_jax export directory (what `dino_jax.load_pretrained` reads); `export`
writes a teacher backbone (of a dino_jax export or workdir, or any file `import` reads) as a
.pth that the official models load with `strict=True`, or with `--format hf` as a directory that
`transformers.AutoModel.from_pretrained` loads (`dino_jax.interop.hf`).
"""

from __future__ import annotations

import argparse

import numpy as np
from etils import epath

from dino_jax import checkpoint
from dino_jax.core import step
from dino_jax.interop import hf, hub
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()

"""Benchmarks of dino_jax, one sub-command each; figures go to BENCHMARKS.md.

    python -m dino_jax.benchmark data [--images 200] [--local-crops 10] [--seed 0] [--repeats 5]
    python -m dino_jax.benchmark data --config configs/custom.py \\
        --config.data.source=folder:/data/pets [--images 200] [--seed 0] [--repeats 5]
    python -m dino_jax.benchmark step --config configs/vit_small16.py --config.train.batch_size=8 \\
        [--config configs/other.py ...] [--steps 5] [--warmup 1] [--interleave]
    python -m dino_jax.benchmark compile --config configs/vit_small16.py --target v4-32 \\
        [--config.key=value ...] [--config configs/other.py ...]

`step`: the real jitted train step on random data, per config: compile time, median step time,
images/s, FLOPs per step from XLA's cost analysis, achieved FLOP/s, MFU against the device's
peak, and peak device memory. `--config.key=value` after a `--config` overrides that config.
`--interleave` runs one step of each config in turn, so that A/B figures share the same minutes.

`compile`: the real train step compiled on this host for a TPU slice or GPU node it does not
have (dino_jax.tools.targets: v4-8, v4-32, v5e-16, v5p-32, v6e-16, h100x8), per device: memory
against the chip's HBM, XLA's FLOPs and bytes accessed, roofline bounds, collectives
(dino_jax.tools.aot).
Run TPU targets one process at a time (libtpu), e.g. under `flock /tmp/libtpu.lock`.

`data`: single-process images/s (= per core) of JPEG decode + multi-crop, ours
(`dino_jax.data.augment`) against the baseline, a plain PIL implementation of the reference's
torchvision transforms, on synthetic photo-like JPEGs of ImageNet's typical size; and the
host's share alone when `data.augment_on_device` moves the photometric ops into the step.
With `--config`, the training pipeline of that config instead (its source and split, crop sizes,
local crops and `augment_on_device`), on a seeded sample of --images of its source read into
memory: what one core decodes and crops per second of your data, to size `data.num_workers`.
"""

from __future__ import annotations

import argparse

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from dino_jax.core.config import load_config, none_overrides, set_none, unknown_overrides
from dino_jax.tools import aot, input_benchmark, step_benchmark, targets


def override_config(
    config: ml_collections.ConfigDict, overrides: list[str]
) -> ml_collections.ConfigDict:
    """`config` with `--config.key=value` overrides applied by ml_collections' config_flags, as the
    training command applies them: each value parsed as its field's type
    (`--config.compute.dtype=bfloat16`, `--config.crops.local_crops_scale=(0.05,0.4)`), unknown
    keys and ill-typed values refused."""
    unknown = unknown_overrides(config, overrides)
    if unknown:
        raise ValueError("; ".join(unknown))
    overrides, unset = none_overrides(overrides)
    argv = ["benchmark", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_dict(
        "config", config, flag_values=values, lock_config=False, sys_argv=argv
    )
    try:
        values(argv)
    except flags.Error as e:
        raise ValueError(str(e)) from e
    set_none(values.config, unset)
    return values.config


def parse_configs(argv: list[str]) -> list[tuple[str, ml_collections.ConfigDict]]:
    """`--config spec [--config.key=value ...]` repeated -> [(label, config)]."""
    groups: list[tuple[str, list[str]]] = []
    args = iter(argv)
    for arg in args:
        if arg == "--config" or arg.startswith("--config="):
            spec = arg.partition("=")[2] or next(args, "")
            if not spec:
                raise ValueError("--config needs a recipe file, e.g. configs/vit_small16.py")
            groups.append((spec, []))
        elif arg.startswith("--config."):
            if not groups:
                raise ValueError(f"{arg} comes before any --config recipe")
            groups[-1][1].append(arg)
        else:
            raise ValueError(f"Unknown argument {arg!r}")
    if not groups:
        raise ValueError("Give at least one --config recipe, e.g. --config configs/vit_small16.py")
    return [
        (
            " ".join([spec, *(o[len("--config.") :] for o in overrides)]),
            override_config(load_config(spec), overrides),
        )
        for spec, overrides in groups
    ]


def run_data(args: argparse.Namespace, config_args: list[str]) -> None:
    if not config_args:
        input_benchmark.run_generated(args)
        return
    if args.local_crops is not None:
        raise ValueError(
            "--local-crops: with --config, set --config.crops.local_crops_number instead"
        )
    configs = parse_configs(config_args)
    if len(configs) > 1:
        raise ValueError("benchmark data measures one --config at a time")
    input_benchmark.run_config(args, *configs[0])


def run_step(args: argparse.Namespace, config_args: list[str]) -> None:
    step_benchmark.run(args, parse_configs(config_args))


def run_compile(args: argparse.Namespace, config_args: list[str]) -> None:
    """Print the table of `benchmark compile` for the configs on `args.target`."""
    configs = parse_configs(config_args)
    target = targets.get_target(args.target)
    print(
        f"{target.chips} x {target.chip.name} ({target.name}, topology {target.topology}), "
        f"JAX {jax.__version__}, compiled on this host; figures per device\n"
    )
    print(aot.TABLE_HEADER, flush=True)
    reports = []
    for label, config in configs:
        reports.append(aot.compile_report(config, target, label))
        print(aot.table_row(reports[-1]), flush=True)
    for r in reports:
        print(
            f"\n{r.label}: peak {r.peak_bytes / 2**30:.2f} of {r.hbm_bytes / 2**30:.1f} GiB HBM "
            f"({100 * r.headroom:.0f}% free); {r.flops / 1e9:.4g} GFLOP per device "
            f"({r.cost_source}), {r.hbm_traffic / 1e9:.4g} GB of HBM traffic by our count "
            f"({r.bytes_accessed / 1e9:.4g} GB accessed by XLA's, which includes on-chip "
            f"memory): at least {1e3 * r.compute_s:.4g} ms compute, {1e3 * r.memory_s:.4g} ms "
            f"memory ({r.bound} bound)"
        )


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The subcommand's own arguments, and the `--config RECIPE [--config.key=value ...]` groups
    left for `parse_configs`."""
    parser = argparse.ArgumentParser(prog="python -m dino_jax.benchmark", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser(
        "data",
        help="input pipeline: decode + multi-crop, images/s per core",
        description="Generated JPEGs, or with --config RECIPE [--config.key=value ...] that "
        "config's training pipeline on its own source.",
    )
    data.add_argument(
        "--images", type=int, default=200, help="generated JPEGs, or images of the --config source"
    )
    data.add_argument(
        "--local-crops", type=int, default=None, help="local crops per image (default 10)"
    )
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--repeats", type=int, default=5, help="passes per pipeline (median)")
    data.set_defaults(run=run_data)
    step = commands.add_parser(
        "step",
        help="the jitted train step on random data: time, FLOPs, MFU, memory",
        description="Repeat --config RECIPE [--config.key=value ...] for several configs.",
    )
    step.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    step.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    step.add_argument(
        "--interleave",
        action="store_true",
        help="compile every config first, then run one step of each in turn (A/B comparisons)",
    )
    step.set_defaults(run=run_step)
    compile_ = commands.add_parser(
        "compile",
        help="the train step compiled for a TPU slice or GPU node: memory, cost, collectives",
        description="Repeat --config RECIPE [--config.key=value ...] for several configs.",
    )
    compile_.add_argument("--target", required=True, choices=list(targets.TARGETS))
    compile_.set_defaults(run=run_compile)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("data", "step", "compile"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args, rest


def main(argv: list[str] | None = None) -> None:
    args, rest = parse_args(argv)
    args.run(args, rest)


if __name__ == "__main__":
    main()

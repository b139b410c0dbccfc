"""Imports flow one way: core <- middle <- shell, with no cycle among dino_jax's modules.

- core: the model, the loss, the methods, the schedules, the optimizer, the train step and what
  it runs on (config, parallel, platform, targets). Pure JAX: no image libraries, torch,
  checkpointing, data loading or command-line parsing, so that it imports fast and runs anywhere.
- middle: data loading, checkpoints, metrics, the evaluation maths and the interoperation with
  the reference's checkpoints. Builds on the core.
- shell: the command lines. Build on both; nothing imports them but other command lines.

The graph is read from the source with `ast`, imports inside functions included: a lazy import
does not make a dependency go away. A new module must be given a layer in LAYERS below.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "dino_jax"
CORE, MIDDLE, SHELL = 0, 1, 2
LAYER_NAMES = {CORE: "core", MIDDLE: "middle", SHELL: "shell"}
# What the core must not import (anywhere, lazily included): image libraries, torch,
# checkpointing, data loading, command-line parsing.
CORE_FORBIDDEN = ("cv2", "PIL", "torch", "orbax", "grain", "tensorflow_datasets", "argparse")

LAYERS = {
    # core
    "dino_jax.core": CORE,
    "dino_jax.core.augment_laws": CORE,
    "dino_jax.core.config": CORE,
    "dino_jax.core.device_augment": CORE,
    "dino_jax.core.dinov2_loss": CORE,
    "dino_jax.core.loss": CORE,
    "dino_jax.core.optim": CORE,
    "dino_jax.core.parallel": CORE,
    "dino_jax.core.platforms": CORE,
    "dino_jax.core.schedules": CORE,
    "dino_jax.core.step": CORE,
    "dino_jax.cpu": CORE,
    "dino_jax.cpu.attention_kernel": CORE,
    "dino_jax.cpu.host_memory": CORE,
    "dino_jax.cpu.layers": CORE,
    "dino_jax.methods": CORE,
    "dino_jax.methods.base": CORE,
    "dino_jax.methods.dino": CORE,
    "dino_jax.methods.dinov2": CORE,
    "dino_jax.models": CORE,
    "dino_jax.models.batchnorm": CORE,
    "dino_jax.models.dino": CORE,
    "dino_jax.models.dinov2": CORE,
    "dino_jax.models.head": CORE,
    "dino_jax.models.layers": CORE,
    "dino_jax.models.registry": CORE,
    "dino_jax.models.resnet": CORE,
    "dino_jax.models.vit": CORE,
    "dino_jax.tools.targets": CORE,
    # middle
    "dino_jax.checkpoint": MIDDLE,
    "dino_jax.data": MIDDLE,
    "dino_jax.data.augment": MIDDLE,
    "dino_jax.data.masking": MIDDLE,
    "dino_jax.data.objects": MIDDLE,
    "dino_jax.data.pipeline": MIDDLE,
    "dino_jax.data.sources": MIDDLE,
    "dino_jax.data.synthetic": MIDDLE,
    "dino_jax.data.textures": MIDDLE,
    "dino_jax.eval": MIDDLE,
    "dino_jax.eval.attention_monitor": MIDDLE,
    "dino_jax.eval.collapse": MIDDLE,
    "dino_jax.eval.figures": MIDDLE,
    "dino_jax.eval.maths": MIDDLE,
    "dino_jax.eval.maths.attention": MIDDLE,
    "dino_jax.eval.maths.features": MIDDLE,
    "dino_jax.eval.maths.knn": MIDDLE,
    "dino_jax.eval.maths.linear_probe": MIDDLE,
    "dino_jax.eval.maths.pca": MIDDLE,
    "dino_jax.eval.maths.segmentation": MIDDLE,
    "dino_jax.eval.monitor": MIDDLE,
    "dino_jax.interop": MIDDLE,
    "dino_jax.interop.hf": MIDDLE,
    "dino_jax.interop.hub": MIDDLE,
    "dino_jax.interop.official_config": MIDDLE,
    "dino_jax.interop.state_dict": MIDDLE,
    "dino_jax.interop.training_state": MIDDLE,
    "dino_jax.metrics": MIDDLE,
    "dino_jax.run_lock": MIDDLE,
    "dino_jax.tools": MIDDLE,
    "dino_jax.tools.aot": MIDDLE,
    # shell
    "dino_jax": SHELL,  # re-exports hub's helpers for `dino_jax.load_pretrained`
    "dino_jax.benchmark": SHELL,
    "dino_jax.convert": SHELL,
    "dino_jax.eval.cli": SHELL,
    "dino_jax.plot": SHELL,
    "dino_jax.eval.knn": SHELL,
    "dino_jax.eval.linear": SHELL,
    "dino_jax.tools.input_benchmark": SHELL,
    "dino_jax.tools.step_benchmark": SHELL,
    "dino_jax.train": SHELL,
    "dino_jax.visualize_attention": SHELL,
}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, pathlib.Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: pathlib.Path, modules: set[str]):
    """(imported module, line) for every import statement in the file, functions included.

    `from package import name` is an import of the module package.name where that is a module,
    else of package. Third-party imports are reported by their top-level name.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                yield (sub if sub in modules else source), node.lineno


def graph():
    """{module: [(imported dino_jax module or third-party top-level name, line)]}."""
    modules = source_modules()
    return modules, {
        name: list(imports_of(name, path, set(modules))) for name, path in modules.items()
    }


def test_every_module_has_a_layer():
    modules, _ = graph()
    unknown = sorted(set(modules) - set(LAYERS))
    assert not unknown, (
        f"Modules without a layer: {unknown}. Add each to LAYERS in tests/test_imports.py as "
        "core (model, loss, step and what they need), middle (data, checkpoints, metrics, eval "
        "maths, interop) or shell (command lines)."
    )
    stale = sorted(set(LAYERS) - set(modules))
    assert not stale, f"LAYERS names modules that no longer exist: {stale}."


def test_no_module_imports_a_higher_layer():
    modules, edges = graph()
    crossings = [
        f"{modules[name].relative_to(PACKAGE.parent)}:{line}: {name} "
        f"({LAYER_NAMES[LAYERS[name]]}) imports {target} ({LAYER_NAMES[LAYERS[target]]})"
        for name in modules
        for target, line in edges[name]
        if target in LAYERS and name in LAYERS and LAYERS[target] > LAYERS[name]
    ]
    assert not crossings, "Imports against the layers:\n" + "\n".join(crossings)


def test_core_imports_no_heavy_or_command_line_package():
    modules, edges = graph()
    found = [
        f"{modules[name].relative_to(PACKAGE.parent)}:{line}: {name} (core) imports {target}"
        for name in modules
        if LAYERS.get(name) == CORE
        for target, line in edges[name]
        if target.split(".")[0] in CORE_FORBIDDEN
    ]
    assert not found, "The core must stay pure JAX:\n" + "\n".join(found)


def test_no_import_cycle():
    modules, edges = graph()
    inner = {
        name: sorted({target for target, _ in edges[name] if target in modules and target != name})
        for name in modules
    }
    state, stack, cycles = {}, [], []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for target in inner[name]:
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(modules):
        if name not in state:
            visit(name)
    assert not cycles, "Import cycles among dino_jax's modules:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    "text",
    [
        "from dino_jax.interop.hub import load_pretrained",
        "from dino_jax import train",
        "import cv2",
    ],
)
def test_the_checks_see_a_crossing(tmp_path, monkeypatch, text):
    """A core module that imports the middle layer, a command line, or OpenCV fails the checks."""
    package = tmp_path / "dino_jax"
    for path in PACKAGE.rglob("*.py"):
        target = package / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    loss = package / "core" / "loss.py"
    loss.write_text(loss.read_text() + f"\n\ndef _crossing():\n    {text}\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    check = (
        test_core_imports_no_heavy_or_command_line_package
        if text == "import cv2"
        else test_no_module_imports_a_higher_layer
    )
    with pytest.raises(AssertionError, match=r"dino_jax\.core\.loss"):
        check()

"""The Makefile's installs, from `make -n` (nothing is installed or run): `make demo` takes the
package's runtime dependencies only, `make test` everything, and neither installs again what the
other already did."""

import ast
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What only the suite (or compiling for accelerators) needs; none of it belongs in the demo's venv.
SUITE_ONLY = ("torch", "pytest", "ruff", "test", "tpu", "cuda", "gpu-compile", "jupytext")


def dry_run(target: str, root: Path) -> list[str]:
    """The commands `make TARGET` would run with its venvs under `root`."""
    venvs = [f"VENV={root / 'venv'}", f"AOT_VENV={root / 'aot'}"]
    # Under `make test`, the outer make's flags and variables would reach this one.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    command = ["make", "-n", target, *venvs]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def pip_installs(commands: list[str]) -> list[str]:
    """What each `pip install` command installs (its arguments, without the venv's path)."""
    return [c.split("pip install", 1)[1].strip() for c in commands if "pip install" in c]


def pretend_ran(commands: list[str]) -> None:
    """Leave what the commands would leave for make to see: the venv's python and the stamps,
    each newer than the last and than setup.py, as after a real run."""
    when = max(time.time(), (REPO / "setup.py").stat().st_mtime) + 10
    for command in commands:
        words = shlex.split(command)
        if words[1:3] == ["-m", "venv"]:
            made = Path(words[3]) / "bin" / "python"
        elif words[0] == "touch":
            made = Path(words[1])
        else:
            continue
        made.parent.mkdir(parents=True, exist_ok=True)
        made.touch()
        when += 1
        os.utime(made, (when, when))


@pytest.mark.slow
def test_demo_installs_no_suite_tools(tmp_path):
    commands = dry_run("demo", tmp_path)
    installs = pip_installs(commands)
    assert "--quiet -e ." in installs, commands  # the package itself, without extras
    for args in installs:
        assert not any(name in args for name in SUITE_ONLY), args
    assert any("dino_jax.train --config configs/demo.py" in c for c in commands), commands


def installs_torch(installs: list[str]) -> bool:
    # TORCH_SPEC: "torch==VERSION" by default, "torch" on a CUDA machine.
    return any(word.startswith("torch") for args in installs for word in shlex.split(args))


@pytest.mark.slow
def test_test_installs_everything(tmp_path):
    installs = pip_installs(dry_run("test", tmp_path))
    assert installs_torch(installs), installs
    for wanted in (".[test,torch]", ".[tpu,gpu-compile]"):
        assert any(wanted in args for args in installs), installs


@pytest.mark.slow
def test_demo_then_test_adds_the_suite_tools(tmp_path):
    pretend_ran(dry_run("demo", tmp_path))
    commands = dry_run("test", tmp_path)
    installs = pip_installs(commands)
    assert not any(c.endswith(f"-m venv {tmp_path / 'venv'}") for c in commands), commands
    assert "--quiet -e ." not in installs, installs  # the runtime install stands
    assert any(".[test,torch]" in args for args in installs), installs
    assert installs_torch(installs), installs


@pytest.mark.slow
def test_test_then_demo_installs_nothing(tmp_path):
    pretend_ran(dry_run("test", tmp_path))
    commands = dry_run("demo", tmp_path)
    assert pip_installs(commands) == [], commands
    assert len(commands) == 1 and "dino_jax.train" in commands[0], commands


def test_runtime_requirements_leave_out_the_suite_tools():
    """setup.py's install_requires (what `pip install -e .` brings) names none of them; they
    live in extras."""
    tree = ast.parse((REPO / "setup.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    [call] = [n for n in calls if getattr(n.func, "id", "") == "setup"]
    keywords = {k.arg: k.value for k in call.keywords}
    required = ast.literal_eval(keywords["install_requires"])
    assert required and not any(
        name in requirement.lower() for requirement in required for name in SUITE_ONLY
    ), required
    extras = ast.literal_eval(keywords["extras_require"])
    assert any("torch" in r for r in extras["torch"]) and any("pytest" in r for r in extras["test"])

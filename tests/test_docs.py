"""The documentation stays short, linked and runnable: README.md within 150 lines, every line of
README.md, BENCHMARKS.md and docs/*.md within 100 characters, every relative link (and its
#anchor) resolving, README's Python examples running as written, every documented
`python -m dino_jax.X` command answering --help, the dino_jax names the pages use existing, and
README's module map matching dino_jax/."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINKED = [README, *DOCS]  # the pages whose links and commands are checked
ALL = [README, ROOT / "BENCHMARKS.md", *DOCS]  # the pages whose line lengths are checked

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
COMMAND = re.compile(r"python -m (dino_jax(?:\.\w+)*)((?:\s+[a-z_]+)?)")


def _env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move the rest to docs/"


@pytest.mark.parametrize("page", ALL, ids=lambda p: str(p.relative_to(ROOT)))
def test_lines_within_100_characters(page):
    long = [
        f"{page.name}:{i}: {len(line)} characters"
        for i, line in enumerate(page.read_text().splitlines(), 1)
        if len(line) > 100
    ]
    assert not long, "\n".join(long)


def test_docs_pages_exist():
    names = {p.name for p in DOCS}
    wanted = {"training.md", "data.md", "evaluation.md", "checkpoints.md", "sharding.md", "cpu.md"}
    assert wanted <= names, f"missing: {sorted(wanted - names)}"


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.name}:\n" + "\n".join(broken)


def _python_blocks(page: Path) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == "python"]


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path):
    """Every ```python block of README.md runs as written, from the repository root, on a CPU.
    (The Python blocks of docs/*.md need downloaded .pth files and are not run.)"""
    blocks = _python_blocks(README)
    assert blocks, "README.md has no Python example"
    for i, code in enumerate(blocks):
        first = next(line for line in code.splitlines() if line.strip())
        assert not re.search(r"malloc|mallopt|host_memory", first, re.I), "opens with malloc"
        script = tmp_path / f"readme_{i}.py"
        script.write_text(code)
        result = subprocess.run(
            [sys.executable, str(script)],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode == 0, f"README block {i} failed:\n{result.stderr[-3000:]}"


def documented_commands() -> list[tuple[str, str]]:
    """(module, subcommand or "") of every `python -m dino_jax.X ...` in README.md and docs/."""
    found = set()
    for page in LINKED:
        text = page.read_text().replace("\\\n", " ")
        for module, rest in COMMAND.findall(text):
            sub = rest.strip()
            found.add((module, sub if sub and not sub.startswith("-") else ""))
    return sorted(found)


def _uses_absl(module: str) -> bool:
    """Whether the command parses its flags with absl (whose help exits with status 1)."""
    source = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    return source.exists() and "from absl import app" in source.read_text()


def _help(module: str, sub: str) -> tuple[str, str, int, str]:
    """Runs the command with --help (argparse), or --helpshort for an absl command, which
    passes if it lists the flags without a traceback."""
    absl = _uses_absl(module)
    command = [sys.executable, "-m", module, *([sub] if sub else [])]
    command.append("--helpshort" if absl else "--help")
    result = subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120
    )
    out = result.stdout + result.stderr
    if absl and "Traceback" not in out and "Try --helpfull" in out:
        return module, sub, 0, out
    return module, sub, result.returncode, out


@pytest.mark.slow
def test_documented_commands_answer_help():
    commands = documented_commands()
    modules = {module for module, _ in commands}
    assert {"dino_jax.train", "dino_jax.benchmark", "dino_jax.eval.knn"} <= modules, commands
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda c: _help(*c), commands))
    failed = [
        f"python -m {m} {s} --help: exit {rc}\n{out[-1500:]}"
        for m, s, rc, out in results
        if rc != 0
    ]
    assert not failed, "\n\n".join(failed)


def _resolves(dotted: str) -> bool:
    """Whether `dino_jax.a.b.c` names a module or an attribute of one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def documented_names() -> set[str]:
    """`dino_jax.x.y` names in the pages' text, and what their Python blocks take from dino_jax
    (`from dino_jax import m` then `m.f`, `import dino_jax` then `dino_jax.f`)."""
    names = set()
    for page in ALL:
        text = page.read_text()
        names |= set(re.findall(r"`(dino_jax(?:\.\w+)+)", FENCE.sub("", text)))
        for code in _python_blocks(page):
            tree = ast.parse(code)
            imported = {}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dino_jax"):
                    for alias in node.names:
                        imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.startswith("dino_jax"):
                            imported[alias.asname or alias.name] = alias.name
            names |= set(imported.values())
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                    if node.value.id in imported:
                        names.add(f"{imported[node.value.id]}.{node.attr}")
    return names


def test_documented_python_names_exist():
    """Names the pages (and their Python blocks, run or not) use from dino_jax still exist."""
    missing = sorted(name for name in documented_names() if not _resolves(name))
    assert not missing, f"documented but not found: {missing}"


def test_readme_module_map_matches_the_package():
    """README's module map names every top-level module and sub-package of dino_jax/, and
    nothing that is gone."""
    text = README.read_text()
    section = text[text.index("## Modules") :]
    section = section[: section.index("\n## ", 1)]
    mapped = set(re.findall(r"^\| `([\w/.]+)`", section, re.M))
    package = ROOT / "dino_jax"
    actual = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    actual |= {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").exists()}
    assert mapped == actual, (
        f"not in README's map: {sorted(actual - mapped)}; gone: {sorted(mapped - actual)}"
    )


def test_named_repository_paths_exist():
    """Paths the pages name in backticks (`configs/custom.py`, `launch/gpu/benchmark.sh`, ...)."""
    pattern = re.compile(r"`((?:configs|launch|dino_jax|tests|docs)/[\w./-]*)")
    missing = []
    for page in ALL:
        for path in pattern.findall(page.read_text()):
            if not (ROOT / path.rstrip(".")).exists():
                missing.append(f"{page.name}: {path}")
    assert not missing, "\n".join(missing)

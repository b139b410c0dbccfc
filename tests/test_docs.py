"""The documentation stays short, linked and runnable: README.md within 150 lines, every line of
README.md, BENCHMARKS.md and docs/*.md within 100 characters, every relative link (and its
#anchor) resolving, every `python -m dino_jax.X` command line of README.md and docs/ accepted by
its command's own parser (and answering --help), every `make` target they name existing, every
Python block of those pages running as written, the dino_jax names the pages use existing, and
README's module map matching dino_jax/."""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINKED = [README, *DOCS]  # the pages whose links and commands are checked
ALL = [README, ROOT / "BENCHMARKS.md", *DOCS]  # the pages whose line lengths are checked

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
MENTION = re.compile(r"\bpython3? -m dino_jax\b")
# A shell line that runs python or make, after any VAR=value prefixes.
SHELL = re.compile(r"\s*(?:\w+=\S*\s+)*(?:\S*/)?(?:python3?|make)\s")
INLINE = re.compile(r"`((?:[^`\n]|\n(?!\n))+)`")  # a code span: no blank line inside


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


def _blocks(page: Path) -> list[tuple[str, int, str]]:
    """(language, line of the first code line, code) of each fenced block of the page."""
    text = page.read_text()
    return [
        (m.group(1), text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text)
    ]


def _python_blocks(page: Path) -> list[str]:
    return [code for lang, _, code in _blocks(page) if lang == "python"]


@dataclass(frozen=True)
class Command:
    """A command line written on a page: its words (VAR=value prefixes dropped), and where."""

    page: Path
    line: int
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}: {shlex.join(self.words)}"


def _code_lines(page: Path) -> list[tuple[int, str]]:
    """(line, text) of each line of the page's non-Python blocks, a line ending in a backslash
    joined with the next, and of each inline code span outside the blocks."""
    found = []
    for lang, first, code in _blocks(page):
        if lang == "python":
            continue
        start, pending = first, ""
        for i, line in enumerate(code.splitlines()):
            start = start if pending else first + i
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            found.append((start, pending + line))
            pending = ""
    # Blocks blanked line for line, so that offsets still give the page's line numbers.
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), page.read_text())
    for m in INLINE.finditer(prose):
        found.append((prose.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " ")))
    return found


def _commands(page: Path) -> list[Command]:
    commands = []
    for line, text in _code_lines(page):
        if SHELL.match(text + " "):
            words = shlex.split(text, comments=True)
            while words and re.fullmatch(r"\w+=\S*", words[0]):
                words.pop(0)
            commands.append(Command(page, line, tuple(words)))
    return commands


COMMANDS = [c for page in LINKED for c in _commands(page)]
# `python -m dino_jax.X ARGS`, and `make TARGET`.
DINO_COMMANDS = [c for c in COMMANDS if c.words[1:2] == ("-m",) and "dino_jax" in c.words[2]]
MAKE_COMMANDS = [c for c in COMMANDS if c.words[0] == "make"]


def _parse_train(args: list[str]) -> None:
    """The training command's absl flags on a FlagValues of their own (the process's stay
    untouched): the recipe loaded with its variants, the --config.KEY overrides applied, and the
    values checked as the command checks them before it starts."""
    from absl import flags

    from dino_jax import train
    from dino_jax.core.config import validate

    argv = ["train", *args]
    values = flags.FlagValues()
    train.define_flags(values, argv)
    extra = values(argv)[1:]
    if extra:  # the command would ignore them silently
        raise ValueError(f"unexpected arguments {extra}")
    validate(values.config)  # also raises the load error config_flags defers (a missing file)


def _parse_benchmark(args: list[str]) -> None:
    from dino_jax import benchmark
    from dino_jax.core.config import validate

    parsed, config_args = benchmark.parse_args(args)
    if config_args or parsed.command != "data":  # `benchmark data` alone times generated JPEGs
        for _, config in benchmark.parse_configs(config_args):
            validate(config)


def _parse(module: str, args: list[str]) -> None:
    """Parses `args` as `python -m module` does, running nothing; raises on what it refuses."""
    if module == "dino_jax.train":
        _parse_train(args)
    elif module == "dino_jax.benchmark":
        _parse_benchmark(args)
    else:  # argparse commands: convert, eval.knn, eval.linear, visualize_attention
        importlib.import_module(module).parse_args(args)


# ml_collections loads recipe files with importlib's deprecated load_module.
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
@pytest.mark.parametrize("command", DINO_COMMANDS, ids=lambda c: str(c).partition(": ")[0])
def test_documented_commands_parse(command, monkeypatch):
    """Each documented command line is accepted by its command's parser: flags, subcommands,
    recipe files, variants and --config.KEY overrides; placeholders stand as values."""
    monkeypatch.chdir(ROOT)  # recipes are named from the repository root
    stderr, error = io.StringIO(), None
    try:
        with contextlib.redirect_stderr(stderr):
            _parse(command.words[2], list(command.words[3:]))
    except SystemExit as e:  # argparse's refusals, already written to stderr
        error = stderr.getvalue().strip() if e.code else None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    if error:
        pytest.fail(f"{command}\n{error}", pytrace=False)


def test_every_documented_command_is_checked():
    """Each mention of `python -m dino_jax` on the pages is a command the parsing test reads:
    none sits where the extraction misses it (mid-span, after an unknown prefix)."""
    modules = {c.words[2] for c in DINO_COMMANDS}
    assert {"dino_jax.train", "dino_jax.benchmark", "dino_jax.eval.knn"} <= modules, modules
    checked = {(c.page, c.line) for c in DINO_COMMANDS}
    missed = []
    for page in LINKED:
        text = page.read_text()
        for m in MENTION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            if (page, line) not in checked:
                missed.append(f"{page.relative_to(ROOT)}:{line}")
    assert not missed, f"commands not written as a whole line or code span: {missed}"


def test_documented_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", makefile, re.M))
    assert MAKE_COMMANDS, "no `make` command found"
    unknown = [
        f"{c}: no target {word!r} in the Makefile"
        for c in MAKE_COMMANDS
        for word in c.words[1:]
        if not word.startswith("-") and "=" not in word and word not in targets
    ]
    assert not unknown, "\n".join(unknown)


def documented_commands() -> list[tuple[str, str]]:
    """(module, subcommand or "") of every documented `python -m dino_jax.X ...`."""
    found = set()
    for c in DINO_COMMANDS:
        sub = c.words[3] if len(c.words) > 3 and not c.words[3].startswith("-") else ""
        found.add((c.words[2], sub))
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
    """The documented modules also run as `python -m` (an entry point, imports that work)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda c: _help(*c), documented_commands()))
    failed = [
        f"python -m {m} {s} --help: exit {rc}\n{out[-1500:]}"
        for m, s, rc, out in results
        if rc != 0
    ]
    assert not failed, "\n\n".join(failed)


def _release_file(path: Path) -> None:
    """A ViT-S/16 release file, random, of depth 4 (the block takes 4 intermediate layers)."""
    from torch_reference import save_release_vit

    save_release_vit(path, depth=4)


def _dinov2_release_file(path: Path) -> None:
    """A ViT-S/14 release file with 4 registers at 518 px, random, of depth 4."""
    import torch
    from torch_dinov2 import TorchDinoViT
    from torch_reference import randomize_

    registers = {"num_register_tokens": 4, "interpolate_offset": 0.0}
    model = TorchDinoViT(depth=4, layerscale=1.0, interpolate_antialias=True, **registers)
    torch.save(randomize_(model, 0).state_dict(), path)


def _full_checkpoint(path: Path) -> None:
    """A reference training checkpoint, random: ViT-S/16 of depth 2 with a small head."""
    import torch
    from conftest import make_tiny_config
    from test_convert import full_checkpoint

    config = make_tiny_config(patch_size=16, img_size=224, embed_dim=384, num_heads=6)
    torch.save(full_checkpoint(config), path)


# The downloads the pages' blocks load, small stand-ins: a block gets those it names.
DOWNLOADS = {
    "dino_deitsmall16_pretrain.pth": _release_file,
    "dino_deitsmall16_pretrain_full_checkpoint.pth": _full_checkpoint,
    "dinov2_vits14_reg4_pretrain.pth": _dinov2_release_file,
}
PYTHON_BLOCKS = [
    (page, line, code) for page in LINKED for lang, line, code in _blocks(page) if lang == "python"
]


def test_readme_has_a_python_example():
    assert any(page == README for page, _, _ in PYTHON_BLOCKS), "README.md has no Python example"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("page", "line", "code"),
    PYTHON_BLOCKS,
    ids=[f"{page.relative_to(ROOT)}:{line}" for page, line, _ in PYTHON_BLOCKS],
)
def test_python_blocks_run(page, line, code, tmp_path):
    """Every ```python block of README.md and docs/ runs as written on a CPU, in a directory
    standing for the repository root: its configs/, and the downloads the block names."""
    where = f"{page.relative_to(ROOT)}:{line}"
    first = next(text for text in code.splitlines() if text.strip())
    assert not re.search(r"malloc|mallopt|host_memory", first, re.I), f"{where}: opens with malloc"
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for name, make in DOWNLOADS.items():
        if name in code:
            make(tmp_path / name)
    script = tmp_path / f"{page.stem}_md.py"
    script.write_text("\n" * (line - 1) + code)  # tracebacks give the page's line numbers
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, f"{where}: the block failed:\n{result.stderr[-3000:]}"


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

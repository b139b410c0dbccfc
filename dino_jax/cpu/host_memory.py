"""Keep freed host memory for reuse, so that XLA:CPU's steps do not page-fault.

XLA:CPU allocates a program's temporaries as one block per execution and frees it at the end
(gigabytes for the ViT-S/16 step at batch 8). glibc serves a block that size with a fresh `mmap`
and unmaps it on `free`, so every step the kernel zero-fills the block's pages again on first
touch (BENCHMARKS.md, 'What led here', gives the block's size and the page faults). Serving all
allocations from glibc's main heap and never trimming it makes the next step reuse the same
pages: the behaviour of a caching allocator, which accelerator runtimes have for device memory.
Commands apply it on CPU runs only (`cpu_run`).

The settings bind only threads that have not allocated yet (a thread keeps its malloc arena, and
arenas other than the main one mmap such blocks whatever the settings), so the training and
benchmark commands call `reuse_freed_memory` first, before JAX starts its threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
import platform

# Packages that give JAX an accelerator backend.
ACCELERATOR_PLUGINS = ("libtpu", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")
# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


@functools.cache
def reuse_freed_memory() -> bool:
    """On Linux with glibc: one malloc arena, no mmap'd blocks, no trimming of the heap, so a
    block freed by one step is the next step's block (from the second step on, or once the heap
    has settled: a small allocation that takes the start of a freed block makes the heap grow by
    one block first). Returns whether the settings applied.

    The process's resident memory then stays at its high-water mark: right for a training or
    benchmark process, which reaches that mark every step. Call it before JAX's first use.
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # noqa: B018 - glibc only; musl has no mallopt parameters
    except (OSError, AttributeError):
        return False
    # Without mmap, threads' own arenas (64 MiB heaps) cannot hold the block and glibc would
    # mmap it anyway; -1 disables trimming (mallopt(3)).
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def cpu_run(platform_setting: str) -> bool:
    """Whether a run with `compute.platform` = platform_setting will run on the CPU, told before
    JAX starts (its backends start threads): "cpu", or "auto" where JAX_PLATFORMS names only the
    CPU or no accelerator plugin is installed."""
    if platform_setting != "auto":
        return platform_setting == "cpu"
    requested = os.environ.get("JAX_PLATFORMS", "")
    if requested:
        return requested == "cpu"
    return not any(_installed(name) for name in ACCELERATOR_PLUGINS)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent namespace package is absent
        return False

"""softmax(q k^T scale) v as one CPU kernel forward and one backward (attention_kernel.cc).

XLA:CPU runs attention as batched products with the [B, heads, N, N] logits written to memory
and read back between them, at about a sixth of the matmul speed of the same machine; the kernel
keeps each (image, head) pair's logits in cache and reads q, k, v in the [B, N, heads, hd] layout
the qkv products leave them in. The same maths as `cpu.layers.explicit_attention` (float32, the
probabilities kept for the backward, the softmax gradient p (g - sum g p)), summed in another order.

The library is compiled once per source, jaxlib and CPU into ~/.cache/dino_jax (or
$DINO_JAX_CACHE) with the host's C++ compiler (`$CXX`, else g++). Without one (and no build in
the cache), if it fails to compile, or with DINO_JAX_CPU_KERNELS=0, `available()` is False and
callers keep XLA's products.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

SOURCE = Path(__file__).with_name("attention_kernel.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-Wno-psabi")
FORWARD, BACKWARD = "dino_attention_forward", "dino_attention_backward"
LANES = 8  # head sizes must be a multiple of 8 floats: the products' narrowest strip

log = logging.getLogger(__name__)


def available() -> bool:
    """Whether the kernel is built and registered (building it on the first call)."""
    return _library() is not None


def supports(q: jax.Array) -> bool:
    """Whether `attention` takes q [B, N, heads, hd]: float32 and hd a multiple of 8."""
    return q.dtype == jnp.float32 and q.ndim == 4 and q.shape[-1] % LANES == 0 and available()


def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v for float32 q, k, v [B, N, heads, hd] -> [B, N, heads, hd]."""
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have one shape, got {q.shape}, {k.shape}, {v.shape}")
    if not available():
        raise RuntimeError(
            "The CPU attention kernel could not be built (see the warning above); "
            "check supports(q) first, or install a C++ compiler (g++)."
        )
    return _attention(q, k, v, float(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    return _forward(scale)(q, k, v)[0]


def _attention_fwd(q, k, v, scale):
    out, probs = _forward(scale)(q, k, v)
    return out, (q, k, v, probs)


def _attention_bwd(scale, saved, grad):
    return _backward(scale)(*saved, grad)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _specs(mesh, first) -> tuple[NamedSharding, NamedSharding]:
    """(the [B, N, heads, hd] sharding, the [B, heads, N, N] one) from q's: its batch and heads
    axes as they are, the rest replicated."""
    spec = (*first.sharding.spec, None, None, None, None)
    batch, heads = spec[0], spec[2]
    return NamedSharding(mesh, P(batch, None, heads, None)), NamedSharding(
        mesh, P(batch, heads, None, None)
    )


def _partitioned(call, args: str, outs: str, rule: str):
    """`call` as an op whose operands and results, q first, are "t" ([B, N, heads, hd]) or "p"
    ([B, heads, N, N]) arrays. The kernel runs each (image, head) pair on its own, so a batch or
    heads axis sharded over a mesh stays sharded: each device calls it on its own shard.

    custom_partitioning writes a Python object's address into the program, new in every process,
    so JAX's persistent compilation cache only hits with that left out of its key
    (`train.compilation_cache` does so).
    """

    @custom_partitioning
    def op(*operands):
        return call(*operands)

    def shardings(mesh, arg_shapes, kinds: str) -> tuple[NamedSharding, ...]:
        tokens, pairs = _specs(mesh, arg_shapes[0])
        return tuple(tokens if kind == "t" else pairs for kind in kinds)

    def partition(mesh, arg_shapes, result_shape):
        return mesh, call, shardings(mesh, arg_shapes, outs), shardings(mesh, arg_shapes, args)

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes, outs)

    op.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=("n", "d", "m"),  # in order of first use
    )
    return op


@functools.cache
def _forward(scale: float):
    call = functools.partial(_call_forward, scale=scale)
    return _partitioned(call, "ttt", "tp", "b n h d, b m h d, b m h d -> b n h d, b h n m")


@functools.cache
def _backward(scale: float):
    call = functools.partial(_call_backward, scale=scale)
    rule = "b n h d, b n h d, b n h d, b h n m, b n h d -> b n h d, b n h d, b n h d"
    return _partitioned(call, "tttpt", "ttt", rule)


def _call_forward(q, k, v, scale):
    batch, tokens, heads, _ = q.shape
    out_types = (
        jax.ShapeDtypeStruct(q.shape, jnp.float32),
        jax.ShapeDtypeStruct((batch, heads, tokens, tokens), jnp.float32),
    )
    call = jax.ffi.ffi_call(FORWARD, out_types, vmap_method="sequential")
    return call(q, k, v, scale=np.float32(scale))


def _call_backward(q, k, v, probs, grad, scale):
    out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32),) * 3
    call = jax.ffi.ffi_call(BACKWARD, out_types, vmap_method="sequential")
    return call(q, k, v, probs, grad, scale=np.float32(scale))


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("DINO_JAX_CPU_KERNELS", "1") == "0":
        return None
    try:
        library = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or ""  # the compiler's own message, if it ran
        message = "CPU attention kernel unavailable (%s); using XLA's products.\n%s"
        log.warning(message, error, detail)
        return None
    for name, symbol in ((FORWARD, "DinoAttentionForward"), (BACKWARD, "DinoAttentionBackward")):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), "cpu")
    return library


def _build() -> Path:
    """The compiled library for this source, jaxlib and CPU, building it if missing.

    -march=native ties the binary to the CPU, so the CPU's feature flags are part of its name;
    it is written to a temporary file and renamed, so concurrent builds never load a half file.
    """
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jaxlib.__version__, " ".join(FLAGS), _cpu_id()):
        key.update(part if isinstance(part, bytes) else part.encode())
    cache = Path(os.environ.get("DINO_JAX_CACHE", Path.home() / ".cache" / "dino_jax"))
    target = cache / f"cpu_attention-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise FileNotFoundError(f"no C++ compiler {os.environ.get('CXX', 'g++')!r} on PATH")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        command = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE)]
        subprocess.run([*command, "-o", str(partial)], check=True, capture_output=True, text=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _cpu_id() -> str:
    """The CPU's model and feature flags (what -march=native compiles for): x86's "model name"
    and "flags", Arm's "CPU implementer", "CPU part" and "Features"."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "CPU implementer", "CPU part", "Features")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))

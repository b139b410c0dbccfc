"""FSDP: parameters split along the axis their layer leaves whole, their teacher copies and Adam
moments alike, the state a quarter per device under fsdp 4, and the compiled CPU step free of
collective-permutes. (The accelerators' reduce-scattered gradients: test_compile_targets.py.)"""

from __future__ import annotations

import math

import jax
import pytest
from conftest import make_tiny_config
from jax.sharding import PartitionSpec as P

from dino_jax.core import parallel
from dino_jax.core.config import load_config
from dino_jax.core.step import abstract_state, init_state, make_train_step
from dino_jax.tools import aot

MESH = (("data", 2), ("fsdp", 4))
FSDP = 4
WIDTH = 128  # qkv [128, 384] is over parallel.MIN_FSDP_SIZE, so it is split


def wide_config():
    """The tiny ViT at width 128: every kernel split over fsdp 4."""
    config = make_tiny_config(embed_dim=WIDTH)
    config.compute.mesh = MESH
    return config


def leaves_ending(tree, suffix: str) -> dict[str, jax.ShapeDtypeStruct]:
    """{key path: leaf} of the leaves whose path ends in `suffix` ("attn/qkv/kernel")."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if name.endswith(suffix):
            out[name] = leaf
    return out


def test_qkv_kernel_teacher_and_moments_split_the_input_axis():
    """[D, 3D] split on D: the q, k and v column blocks each stay whole on every device."""
    config = wide_config()
    state = abstract_state(config, parallel.make_mesh(MESH))
    qkv = leaves_ending(state, "attn/qkv/kernel")
    # Per block: student, teacher, Adam's mu and nu.
    assert len(qkv) == 4 * config.student.depth, sorted(qkv)
    for name, leaf in qkv.items():
        assert leaf.shape == (WIDTH, 3 * WIDTH), name
        assert leaf.sharding.spec == P("fsdp", None), name
    # The head's weight-normed kernel keeps whole columns (its norm is per column).
    last = leaves_ending(state, "last_layer/kernel_v")
    assert len(last) == 4, sorted(last)
    assert {leaf.sharding.spec for leaf in last.values()} == {P(None, "fsdp")}


def test_every_moment_has_its_parameters_spec():
    state = abstract_state(wide_config(), parallel.make_mesh(MESH))
    params = leaves_ending(state.student, "")
    matched = 0
    for name, leaf in leaves_ending(state.opt_state, "").items():
        owner = [p for p in params if name.endswith("/" + p)]
        if leaf.ndim == 0:
            continue  # step counts
        assert len(owner) == 1, f"{name}: no single parameter path ends it ({owner})"
        assert leaf.shape == params[owner[0]].shape, name
        assert leaf.sharding.spec == params[owner[0]].sharding.spec, name
        matched += 1
    assert matched == 2 * len(params)  # AdamW's mu and nu of every parameter


def test_state_per_device_is_total_over_fsdp():
    """Device 0 holds a quarter of every tensor of at least MIN_FSDP_SIZE elements and the whole
    of each smaller one (all of this model's large tensors have an axis divisible by 4)."""
    config = wide_config()
    state = init_state(config, jax.random.key(0), parallel.make_mesh(MESH))
    leaves = jax.tree.leaves(state)
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    small = sum(x.size * x.dtype.itemsize for x in leaves if x.size < parallel.MIN_FSDP_SIZE)
    device0 = jax.devices()[0]
    held = sum(
        shard.data.nbytes
        for x in leaves
        for shard in x.addressable_shards
        if shard.device == device0
    )
    assert held == (total - small) // FSDP + small, (held, total, small)
    assert small < 0.1 * total


def test_vit_small_state_per_device_is_a_quarter():
    """ViT-S/16 with its 65536-logit head: within 1% of total / 4 (biases and norms are whole)."""
    config = load_config("configs/vit_small16.py")
    state = abstract_state(config, parallel.make_mesh(MESH))
    leaves = jax.tree.leaves(state)
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
    assert per_device / (total / FSDP) == pytest.approx(1.0, abs=0.01), (per_device, total)


@pytest.mark.slow
def test_cpu_step_has_no_collective_permute():
    """The CPU layers take q, k and v as three column blocks of the qkv kernel: with the kernel
    split across its columns (the largest-axis rule) each block straddled devices, and this step
    compiled 42 collective-permutes. Split on its rows, each block is gathered whole."""
    config = wide_config()
    mesh = parallel.make_mesh(MESH)
    step = make_train_step(config, mesh)
    lowered = step.lower(abstract_state(config, mesh), aot.abstract_batch(config, mesh))
    totals = aot.collective_totals(aot.collective_ops(lowered.compile().as_text()))
    assert totals["collective-permute"].count == 0, totals
    assert totals["all-gather"].count > 0, totals  # the split kernels, gathered for use

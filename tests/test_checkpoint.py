"""Checkpoints: exact sharded round trip with the data position, schedule and retention, refusing a
different model, surviving a save killed before its commit, and the teacher export."""

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_config
from jax.sharding import SingleDeviceSharding

from dino_jax.checkpoint import Checkpointer, export_teacher, load_exported
from dino_jax.core import parallel
from dino_jax.core.config import base_config
from dino_jax.core.step import abstract_state, init_state, state_sharding

REPO = Path(__file__).resolve().parents[1]


def randomized(tree, seed):
    """Every leaf replaced by random values of its shape, dtype and sharding (so that zeros, ones
    and the fresh state's copies cannot hide a leaf that is not restored)."""
    rng = np.random.default_rng(seed)

    def fill(x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            values = rng.integers(1, 1000, x.shape)
        else:
            values = rng.normal(size=x.shape)
        return jax.device_put(values.astype(x.dtype), x.sharding)

    return jax.tree.map(fill, tree)


def small_state(step):
    return {"w": jnp.full((4,), float(step)), "step": jnp.int32(step)}


def on_one_device(tree):
    """The restore target of `tree`: its shapes and dtypes on the first device."""
    device = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def counter_iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


@pytest.fixture(scope="module")
def sharded():
    """(config, mesh, fresh TrainState) on 8 devices, ("data", 4) x ("fsdp", 2)."""
    config = make_tiny_config()
    mesh = parallel.make_mesh((("data", 4), ("fsdp", 2)))
    return config, mesh, init_state(config, jax.random.key(0), mesh)


def test_restore_is_exact_sharded_and_resumes_the_data(tmp_path, sharded):
    config, mesh, fresh = sharded
    state = randomized(fresh, seed=1)
    expected = jax.device_get(state)
    data = counter_iterator()
    for _ in range(3):
        next(data)

    with Checkpointer(tmp_path, save_every=5, keep=2) as ckpt:
        assert ckpt.save(5, state, data, config)
        # The train step donates the state right after saving: the save must not need it.
        for leaf in jax.tree.leaves(state):
            leaf.delete()
    with Checkpointer(tmp_path, save_every=5, keep=2) as ckpt:
        assert ckpt.latest_step() == 5
        resumed_data = counter_iterator()
        restored = ckpt.restore(5, abstract_state(config, mesh), resumed_data)

    assert next(resumed_data) == 3  # the element after the 3 consumed before the save
    want_shardings = state_sharding(config, mesh)
    assert any("fsdp" in s.spec for s in jax.tree.leaves(want_shardings))  # some leaf is split
    got = jax.tree_util.tree_leaves_with_path(restored)
    assert len(got) == len(jax.tree.leaves(expected))
    for (path, x), y, sharding in zip(
        got, jax.tree.leaves(expected), jax.tree.leaves(want_shardings), strict=True
    ):
        name = jax.tree_util.keystr(path)
        assert x.dtype == y.dtype, name
        assert x.sharding == sharding, name
        np.testing.assert_array_equal(np.asarray(x), y, err_msg=name)
    assert int(restored.step) == int(expected.step)


def test_saves_on_schedule_or_forced_and_keeps_the_last(tmp_path, tiny_config):
    config = tiny_config()
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        due = [ckpt.should_save(s) for s in range(1, 8)]
        saved = []
        for s in range(1, 8):
            saved.append(ckpt.save(s, small_state(s), None, config))
            ckpt.wait()  # old steps are removed when a save finalizes: keep the order strict
        assert due == saved == [False, True, False, True, False, True, False]
        assert not ckpt.should_save(6)  # not newer than the latest
        assert ckpt.save(7, small_state(7), None, config, force=True)  # off schedule
        assert not ckpt.save(7, small_state(7), None, config, force=True)  # already there
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "7"]


def test_restoring_data_needs_a_saved_iterator(tmp_path, tiny_config):
    abstract = on_one_device(small_state(0))
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(4, small_state(4), None, tiny_config())
        ckpt.wait()
        with pytest.raises(ValueError, match="no data-iterator state"):
            ckpt.restore(4, abstract, counter_iterator())
        np.testing.assert_array_equal(ckpt.restore(4, abstract)["w"], np.full(4, 4.0))


def snapshot(directory: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in directory.rglob("*")}


def test_check_compatible_names_each_changed_model_key(tmp_path, tiny_config):
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.check_compatible(tiny_config())  # no checkpoint yet: anything goes
        ckpt.save(3, small_state(3), None, tiny_config())
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        before = snapshot(tmp_path)
        ckpt.check_compatible(tiny_config(lr=1e-3, min_lr=0.0))  # same model, other values
        with pytest.raises(
            ValueError, match=r"dino.head_n_prototypes: saved 256, requested 512"
        ) as err:
            ckpt.check_compatible(tiny_config(head_n_prototypes=512))
        assert "--workdir" in str(err.value)
        with pytest.raises(ValueError) as err:
            ckpt.check_compatible(tiny_config(arch="vit_tiny", head_nlayers=2))
        message = str(err.value)
        assert "student.arch: saved 'vit_small', requested 'vit_tiny'" in message
        assert "dino.head_nlayers: saved 3, requested 2" in message
        assert "head_n_prototypes" not in message
        assert snapshot(tmp_path) == before


def test_a_run_saved_before_methods_is_refused_in_one_line(tmp_path, tiny_config):
    old = tiny_config()
    with old.unlocked():
        del old["method"]  # the saved config of that layout has no method key
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(3, small_state(3), None, old)
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        with pytest.raises(ValueError) as err:
            ckpt.check_compatible(tiny_config())
    message = str(err.value)
    assert "\n" not in message
    assert "saved before methods had a state of their own" in message
    assert f"--config.train.init_checkpoint={tmp_path}" in message


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"epochs": 9}, "optim.epochs=9 (saved optim.epochs=4)"),
        (
            {"OFFICIAL_EPOCH_LENGTH": 5},
            "train.OFFICIAL_EPOCH_LENGTH=5 (saved train.OFFICIAL_EPOCH_LENGTH=3)",
        ),
        ({"batch_size": 16}, "train.batch_size=16 (saved train.batch_size=8)"),
    ],
)
def test_other_schedule_lengths_are_refused_unless_replanned(
    tmp_path, tiny_config, caplog, overrides, named
):
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(5, small_state(5), None, tiny_config())
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        config = tiny_config(**overrides)
        with pytest.raises(ValueError) as err:
            ckpt.check_compatible(config)
        message = str(err.value)
        assert f"Resuming step 5 of {ckpt.directory} with {named}" in message
        assert "--config.checkpoint.replan_schedules=true" in message
        assert "\n" not in message
        config.checkpoint.replan_schedules = True
        with caplog.at_level(logging.INFO, logger="dino_jax"):
            ckpt.check_compatible(config)
    # The reference's schedules at step 5 of each plan (warm-up of one epoch, then the cosine).
    saved, new = tiny_config(), tiny_config(**overrides)
    lrs = [reference_lr(c, 5) for c in (saved, new)]
    assert f"Re-planning the schedules at step 5 for {named}: lr {lrs[0]:.4g} -> {lrs[1]:.4g}" in (
        caplog.text
    )


def reference_lr(config, it):
    """utils.py: cosine_scheduler's lr at iteration `it`, written out."""
    base = config.optim.lr * config.train.batch_size / 256
    warmup = config.optim.warmup_epochs * config.train.OFFICIAL_EPOCH_LENGTH
    if it < warmup:
        return np.linspace(0, base, warmup)[it]
    total = config.optim.epochs * config.train.OFFICIAL_EPOCH_LENGTH - warmup
    return config.optim.min_lr + 0.5 * (base - config.optim.min_lr) * (
        1 + np.cos(np.pi * (it - warmup) / total)
    )


# Saves step 1, then starts saving step 2 and is SIGKILLed (a preemption without grace period)
# at the moment orbax would commit it: step 2's files are all written but not yet made visible,
# the latest point a save can die. (A kill right after save() returns races with the background
# write and may land before anything of step 2 reaches the disk.)
KILLED_SAVE = """
import os, signal, sys
import jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity
from dino_jax.checkpoint import Checkpointer
from dino_jax.core.config import base_config

def state(step):
    return {"w": jnp.full((1_000_000,), float(step)), "step": jnp.int32(step)}

async def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

ckpt = Checkpointer(sys.argv[1], save_every=1, keep=5)
ckpt.save(1, state(1), None, base_config())
ckpt.wait()
atomicity.AtomicRenameTemporaryPath.finalize = die
ckpt.save(2, state(2), None, base_config())
ckpt.wait()
"""


@pytest.mark.slow
def test_a_save_killed_before_its_commit_leaves_the_previous_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    child = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    leftovers = os.listdir(tmp_path / "checkpoints")
    assert "1" in leftovers and "2" not in leftovers
    assert any(name.startswith("2.") for name in leftovers), leftovers  # step 2 was under way

    abstract = on_one_device(
        {"w": jax.ShapeDtypeStruct((1_000_000,), jnp.float32), "step": jnp.int32(0)}
    )
    with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
        assert ckpt.latest_step() == 1
        restored = ckpt.restore(1, abstract)
        np.testing.assert_array_equal(restored["w"], np.ones(1_000_000, np.float32))
        assert int(restored["step"]) == 1
        # The resumed run saves again, and the debris of the killed save is gone.
        assert ckpt.save(3, {"w": restored["w"] * 3, "step": jnp.int32(3)}, None, base_config())
        ckpt.wait()
        assert ckpt.all_steps() == [1, 3]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "3"]


def test_saving_compiles_nothing(tmp_path, sharded):
    """On CPU every array is saved whole by its first copy: orbax's replica-parallel saving would
    compile a slice program per array shape."""
    config, _, fresh = sharded
    compiled = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
            assert ckpt.save(1, fresh, None, config)
        export_teacher(tmp_path / "export", fresh, config)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiled == []
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        assert ckpt.latest_step() == 1
    # The handler keeps no array-metadata store, which orbax needs only for typed PRNG keys.
    assert not any(jnp.issubdtype(x.dtype, jax.dtypes.prng_key) for x in jax.tree.leaves(fresh))


def test_export_holds_the_teacher_and_its_config(tmp_path, sharded, monkeypatch):
    config, _, fresh = sharded
    # BatchNorm statistics as a model with BN has them (this tiny ViT has none).
    stats = {"head": {"bn": {"mean": jnp.arange(8.0), "var": jnp.ones(8)}}}
    state = fresh.replace(
        teacher=randomized(fresh.teacher, seed=2),
        batch_stats={"student": stats, "teacher": randomized(stats, seed=3)},
    )
    export_teacher(tmp_path / "export", state, config)

    on_disk = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (on_disk["dino"]["head_n_prototypes"], on_disk["student"]["patch_size"]) == (256, 8)
    monkeypatch.chdir(tmp_path)  # a relative path, as in `--checkpoint runs/demo/export`
    loaded_config, params, batch_stats = load_exported("export")
    assert loaded_config.student.arch == "vit_small" and loaded_config.student.embed_dim == 64
    for want, got in [(state.teacher, params), (state.batch_stats["teacher"], batch_stats)]:
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert isinstance(x, np.ndarray)
            np.testing.assert_array_equal(x, np.asarray(y))


def largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def damage_truncated(step_dir: Path) -> None:
    """The array file cut in half, as a full disk or a killed copy leaves it."""
    array = largest_file(step_dir / "state")
    os.truncate(array, array.stat().st_size // 2)


def damage_metadata(step_dir: Path) -> None:
    """The array store's index gone (orbax rebuilds a missing _METADATA, not this)."""
    (step_dir / "state" / "manifest.ocdbt").unlink()


def damage_config(step_dir: Path) -> None:
    shutil.rmtree(step_dir / "config")


def damage_data_position(step_dir: Path) -> None:
    for position in (step_dir / "data").iterdir():
        position.write_text("{not json")


def noise(step):
    """1M floats of noise: a file the size of its data (a constant would compress to bytes)."""
    return np.random.default_rng(step).normal(size=1_000_000).astype(np.float32)


def saved_run(tmp_path, config, steps=(1, 2, 3)):
    """Checkpoints of `steps` (each state its own `noise`) with a data position."""
    data = counter_iterator()
    with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
        for step in steps:
            next(data)
            state = {"w": jnp.asarray(noise(step)), "step": jnp.int32(step)}
            ckpt.save(step, state, data, config)
            ckpt.wait()
    return on_one_device({"w": jnp.zeros((1_000_000,)), "step": jnp.int32(0)})


@pytest.mark.parametrize(
    "damage", [damage_truncated, damage_metadata, damage_config, damage_data_position]
)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(
    tmp_path, tiny_config, caplog, damage
):
    abstract = saved_run(tmp_path, tiny_config())
    damage(tmp_path / "checkpoints" / "3")
    data = counter_iterator()
    with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
        ckpt.check_compatible(tiny_config())  # reads the newest config that reads
        with caplog.at_level(logging.INFO, logger="dino_jax"):
            state = ckpt.restore_latest(abstract, data)
        assert ckpt.all_steps() == [1, 2]
    assert int(state["step"]) == 2
    np.testing.assert_array_equal(state["w"], noise(2))
    assert next(data) == 2  # the data position saved at step 2
    (moved,) = (tmp_path / "damaged").iterdir()
    assert moved.name.startswith("3-") and (moved / "state").exists()  # kept, not deleted
    (line,) = [r.message for r in caplog.records if "cannot be read" in r.message]
    assert line.startswith("The checkpoint of step 3 cannot be read (")
    assert line.endswith(f"moved aside to {moved}; resuming from step 2.")


def test_when_no_checkpoint_reads_nothing_is_moved_and_one_line_names_each(tmp_path, tiny_config):
    abstract = saved_run(tmp_path, tiny_config(), steps=(1, 2))
    damage_truncated(tmp_path / "checkpoints" / "2")
    damage_metadata(tmp_path / "checkpoints" / "1")
    with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
        with pytest.raises(ValueError) as err:
            ckpt.restore_latest(abstract)
        assert ckpt.all_steps() == [1, 2]
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"No checkpoint in {tmp_path / 'checkpoints'} can be read: step 2: ")
    assert "; step 1: " in message and "Nothing was moved." in message
    assert not (tmp_path / "damaged").exists()


@pytest.mark.parametrize(
    ("saved_on", "restored_on"),
    [
        ((("data", 8), ("fsdp", 1)), (("data", 4), ("fsdp", 1))),  # 8 devices onto 4
        ((("data", 8), ("fsdp", 1)), (("data", 4), ("fsdp", 2))),  # fsdp 1 onto fsdp 2
        ((("data", 2), ("fsdp", 4)), (("data", 8), ("fsdp", 1))),  # split onto replicated
    ],
)
def test_a_checkpoint_restores_onto_another_mesh(tmp_path, tiny_config, saved_on, restored_on):
    """A slice that comes back in another size: the same values, laid out for the new mesh,
    and the data position with them."""
    config = tiny_config()
    devices = jax.devices()
    saved_mesh = parallel.make_mesh(saved_on, devices[: math.prod(n for _, n in saved_on)])
    state = randomized(init_state(config, jax.random.key(0), saved_mesh), seed=3)
    expected = jax.device_get(state)
    data = counter_iterator()
    next(data)
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(7, state, data, config)
    mesh = parallel.make_mesh(restored_on, devices[: math.prod(n for _, n in restored_on)])
    resumed_data = counter_iterator()
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        restored = ckpt.restore_latest(abstract_state(config, mesh), resumed_data)
    assert next(resumed_data) == 1
    for got, want, sharding in zip(
        jax.tree.leaves(restored),
        jax.tree.leaves(expected),
        jax.tree.leaves(state_sharding(config, mesh)),
        strict=True,
    ):
        assert got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), want)


def test_another_process_count_restarts_the_data_stream(tmp_path, tiny_config, caplog):
    """Saved by two processes (grain's process_<i>-of-2.json files), resumed by one: the state
    resumes, the data stream starts again, and one line says so."""
    abstract = saved_run(tmp_path, tiny_config(), steps=(1,))
    data_dir = tmp_path / "checkpoints" / "1" / "data"
    (position,) = data_dir.glob("process_0-of-1.json")
    position.rename(data_dir / "process_0-of-2.json")
    shutil.copy(data_dir / "process_0-of-2.json", data_dir / "process_1-of-2.json")
    data = counter_iterator()
    with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
        with caplog.at_level(logging.INFO, logger="dino_jax"):
            state = ckpt.restore_latest(abstract, data)
    np.testing.assert_array_equal(state["w"], noise(1))
    assert next(data) == 0  # from the beginning
    (line,) = [r.message for r in caplog.records if "data position" in r.message]
    assert line == (
        "The data position of step 1 was saved by 2 processes and this run has 1: the data "
        "stream starts again from its beginning; the state resumes at step 1."
    )

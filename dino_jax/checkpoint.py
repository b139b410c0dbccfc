"""Checkpoints of a run: orbax save/restore/resume of the TrainState, the data-iterator position
and the config, saving on preemption, and the export of the teacher for evaluation.

Layout under `workdir` (a local path or gs://):
    checkpoints/<step>/state/    the TrainState (every process writes its own shards)
    checkpoints/<step>/data/     the grain iterator position, one JSON file per process
    checkpoints/<step>/config/   the run config as JSON (to refuse resuming a different model)
A step directory is written under a temporary name and only made visible once complete, so a job
killed mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import grain.checkpoint
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from dino_jax.core import config as config_lib
from dino_jax.core.config import lookup
from dino_jax.core.schedules import hyperparams_at
from dino_jax.core.step import TrainState
from dino_jax.models import registry

log = logging.getLogger("dino_jax")

# Keys that define the model and its optimizer state: the saved arrays only fit a config that
# agrees on all of them (plus every `head_*` key of any section). The optimizer state is laid out
# by parameter group, so the keys that make the groups are among them. Data and other values may
# change.
MODEL_KEYS = (
    "method",
    *registry.CONFIG_KEYS,
    "dino.use_bn_in_head",
    "dino.norm_last_layer",
    "optim.optimizer",
    "optim.param_groups",
    "optim.layerwise_decay",
    "optim.patch_embed_lr_mult",
    "optim.freeze_last_layer_epochs",
    "optim.freeze_backbone_epochs",
    "ibot.separate_head",
)
# Keys that fix the length of every schedule (lr, weight decay, teacher momentum and temperature,
# the frozen last layer): a resume that changes one evaluates the schedules of another run at
# the saved step, so their values jump. Refused unless `checkpoint.replan_schedules` says so.
SCHEDULE_KEYS = ("optim.epochs", "train.OFFICIAL_EPOCH_LENGTH", "train.batch_size")
_STATE, _DATA, _CONFIG = "state", "data", "config"
_MISSING = "<absent>"


def _absolute(path: str | epath.PathLike) -> epath.Path:
    """`path` made absolute when local (orbax refuses relative paths); gs:// paths as they are."""
    path = epath.Path(path)
    return path if "://" in os.fspath(path) else epath.Path(os.path.abspath(path))


def _array_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
    """orbax's type handlers, with replica-parallel saving on TPU only.

    Replica-parallel saving has each copy of a replicated array write a slice of it, which pays
    across the hosts of a TPU pod. Each slice is an op compiled on the spot: on CPU that costs
    more than it saves (one compilation per array shape on the first save), and on GPU clusters
    the compilations can stall a save past its barrier (google/orbax#2934). orbax turns
    it off for GPUs itself, but only when JAX_PLATFORMS names them.

    Unlike orbax's global registry, the array handler keeps no array-metadata store: orbax reads
    it back only to rebuild typed PRNG-key arrays, and a TrainState holds none.
    """
    scalar = ocp.type_handlers.ScalarHandler()
    array = ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.default_backend() == "tpu")
    return ocp.type_handlers.create_type_handler_registry(
        (jax.Array, array),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (int, scalar),
        (float, scalar),
        (np.number, scalar),
        (str, ocp.type_handlers.StringHandler()),
    )


def _pytree_handler() -> ocp.PyTreeCheckpointHandler:
    return ocp.PyTreeCheckpointHandler(type_handler_registry=_array_handlers())


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as the JSON-compatible dict that is saved (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


class SaveFailed(OSError):
    """A checkpoint could not be written; the ones saved before are intact."""


class Checkpointer:
    """Saves and restores a run's checkpoints under `workdir/checkpoints`, asynchronously.

    A checkpoint is written when `step % save_every == 0`, when forced, or when JAX's preemption
    service reports a preemption at this step (multi-host jobs); the last `keep` are kept.
    Every process must make the same calls (orbax synchronises them).
    """

    def __init__(self, workdir: str | epath.PathLike, *, save_every: int, keep: int):
        if save_every <= 0:
            raise ValueError(f"save_every={save_every} must be a positive number of steps.")
        if keep <= 0:
            raise ValueError(f"keep={keep} must be at least 1 (the checkpoint to resume from).")
        self.directory = _absolute(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            # Explicit policies: orbax's default would also save the first step of every run.
            save_decision_policy=policies.AnySavePolicy(
                [
                    policies.FixedIntervalPolicy(save_every),
                    policies.PreemptionCheckpointingPolicy(),
                ]
            ),
            preservation_policy=policies.LatestN(keep),
            enable_async_checkpointing=True,
            # Removes the temporary directories of saves that a killed job left unfinished.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                _STATE: _pytree_handler(),
                _CONFIG: ocp.JsonCheckpointHandler(),
                _DATA: grain.checkpoint.CheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint; None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of every complete checkpoint kept, oldest first."""
        return sorted(self._manager.all_steps())

    def saved_config(self, step: int) -> dict[str, Any]:
        """The config saved with the checkpoint of `step`, as a JSON dict in the current layout."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()})
        )
        return config_lib.upgrade(restored[_CONFIG])

    def check_compatible(self, config: ml_collections.ConfigDict) -> None:
        """Raises ValueError if the latest checkpoint holds a different model than `config`, or
        was planned for other schedule lengths (`SCHEDULE_KEYS`) and
        `config.checkpoint.replan_schedules` is not set; with it set, logs what changes.

        Call before compiling, so that a wrong --workdir fails at once; it reads only the config.
        """
        found = self._newest_readable_config()
        if found is None:
            return
        step, saved = found
        requested = config_to_dict(config)
        if "method" not in saved:
            raise ValueError(
                f"{self.directory} holds checkpoints (latest step {step}) of a run saved before "
                "methods had a state of their own (its state keeps the center where this version "
                "keeps method_state), so it cannot resume here. Continue from its weights in a "
                "new --workdir with "
                f"--config.train.init_checkpoint={self.directory.parent} (step 0, fresh "
                "optimizer), or resume it with the dino_jax it was trained with."
            )
        head_keys = sorted(
            f"{section}.{leaf}"
            for tree in (saved, requested)
            for section, values in tree.items()
            if isinstance(values, dict)
            for leaf in values
            if leaf.startswith("head_")
        )
        diffs = [
            f"{key}: saved {lookup(saved, key, _MISSING)!r}, "
            f"requested {lookup(requested, key, _MISSING)!r}"
            for key in dict.fromkeys((*MODEL_KEYS, *head_keys))
            if lookup(saved, key, _MISSING) != lookup(requested, key, _MISSING)
        ]
        if diffs:
            raise ValueError(
                f"{self.directory} holds checkpoints (latest step {step}) of a different model: "
                f"{'; '.join(diffs)}. Use a new --workdir for this model, or the saved values to "
                "resume that run."
            )
        changed = [
            f"{key}={lookup(requested, key)} (saved {key}={lookup(saved, key)})"
            for key in SCHEDULE_KEYS
            if lookup(saved, key, _MISSING) not in (_MISSING, lookup(requested, key))
        ]
        if not changed:
            return
        if not config.checkpoint.replan_schedules:
            raise ValueError(
                f"Resuming step {step} of {self.directory} with {', '.join(changed)}: the "
                "schedules of that run would jump. Resume with the saved values, or set "
                "--config.checkpoint.replan_schedules=true to follow the new schedules from "
                f"step {step}."
            )
        before = hyperparams_at(ml_collections.ConfigDict(saved), step)
        after = hyperparams_at(config, step)
        log.info(
            "Re-planning the schedules at step %d for %s: lr %.4g -> %.4g, teacher momentum "
            "%.6g -> %.6g, weight decay %.4g -> %.4g.",
            step,
            ", ".join(changed),
            before.lr,
            after.lr,
            before.momentum,
            after.momentum,
            before.weight_decay,
            after.weight_decay,
        )

    def _newest_readable_config(self) -> tuple[int, dict[str, Any]] | None:
        """(step, saved config) of the newest checkpoint whose config reads; None if none does
        (`restore_latest` then says why)."""
        for step in reversed(self.all_steps()):
            try:
                return step, self.saved_config(step)
            except Exception:  # damaged: restore_latest names it and sets it aside
                continue
        return None

    def restore_latest(
        self, abstract_state: TrainState, data_iterator: grain.DatasetIterator | None = None
    ) -> TrainState | None:
        """The state of the newest checkpoint that reads whole (its config, every array and the
        data position), as `restore` gives it; None without checkpoints.

        Newer checkpoints that cannot be read (files truncated or missing, as a full disk or a
        killed copy leaves them) are named in one line each and moved aside to
        `workdir/damaged/`, never deleted. If none can be read, nothing is moved and a
        ValueError names each checkpoint and what failed: the cause is then likely not the files.
        """
        failures = []
        for step in reversed(self.all_steps()):
            try:
                self.saved_config(step)
                state = self.restore(step, abstract_state, data_iterator)
            except Exception as e:  # tensorstore, orbax, JSON and grain each raise their own
                failures.append((step, _first_line(e)))
                continue
            for bad, reason in failures:
                self._set_aside(bad, reason, step)
            return state
        if failures:
            raise ValueError(
                f"No checkpoint in {self.directory} can be read: "
                + "; ".join(f"step {step}: {reason}" for step, reason in failures)
                + ". Nothing was moved. Check the files (or the storage), or start a new --workdir."
            )
        return None

    def _set_aside(self, step: int, reason: str, resumed: int) -> None:
        """Moves the unreadable checkpoint of `step` to workdir/damaged/<step>-<UTC time>."""
        target = (
            self.directory.parent
            / "damaged"
            / f"{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        )
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        log.warning(
            "The checkpoint of step %d cannot be read (%s): moved aside to %s; resuming from "
            "step %d.",
            step,
            reason,
            target,
            resumed,
        )
        self._manager.reload()

    def should_save(self, step: int) -> bool:
        """True if `save` would save at this step: on schedule or at a preemption, and newer
        than the latest checkpoint."""
        return self._manager.should_save(int(step))

    def save(
        self,
        step: int,
        state: TrainState,
        data_iterator: grain.DatasetIterator | None,
        config: ml_collections.ConfigDict,
        *,
        force: bool = False,
    ) -> bool:
        """Starts saving if the step is due (or `force`); True if a save was started.

        Returns once the arrays are copied to host memory, so the state may then be donated; the
        files are written in the background (`wait` blocks until they are). The iterator's
        position is read now. A step that already has a checkpoint is not saved again.
        """
        step = int(step)
        if force and step in self._manager.all_steps():
            return False  # e.g. the final step, already saved on schedule
        items = {
            _STATE: ocp.args.PyTreeSave(state),
            _CONFIG: ocp.args.JsonSave(config_to_dict(config)),
        }
        if data_iterator is not None:
            # grain's handler writes one file per process: each host owns its data shard.
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            return self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # the disk, the bucket or a permission: the user's to fix
            raise self._save_failed(e) from e

    def restore(
        self,
        step: int,
        abstract_state: TrainState,
        data_iterator: grain.DatasetIterator | None = None,
    ) -> TrainState:
        """The TrainState of `step`, laid out as `abstract_state`
        (`dino_jax.core.step.abstract_state(config, mesh)`: shapes, dtypes and mesh shardings).

        `data_iterator`, if given, is moved in place to the position saved at `step` (grain's
        `set_state`), so that the run continues with the batch that followed the checkpoint.
        """
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        items = {_STATE: ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args)}
        saved_by = self._data_processes(step)
        if data_iterator is not None and saved_by not in (None, jax.process_count()):
            # Each process's position is its own shard's: another count has other shards.
            log.warning(
                "The data position of step %d was saved by %d processes and this run has %d: "
                "the data stream starts again from its beginning; the state resumes at step %d.",
                step,
                saved_by,
                jax.process_count(),
                step,
            )
            data_iterator = None
        if data_iterator is not None:
            if _DATA not in self._manager.item_metadata(step):
                raise ValueError(
                    f"The checkpoint of step {step} in {self.directory} has no data-iterator "
                    "state (it was saved without one): restore with data_iterator=None."
                )
            items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self._manager.restore(step, args=ocp.args.Composite(**items))[_STATE]

    def _data_processes(self, step: int) -> int | None:
        """How many processes saved the data position of `step` (grain writes one
        process_<i>-of-<n>.json each); None without one."""
        names = [p.name for p in (self.directory / str(step) / _DATA).glob("process_*-of-*.json")]
        return int(names[0].rsplit("-of-", 1)[1].removesuffix(".json")) if names else None

    def reached_preemption(self, step: int) -> bool:
        """True when JAX's preemption service asks every process to stop after this step."""
        return self._manager.reached_preemption(int(step))

    def wait(self) -> None:
        """Blocks until every started save is complete on storage; a save that failed in the
        background raises `SaveFailed` here."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(e) from e

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        try:
            self._manager.close()
        except Exception as e:
            raise self._save_failed(e) from e

    def _save_failed(self, error: Exception) -> SaveFailed:
        """The one-line error of a failed save, naming the checkpoint that remains."""
        try:
            self._manager.reload()  # forget the step that was not written
            latest = self.latest_step()
            kept = "no checkpoint was saved before" if latest is None else f"latest step {latest}"
        except Exception:  # storage unreachable: the message must still reach the user
            kept = "the latest one could not be listed"
        return SaveFailed(
            f"Saving a checkpoint to {self.directory} failed ({_first_line(error)}); the "
            f"checkpoints saved before are intact ({kept}). Free space or fix the workdir's "
            "permissions, then rerun the command to resume."
        )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def export_teacher(
    path: str | epath.PathLike, state: TrainState, config: ml_collections.ConfigDict
) -> None:
    """Writes the teacher (backbone + head params, BatchNorm statistics) and the config to the
    directory `path`, replacing an earlier export there; read it back with `load_exported`.

    Every process must call it (each writes its shards of the params).
    """
    path = _absolute(path)
    variables = {
        "params": state.teacher,
        "batch_stats": state.batch_stats["teacher"] if state.batch_stats else {},
    }
    try:
        path.mkdir(parents=True, exist_ok=True)
        with ocp.Checkpointer(_pytree_handler()) as checkpointer:
            checkpointer.save(path / "variables", args=ocp.args.PyTreeSave(variables), force=True)
        if jax.process_index() == 0:
            (path / "config.json").write_text(config.to_json_best_effort(indent=2))
    except Exception as e:  # the disk, the bucket or a permission: the user's to fix
        raise SaveFailed(
            f"Writing the export to {path} failed ({_first_line(e)}). Free space or fix the "
            "permissions, then rerun the command: it exports again from its last checkpoint."
        ) from e


def load_exported(path: str | epath.PathLike) -> tuple[ml_collections.ConfigDict, Any, Any]:
    """(config, params, batch_stats) of an export, the arrays as host NumPy arrays.

    NumPy, not device arrays, so that an export loads on any device count or topology;
    `jax.device_put` them where they are needed. `batch_stats` is {} for models without BN.
    """
    path = _absolute(path)
    saved = json.loads((path / "config.json").read_text())
    config = ml_collections.ConfigDict(config_lib.upgrade(saved))
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path / "variables").item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        variables = checkpointer.restore(
            path / "variables", args=ocp.args.PyTreeRestore(restore_args=restore_args)
        )
    return config, variables["params"], variables.get("batch_stats", {})


def latest_arrays(directory: epath.Path, names: tuple[str, ...]):
    """(config, {name: tree}) of the TrainState fields `names` in the newest complete checkpoint
    under `directory` (a workdir's checkpoints/), as NumPy, on any device count."""
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
    if not steps:
        raise ValueError(f"{directory} holds no complete checkpoint yet.")
    step_dir = directory / str(max(steps))
    config = ml_collections.ConfigDict(
        config_lib.upgrade(json.loads((step_dir / "config" / "metadata").read_text()))
    )
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
        wanted = {name: tree.get(name, {}) for name in names}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = checkpointer.restore(
            step_dir / "state",
            args=ocp.args.PyTreeRestore(
                item=wanted, restore_args=restore_args, partial_restore=True
            ),
        )
    return config, restored


def _first_line(error: Exception) -> str:
    """An exception as one short line: its type and the start of its message."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message[:160]}" if message else type(error).__name__

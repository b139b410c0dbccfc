"""The training command: `python -m dino_jax.train --config configs/<recipe>.py --workdir DIR`.

Only the loop lives here: devices and mesh, state from the latest checkpoint or fresh, the jitted
step fed by the input pipeline, checkpoints, metrics, the monitors, and a clean stop on
SIGTERM/SIGINT or preemption. All maths is in step.py and below.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache
from ml_collections import config_flags
from tqdm import tqdm

from dino_jax.checkpoint import Checkpointer, SaveFailed, export_teacher
from dino_jax.core import parallel
from dino_jax.core.config import (
    load_config,
    none_overrides,
    rank_batch_size,
    set_none,
    unknown_overrides,
    validate,
)
from dino_jax.core.step import abstract_batch, abstract_state, init_state, make_train_step
from dino_jax.cpu import host_memory
from dino_jax.data.pipeline import batches_per_epoch, train_dataset, train_source
from dino_jax.eval.collapse import CollapseWatch
from dino_jax.eval.monitor import Monitors
from dino_jax.interop import training_state as interop
from dino_jax.metrics import MetricWriter
from dino_jax.run_lock import RunLock


def define_flags(values: flags.FlagValues = flags.FLAGS, sys_argv: list[str] | None = None) -> None:
    """The command's flags, on `values`; config_flags reads the `--config.KEY=VALUE` overrides
    from `sys_argv` (default sys.argv). A fresh FlagValues parses a command line in-process."""
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Recipe file, e.g. configs/demo.py[:variant].",
        flag_values=values,
        sys_argv=sys_argv,
    )
    flags.DEFINE_string(
        "workdir",
        None,
        "Where checkpoints, metrics and the export go (local or gs://).",
        flag_values=values,
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0, for multi-process runs.",
        flag_values=values,
    )
    flags.DEFINE_integer(
        "num_processes", None, "Number of processes of a multi-process run.", flag_values=values
    )
    flags.DEFINE_integer(
        "process_id", None, "This process's index in a multi-process run.", flag_values=values
    )
    flags.DEFINE_integer(
        "heartbeat_timeout_s",
        parallel.HEARTBEAT_TIMEOUT_S,
        "Seconds after which the processes of a multi-process run stop when one of them is "
        "gone (a lost host), rather than wait on it.",
        flag_values=values,
    )
    flags.mark_flags_as_required(["config", "workdir"], flag_values=values)


define_flags()

log = logging.getLogger("dino_jax")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Throughput:
    """Step time and images/s over the steps since the last read."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.start, self.steps = time.perf_counter(), 0

    def add_step(self) -> None:
        self.steps += 1

    def read(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        rates = {
            "step_time_s": elapsed / self.steps,
            "images_per_s": self.batch_size * self.steps / elapsed,
        }
        self.start, self.steps = time.perf_counter(), 0
        return rates


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks, so that it saves before exiting.

    A context manager: the previous handlers come back afterwards, so that a notebook kernel's
    interrupt button works again once training returns.
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> StopSignal:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self._SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.received = signum


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train `config` in `workdir`, resuming from its latest checkpoint; returns final metrics."""
    validate(config, jax.device_count())
    if not flags.FLAGS.is_parsed():
        # Called from Python (a notebook): grain's worker processes read absl flags.
        flags.FLAGS.mark_as_parsed()
    source = train_source(config)
    if config.train.OFFICIAL_EPOCH_LENGTH is None:
        config.train.OFFICIAL_EPOCH_LENGTH = batches_per_epoch(config, len(source))
    if config.train.rank_batch_size is None:  # recorded in the run's config
        config.train.rank_batch_size = rank_batch_size(config, jax.device_count())
    mesh = parallel.make_mesh(config.compute.mesh)
    # Built first, so that a monitor refusing its data (unlabelled, or queries that sit in the
    # memory) stops the run before anything is written.
    monitor = Monitors(config, mesh, workdir) if config.eval.knn_every_steps is not None else None
    with RunLock(workdir):
        ckpt = Checkpointer(
            workdir, save_every=config.checkpoint.every_steps, keep=config.checkpoint.keep
        )
        data = None
        try:
            ckpt.check_compatible(config)
            with compilation_cache(workdir, config.compute.compilation_cache_dir):
                data = iter(train_dataset(config, source))
                state = _initial_state(config, mesh, ckpt, data)
                resumed = int(state.step) or None
                enabled = jax.process_index() == 0
                with MetricWriter(workdir, enabled=enabled, resume_step=resumed) as writer:
                    writer.write_hparams(config)
                    return _loop(config, workdir, mesh, state, data, ckpt, writer, monitor)
        finally:
            ckpt.close()  # waits for saves in flight: even after an error the last one is whole
            if data is not None:
                data.close()  # stops the data workers


class CacheHits:
    """How many programs this process has loaded from JAX's persistent compilation cache."""

    count = 0

    @classmethod
    def listen(cls, event: str, **_) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            cls.count += 1


jax.monitoring.register_event_listener(CacheHits.listen)


@contextlib.contextmanager
def compilation_cache(workdir: str, cache_dir: str):
    """JAX's persistent compilation cache in `cache_dir` (relative: under `workdir`) while the
    run lasts, then the process's own setting again (a notebook may train several runs)."""
    if not cache_dir:
        yield
        return
    previous_dir = jax.config.jax_compilation_cache_dir
    previous_key = jax.config.jax_remove_custom_partitioning_ptr_from_cache_key
    # JAX opens its cache once per process: reset it so that this run's directory is taken.
    jax_compilation_cache.reset_cache()
    jax_compilation_cache.set_cache_dir(os.path.join(workdir, cache_dir))
    # The CPU attention kernel's custom partitioning puts a Python object's address in the
    # program, different in every process: left in the cache key, it would never hit.
    jax.config.update("jax_remove_custom_partitioning_ptr_from_cache_key", True)
    try:
        yield
    finally:
        jax_compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", previous_dir)
        jax.config.update("jax_remove_custom_partitioning_ptr_from_cache_key", previous_key)


def _loop(config, workdir, mesh, state, data, ckpt, writer, monitor) -> dict[str, float]:
    """Steps from `state.step` to the end (or a stop signal), then the final save and export."""
    start, total_steps = int(state.step), config.optim.epochs * config.train.OFFICIAL_EPOCH_LENGTH
    if monitor and start == 0:
        _log_monitors("the teacher at initialisation", monitor(0, *_teacher(state), writer))
    # Several processes must stop at the same step: JAX's preemption service (which handles
    # their SIGTERM) agrees on it. A single process catches the signals itself.
    stop = StopSignal() if jax.process_count() == 1 else None
    hits = CacheHits.count
    train_step, compile_time = _compile(config, mesh, state)
    writer.write(start, {"compile_time_s": compile_time})
    how = "loaded from the compilation cache" if CacheHits.count > hits else "compiled"
    log.info("Steps %d..%d, %s in %.1f s", start, total_steps, how, compile_time)
    last = {}
    bar = tqdm(total=total_steps, initial=start, disable=jax.process_index() != 0, unit="step")
    window = Throughput(config.train.batch_size)
    collapse = CollapseWatch(config, config.train.OFFICIAL_EPOCH_LENGTH)
    with stop or contextlib.nullcontext():
        for step in range(start + 1, total_steps + 1):
            batch = parallel.to_global(_step_inputs(config, next(data)), mesh)
            state, metrics = train_step(state, batch)
            window.add_step()
            stopping = (stop and stop.received) or ckpt.reached_preemption(step)
            saving = stopping or ckpt.should_save(step)
            if step % config.log.every_steps == 0 or saving or step == total_steps:
                # Checked before any save, so that a non-finite state is never written.
                last = {**_check_finite(jax.device_get(metrics), step), **window.read()}
                writer.write(step, last)
                if warning := collapse.check(step, last):
                    log.warning(warning)
                bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.1f}")
            every = config.eval.knn_every_steps  # the last step has its own k-NN below
            if monitor and every and step % every == 0 and step < total_steps:
                monitor(step, *_teacher(state), writer)
            bar.update(1)
            if saving:
                ckpt.save(step, state, data, config, force=True)
            if stopping:
                log.warning("Stopped at step %d with a checkpoint (signal or preemption).", step)
                break
    bar.close()
    step = int(state.step)
    ckpt.save(step, state, data, config, force=True)
    if step == total_steps:
        ckpt.wait()  # a final save that failed stops the run here, before the export
        export_teacher(os.path.join(workdir, "export"), state, config)
        if monitor:
            last.update(monitor(step, *_teacher(state), writer))
            _log_monitors("the trained teacher", last)
    return last


def _initial_state(config, mesh, ckpt: Checkpointer, data):
    """The newest readable checkpoint's state (and data position), else the weights of
    `config.train.init_checkpoint` or a fresh state, at step 0."""
    state = ckpt.restore_latest(abstract_state(config, mesh), data)
    if state is not None:
        if config.train.init_checkpoint:
            log.info(
                "init_checkpoint=%s ignored: the workdir has a checkpoint",
                config.train.init_checkpoint,
            )
        log.info("Resuming from the checkpoint of step %d", int(state.step))
        return state
    rng = jax.random.key(config.train.seed)
    if config.train.init_checkpoint:
        # What utils.py: restart_from_checkpoint restores, less the optimizer, epoch and fp16
        # scaler: a new run with its own schedules.
        state, what = interop.init_state_from(config.train.init_checkpoint, config, rng, mesh)
        log.info("Starting at step 0 from %s: %s", config.train.init_checkpoint, what)
        return state
    return init_state(config, rng, mesh)


def _compile(config, mesh, state):
    """Compile the step ahead of time on the shapes of a real batch; returns it and seconds."""
    start = time.perf_counter()
    compiled = make_train_step(config, mesh).lower(state, abstract_batch(config, mesh)).compile()
    return compiled, time.perf_counter() - start


def _step_inputs(config, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The entries of the method's batch spec (labels and the like stay on the host)."""
    return {k: batch[k] for k in abstract_batch(config)}


def _teacher(state):
    """(teacher params, teacher batch statistics or None): what the monitors evaluate."""
    return state.teacher, state.batch_stats.get("teacher") if state.batch_stats else None


def _log_monitors(teacher: str, values: dict) -> None:
    log.info("k-NN top-1 of %s: %.1f%%", teacher, values["knn_top1"])
    if "knn_top1_retain" in values:
        log.info(
            "k-NN top-1 of %s on the retained source: %.1f%%", teacher, values["knn_top1_retain"]
        )
    if "jaccard_mean_map" in values:
        log.info(
            "Jaccard of the attention masks of %s: mean map %.3f, best head %.3f",
            teacher,
            values["jaccard_mean_map"],
            values["jaccard_best_head"],
        )
        probe = values["patch_jaccard"]
        log.info("Jaccard of a linear probe of the patch features of %s: %.3f", teacher, probe)


def _check_finite(metrics: dict, step: int) -> dict[str, float]:
    metrics = {k: float(v) for k, v in metrics.items()}
    if not math.isfinite(metrics["loss"]):
        raise NonFiniteLoss(
            f"Loss is {metrics['loss']} at step {step}; stopping with the last good checkpoint "
            "kept. Try a lower optim.lr or optim.clip_grad, or compute.dtype=float32 "
            "(docs/training.md: NaN losses)."
        )
    return metrics


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    if f.config.compute.cpu_tuning and host_memory.cpu_run(f.config.compute.platform):
        host_memory.reuse_freed_memory()  # before JAX's threads allocate: see host_memory
    parallel.initialize_distributed(
        f.coordinator_address, f.num_processes, f.process_id, f.heartbeat_timeout_s
    )
    # Our progress at INFO on process 0; the libraries' (orbax, grain) only when they warn.
    absl_logging.set_verbosity(absl_logging.WARNING)
    absl_logging.get_absl_handler().addFilter(_without_checkpointer_tracebacks)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    try:
        final = train(flags.FLAGS.config, flags.FLAGS.workdir)
    except (ValueError, FileNotFoundError, NonFiniteLoss, SaveFailed) as e:
        # Bad settings and data are the user's to fix: the message, not a traceback.
        log.error("%s", e)
        sys.exit(1)
    if jax.process_index() == 0:
        print("final:", " ".join(f"{k}={v:.4g}" for k, v in sorted(final.items())))


def _without_checkpointer_tracebacks(record: logging.LogRecord) -> bool:
    """orbax logs a failed background write with its traceback; the run reports the failure
    once, in one line (checkpoint.SaveFailed), so the library's record keeps its message only."""
    if "orbax" in record.pathname:
        record.exc_info, record.exc_text = None, None
    return True


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, but an unknown `--config.KEY` ends in one line per key naming the
    nearest known keys (or its section, for a key of the flat layout), not ml_collections'
    traceback; `--config.KEY=None` unsets an optional key."""
    argv, unset = none_overrides(argv)
    try:
        rest = app.parse_flags_with_usage(argv)
        set_none(flags.FLAGS.config, unset)
        return rest
    except (AttributeError, KeyError):
        spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
        if spec is None and "--config" in argv[:-1]:
            spec = argv[argv.index("--config") + 1]
        messages = unknown_overrides(load_config(spec), argv) if spec else []
        if not messages:
            raise
        for message in messages:
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

"""Metric records of a run: workdir/metrics.jsonl and TensorBoard scalars (written by process 0),
the config beside them, and reading and plotting the records back.

metrics.jsonl holds one JSON object per line, `{"step": s, "<name>": value, ...}`. JSON has no
NaN or infinity, so non-finite values are written as the strings "NaN", "Infinity" and
"-Infinity" (the file stays valid JSON); `read_metrics` turns them back into floats.
TensorBoard event files are written with tensorboardX, without TensorFlow.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorboardX
from etils import epath

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CONFIG_FILE = "config.json"
PLOT_FILE = "metrics.png"
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class MetricWriter:
    """Appends scalar metrics to workdir/metrics.jsonl and to TensorBoard under workdir/tensorboard.

    Only process 0 writes (`is_primary`); elsewhere, or with `enabled=False`, every call is a
    no-op, so that the loop calls it the same way on every process. A resumed run appends to the
    same files. `resume_step`, the step of the checkpoint a run resumed from, makes TensorBoard
    hide what the interrupted run logged after it.
    """

    def __init__(
        self, workdir: str | epath.PathLike, *, enabled: bool = True, resume_step: int | None = None
    ):
        self.workdir = epath.Path(workdir)
        self.is_primary = enabled and jax.process_index() == 0
        if not self.is_primary:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = _metrics_file(self.workdir, resume_step).open(
            "a" if _is_local(workdir) else "w"
        )
        self._tensorboard = tensorboardX.SummaryWriter(
            str(self.workdir / TENSORBOARD_DIR),
            purge_step=None if resume_step is None else int(resume_step) + 1,
            # A background thread writes events every flush_secs (and at close): TensorBoard
            # itself reloads every 30 s. metrics.jsonl is the record that is always current.
            flush_secs=30,
        )

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records scalar `metrics` (floats, NumPy or JAX scalars) at `step`; the JSON line is
        flushed at once, the TensorBoard events within 30 s."""
        if not self.is_primary:
            return
        step = int(step)
        values = {key: _scalar(key, value) for key, value in metrics.items()}
        record = {"step": step, **{key: _json_number(v) for key, v in values.items()}}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            self._tensorboard.add_scalar(key, value, step)

    def write_hparams(self, config: ml_collections.ConfigDict | Mapping[str, Any]) -> None:
        """Records the run's config once: workdir/config.json and TensorBoard's Text tab."""
        if not self.is_primary:
            return
        text = _config_json(config)
        (self.workdir / CONFIG_FILE).write_text(text + "\n")
        # Indented four spaces, TensorBoard's markdown shows the JSON verbatim.
        self._tensorboard.add_text("config", "\n".join("    " + s for s in text.splitlines()), 0)

    def close(self) -> None:
        if self.is_primary:
            self._jsonl.close()
            self._tensorboard.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _scalar(key: str, value: Any) -> float:
    array = np.asarray(value)
    if array.size != 1 or key == "step":
        raise ValueError(
            f"metric {key!r}={value!r} cannot be recorded: metrics are scalars, and 'step' is "
            "the write() argument."
        )
    return float(array.reshape(()))


def _json_number(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _from_json(value: Any) -> Any:
    return _NON_FINITE.get(value, value) if isinstance(value, str) else value


def _config_json(config: ml_collections.ConfigDict | Mapping[str, Any]) -> str:
    if isinstance(config, ml_collections.ConfigDict):
        return config.to_json_best_effort(indent=2, sort_keys=True)
    return json.dumps(config, indent=2, sort_keys=True, default=str)


def _is_local(workdir: str | epath.PathLike) -> bool:
    return "://" not in str(workdir)


def _metrics_file(workdir: epath.Path, resume_step: int | None) -> epath.Path:
    """workdir/metrics.jsonl, appended to by every run. Object stores (gs://) cannot append, so
    there each run (re)started at step s writes its own workdir/metrics.<s>.jsonl."""
    if _is_local(workdir):
        return workdir / METRICS_FILE
    return workdir / f"metrics.{resume_step or 0:09d}.jsonl"


def read_metrics(workdir: str | epath.PathLike) -> list[dict[str, Any]]:
    """The records of workdir/metrics.jsonl (or its per-run parts): one dict per step, in order.

    Records of the same step are merged, later values winning: metrics written apart (training,
    evaluation) share a step, and a step that a resumed run repeated shows the repeat's values.
    """
    workdir = epath.Path(workdir)
    files = sorted(workdir.glob("metrics.*.jsonl")) or [workdir / METRICS_FILE]
    by_step: dict[int, dict[str, Any]] = {}
    for path in files:
        with path.open() as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    merged = by_step.setdefault(record["step"], {})
                    merged.update({key: _from_json(value) for key, value in record.items()})
    return [by_step[step] for step in sorted(by_step)]


def plot_metrics(
    runs: str | epath.PathLike | Mapping[str, str | epath.PathLike],
    keys: Sequence[str] | None = None,
    out_png: str | epath.PathLike | None = None,
) -> str:
    """Draws each metric against the step, one panel each, into a PNG; returns its path.

    `runs`: a workdir, or {label: workdir} to compare runs (one line per run in every panel, and
    a legend). `keys`: the metrics to draw (default: every metric recorded by any run). The PNG
    goes to `out_png`, by default metrics.png in the (first) workdir. Needs matplotlib.
    """
    from matplotlib.figure import Figure  # optional: only plotting needs it

    if isinstance(runs, Mapping):
        workdirs = {label: epath.Path(workdir) for label, workdir in runs.items()}
    else:
        workdirs = {"": epath.Path(runs)}
    if not workdirs:
        raise ValueError("plot_metrics needs at least one workdir.")
    records = {label: read_metrics(workdir) for label, workdir in workdirs.items()}
    recorded = list(
        dict.fromkeys(key for rs in records.values() for r in rs for key in r if key != "step")
    )
    keys = recorded if keys is None else list(keys)
    missing = [key for key in keys if key not in recorded]
    if missing or not keys:
        where = ", ".join(str(workdir / METRICS_FILE) for workdir in workdirs.values())
        raise ValueError(f"keys={missing or keys} not found in {where}; recorded: {recorded}.")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    figure = Figure(figsize=(4 * cols, 3 * rows), layout="constrained")
    for i, key in enumerate(keys):
        axes = figure.add_subplot(rows, cols, i + 1)
        for label, rs in records.items():
            points = [(r["step"], r[key]) for r in rs if key in r]
            if points:
                steps, values = zip(*points, strict=True)
                axes.plot(steps, values, marker="o" if len(points) < 30 else None, label=label)
        axes.set_title(key)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if len(records) > 1:
            axes.legend(fontsize=7)
    first = next(iter(workdirs.values()))
    out = epath.Path(out_png) if out_png is not None else first / PLOT_FILE
    png = io.BytesIO()  # through memory, so that gs:// destinations work as local ones
    figure.savefig(png, format="png", dpi=100)
    out.write_bytes(png.getvalue())
    return str(out)

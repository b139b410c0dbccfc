"""Metric records: the JSONL lines and TensorBoard events on disk, resuming, non-finite values,
the config, the no-op writer of other processes, and the plot."""

import json
import math
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from dino_jax import metrics as metrics_lib
from dino_jax.metrics import MetricWriter, plot_metrics, read_metrics


def jsonl_lines(workdir: Path) -> list[dict]:
    """metrics.jsonl parsed line by line as strict JSON (NaN or Infinity literals fail)."""

    def reject(constant):
        raise ValueError(f"{constant} is not valid JSON")

    text = (workdir / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=reject) for line in text.splitlines()]


def tensorboard_events(workdir: Path) -> list[event_pb2.Event]:
    """Every event of every event file, read from the TFRecord framing: u64 length, u32 crc,
    payload, u32 crc."""
    events = []
    for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


def scalars(events) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_writes_jsonl_and_tensorboard_scalars_as_plain_floats(tmp_path):
    writer = MetricWriter(tmp_path)
    writer.write(1, {"loss": np.float32(2.5), "lr": jnp.asarray(1e-3)})
    writer.write(jnp.int32(2), {"loss": 2.0, "lr": jnp.asarray(2e-3)})
    # Read while the writer is still open: a person following a live run sees every step.
    lines = jsonl_lines(tmp_path)
    assert lines == [{"step": 1, "loss": 2.5, "lr": pytest.approx(1e-3)},
                     {"step": 2, "loss": 2.0, "lr": pytest.approx(2e-3)}]  # fmt: skip
    assert all(type(line["loss"]) is float and type(line["step"]) is int for line in lines)
    writer.close()  # TensorBoard events are written by a background thread, at the latest here
    got = scalars(tensorboard_events(tmp_path))
    assert got["loss"] == [(1, 2.5), (2, 2.0)]
    assert [s for s, _ in got["lr"]] == [1, 2]
    np.testing.assert_allclose([v for _, v in got["lr"]], [1e-3, 2e-3], rtol=1e-6)


def test_a_resumed_run_appends_and_its_repeats_win(tmp_path):
    with MetricWriter(tmp_path) as writer:
        for step in (10, 20, 30):
            writer.write(step, {"loss": float(step)})
    with MetricWriter(tmp_path, resume_step=20) as writer:  # resumed from the checkpoint at 20
        writer.write(30, {"loss": 3.0})
        writer.write(30, {"knn_top1": 0.5})  # evaluation, written apart at the same step
        writer.write(40, {"loss": 4.0})

    assert [line["step"] for line in jsonl_lines(tmp_path)] == [10, 20, 30, 30, 30, 40]
    assert read_metrics(tmp_path) == [
        {"step": 10, "loss": 10.0},
        {"step": 20, "loss": 20.0},
        {"step": 30, "loss": 3.0, "knn_top1": 0.5},
        {"step": 40, "loss": 4.0},
    ]
    # TensorBoard is told to drop what the first run logged after step 20.
    purges = [e.step for e in tensorboard_events(tmp_path) if e.session_log.status == 1]
    assert purges == [21]


def test_non_finite_values_stay_valid_json(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(5, {"loss": float("nan"), "grad_norm": np.float32(np.inf), "x": -jnp.inf})

    (line,) = jsonl_lines(tmp_path)
    assert line == {"step": 5, "loss": "NaN", "grad_norm": "Infinity", "x": "-Infinity"}
    (record,) = read_metrics(tmp_path)
    assert math.isnan(record["loss"])
    assert (record["grad_norm"], record["x"]) == (math.inf, -math.inf)
    assert math.isnan(scalars(tensorboard_events(tmp_path))["loss"][0][1])


def test_rejects_non_scalars(tmp_path):
    with MetricWriter(tmp_path) as writer, pytest.raises(ValueError, match="'center'"):
        writer.write(1, {"center": np.zeros(3)})


def test_config_goes_to_json_and_tensorboard_text(tmp_path, tiny_config):
    with MetricWriter(tmp_path) as writer:
        writer.write_hparams(tiny_config())

    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["dino"]["head_n_prototypes"], saved["crops"]["global_crops_size"]) == (256, 32)
    texts = [
        v.tensor.string_val[0].decode()
        for e in tensorboard_events(tmp_path)
        for v in e.summary.value
        if v.tag.startswith("config")
    ]
    assert len(texts) == 1 and '"head_n_prototypes": 256' in texts[0]


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with MetricWriter(workdir, enabled=False) as writer:
        assert not writer.is_primary
        writer.write(1, {"loss": 1.0})
        writer.write_hparams({"lr": 0.1})
    assert not workdir.exists()


def test_plot_draws_the_recorded_curves(tmp_path):
    from PIL import Image

    pytest.importorskip("matplotlib")
    with MetricWriter(tmp_path) as writer:
        for step in range(1, 21):
            writer.write(step, {"loss": 10.0 / step, "lr": 1e-3 * step, "momentum": 0.996})

    path = Path(plot_metrics(tmp_path, keys=("loss", "lr")))
    assert path == tmp_path / "metrics.png"
    image = np.asarray(Image.open(path).convert("L"))
    assert image.shape == (300, 800)  # two 4 x 3 inch panels side by side at 100 dpi
    assert (image < 128).mean() > 0.005  # dark ink: curves, axes and labels were drawn
    with pytest.raises(ValueError, match=r"keys=\['los'\].*'loss'"):
        plot_metrics(tmp_path, keys=("los",))


def test_plot_compares_runs_one_line_each(tmp_path, capsys):
    """Two runs drawn into the same panels: each run's line in its own colour, through the
    command line as through the function."""
    from PIL import Image

    from dino_jax import plot

    pytest.importorskip("matplotlib")
    for name, slope in (("frozen", 1.0), ("unfrozen", -1.0)):
        with MetricWriter(tmp_path / name) as writer:
            for step in range(0, 300, 60):
                writer.write(step, {"knn_top1": 50 + slope * step / 10, "loss": 1.0})
    out = tmp_path / "compare.png"
    runs = [str(tmp_path / "frozen"), str(tmp_path / "unfrozen")]
    plot.main([*runs, "--keys", "knn_top1"])
    plot.main([*runs, "--keys", "knn_top1", "--out", str(out)])
    assert capsys.readouterr().out.split() == [str(tmp_path / "frozen" / "metrics.png"), str(out)]
    rgb = np.asarray(Image.open(out).convert("RGB")).astype(int)

    def pixels_of(colour):  # matplotlib's first two line colours, C0 and C1
        return (np.abs(rgb - np.array(colour)).sum(-1) < 40).sum()

    assert pixels_of((31, 119, 180)) > 200 and pixels_of((255, 127, 14)) > 200
    with pytest.raises(SystemExit, match="one different label per workdir"):
        plot.main([str(tmp_path / "frozen"), str(tmp_path / "unfrozen"), "--labels", "a"])
    with pytest.raises(SystemExit, match="missing is not a directory"):
        plot.main([str(tmp_path / "missing")])


def test_object_store_runs_write_their_own_parts(tmp_path, monkeypatch):
    """gs:// cannot append: each (re)started run writes metrics.<start>.jsonl, read back merged."""
    monkeypatch.setattr(metrics_lib, "_is_local", lambda workdir: False)
    with metrics_lib.MetricWriter(tmp_path) as writer:
        writer.write(1, {"loss": 2.0})
        writer.write(2, {"loss": 1.5})
    with metrics_lib.MetricWriter(tmp_path, resume_step=1) as writer:
        writer.write(2, {"loss": 1.25})
    assert sorted(p.name for p in tmp_path.glob("metrics.*.jsonl")) == [
        "metrics.000000000.jsonl",
        "metrics.000000001.jsonl",
    ]
    assert [(m["step"], m["loss"]) for m in metrics_lib.read_metrics(tmp_path)] == [
        (1, 2.0),
        (2, 1.25),
    ]

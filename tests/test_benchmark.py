"""`benchmark step`: FLOPs from XLA's cost analysis, peak FLOP/s, config overrides, the table;
`benchmark data` on generated JPEGs and on a config's own source."""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dino_jax import benchmark
from dino_jax.tools import step_benchmark


def test_step_flops_of_a_matmul_are_2mnk():
    m, k, n = 64, 48, 80
    compiled = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert step_benchmark.step_flops(compiled, num_devices=1) == 2 * m * k * n
    assert step_benchmark.step_flops(compiled, num_devices=8) == 8 * 2 * m * k * n


@pytest.mark.parametrize(
    ("kind", "dtype", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H200", "bfloat16", 989e12),
        ("NVIDIA A100-SXM4-40GB", "float32", 156e12),
        ("TPU v4", "bfloat16", 275e12),
        ("TPU v5 lite", "bfloat16", 197e12),
        ("TPU v5p", "bfloat16", 459e12),
        ("TPU v6 lite", "bfloat16", 918e12),
    ],
)
def test_peak_flops_table(kind, dtype, peak):
    device = types.SimpleNamespace(platform="gpu", device_kind=kind)
    got, source = step_benchmark.device_peak_flops(device, dtype)
    assert got == peak and source.endswith("data sheet")
    assert step_benchmark.mesh_peak_flops([device] * 4, dtype)[0] == 4 * peak


def test_unknown_accelerator_fails_clearly():
    device = types.SimpleNamespace(platform="gpu", device_kind="Quantum Widget 9000")
    with pytest.raises(ValueError, match=r"Quantum Widget 9000.*PEAK_FLOPS"):
        step_benchmark.device_peak_flops(device, "bfloat16")


def test_cpu_peak_is_measured_once_for_the_host():
    step_benchmark.measured_matmul_peak.cache_clear()
    peak, source = step_benchmark.device_peak_flops(jax.devices()[0], "float32")
    assert source == "measured matmul"
    assert 1e9 < peak < 1e14  # between a slow laptop core and more than any CPU socket
    # Several CPU "devices" share the host's cores: the peak is the host's, not a multiple.
    total, _ = step_benchmark.mesh_peak_flops(jax.devices(), "float32")
    assert total < 3 * peak
    # Measured once per process: every config of one run is reported against the same peak.
    assert step_benchmark.device_peak_flops(jax.devices()[0], "float32")[0] == peak


def test_config_overrides():
    [(label, config)] = benchmark.parse_configs(
        [
            "--config",
            "configs/vit_small16.py",
            "--config.train.batch_size=8",
            "--config.compute.dtype=float32",
            "--config.crops.local_crops_size=64",
            "--config.crops.local_crops_scale=(0.1, 0.3)",
        ]
    )
    assert config.train.batch_size == 8 and config.compute.dtype == "float32"
    crops = config.crops
    assert crops.local_crops_size == 64 and tuple(crops.local_crops_scale) == (0.1, 0.3)
    assert label.startswith("configs/vit_small16.py train.batch_size=8")
    with pytest.raises(ValueError, match=r"Unknown config key 'train.bath_size'.*did you mean"):
        benchmark.parse_configs(
            ["--config", "configs/vit_small16.py", "--config.train.bath_size=8"]
        )
    # A key of the flat layout names its section.
    with pytest.raises(ValueError, match=r"'batch_size' is now 'train.batch_size'"):
        benchmark.parse_configs(["--config", "configs/vit_small16.py", "--config.batch_size=8"])
    # Values are parsed as their field's type, as the training command parses them.
    with pytest.raises(ValueError, match="batch_size=eight"):
        benchmark.parse_configs(
            ["--config", "configs/vit_small16.py", "--config.train.batch_size=eight"]
        )
    [(_, config)] = benchmark.parse_configs(
        ["--config", "configs/vit_small16.py", "--config.data.source=123"]
    )
    assert config.data.source == "123"
    with pytest.raises(ValueError, match="before any --config"):
        benchmark.parse_configs(["--config.train.batch_size=8"])


@pytest.mark.slow
def test_step_command_prints_the_table(capsys):
    args = ["--config", "configs/vit_small16.py:smoke", "--config.compute.dtype=float32"]
    benchmark.main(["step", *args, "--steps", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| configs/")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[3] == "float32"
    compile_s, step_s, images_per_s, gflop = (float(c) for c in cells[4:8])
    assert compile_s > 0 and step_s > 0
    # Both cells are rounded (step s to 3 decimals, images/s to 2): compare within that rounding.
    assert 8 / (step_s + 5e-4) - 5e-3 <= images_per_s <= 8 / (step_s - 5e-4) + 5e-3
    assert gflop > 0
    assert cells[10].endswith("%")


@pytest.mark.slow
def test_benchmark_step_report_is_consistent(tiny_config):
    config = tiny_config(OFFICIAL_EPOCH_LENGTH=None)
    report = step_benchmark.benchmark_step(config, steps=2, warmup=1)
    assert config.train.OFFICIAL_EPOCH_LENGTH > 0
    assert report.flops_per_s == pytest.approx(report.flops / report.step_s)
    assert report.mfu == pytest.approx(report.flops_per_s / report.peak_flops)
    assert report.peak_memory_bytes > 0 and report.memory_source == "memory_analysis"


def vit_dino_step_matmul_flops(config) -> int:
    """Matmul FLOPs of one DINO step with a ViT, counted from the architecture (2 per
    multiply-add): the teacher's forward on the 2 global crops, the student's forward and backward
    on the global and local crops. The backward of a matmul is two matmuls of its size (input and
    weight gradients), except the patch embedding's: no one needs the pixels' gradient."""
    student, dino = config.student, config.dino
    d, p, depth, mlp = student.embed_dim, student.patch_size, student.depth, 4 * student.embed_dim
    hidden, bottleneck, out = dino.head_hidden_dim, dino.head_bottleneck_dim, dino.head_n_prototypes
    assert config.dino.head_nlayers == 3

    def backbone_and_head(size: int) -> tuple[int, int]:
        """(patch embedding, blocks + head) FLOPs of one crop of `size` px."""
        n = (size // p) ** 2
        t = n + 1  # with the cls token
        patch = 2 * n * (3 * p * p) * d
        qkv, proj, fc = 2 * t * d * 3 * d, 2 * d * d, 2 * 2 * d * mlp  # proj, fc: per token
        block = qkv + 2 * 2 * t * t * d + t * proj + t * fc
        # The last block feeds only the cls token's features: its qkv projection runs on all
        # tokens (the keys and values), attention, proj and MLP on the cls query alone.
        last = qkv + 2 * 2 * t * d + proj + fc
        head = 2 * (d * hidden + hidden * hidden + hidden * bottleneck + bottleneck * out)
        return patch, (depth - 1) * block + last + head

    g_patch, g_rest = backbone_and_head(config.crops.global_crops_size)
    l_patch, l_rest = backbone_and_head(config.crops.local_crops_size)
    n_local = config.crops.local_crops_number
    teacher = 2 * (g_patch + g_rest)
    student_forward = 2 * (g_patch + g_rest) + n_local * (l_patch + l_rest)
    student_backward = 2 * (g_patch + 2 * g_rest) + n_local * (l_patch + 2 * l_rest)
    return config.train.batch_size * (teacher + student_forward + student_backward)


@pytest.mark.slow
def test_benchmark_step_flops_match_the_vits_matmuls(tiny_config):
    """The FLOPs `benchmark step` reports against the matmuls counted from the architecture."""
    # 64 images: the per-parameter work (AdamW, the teacher EMA), which every data-parallel
    # device repeats, is spread over more images, so that the matmuls dominate the count.
    # Stock layers: one compile, and the program the CPU kernel's step is counted on anyway.
    config = tiny_config(OFFICIAL_EPOCH_LENGTH=None, batch_size=64, cpu_tuning=False)
    report = step_benchmark.benchmark_step(config, steps=1, warmup=0)
    ratio = report.flops / vit_dino_step_matmul_flops(config)
    # XLA counts each dot as exactly 2mnk (test above), so the step holds at least the matmuls;
    # the rest is elementwise (LayerNorm, GELU's erf, softmax, AdamW, EMAs): 13% here. A count
    # without the local crops or without the teacher (each ~20% of the matmuls) gives 1.42-1.43,
    # without the backward 2.35, twice or half the FLOPs 2.26 or 0.56: all outside.
    assert 1.0 <= ratio <= 1.25, f"reported / matmul FLOPs = {ratio:.3f}"


@pytest.mark.slow
def test_interleaved_configs_each_get_their_steps(capsys):
    """Two configs in turn: a row each and the speed ratio, and the CPU kernel's FLOPs counted."""
    tiny = ["--config", "configs/vit_small16.py:smoke", "--config.compute.dtype=float32"]
    args = [*tiny, *tiny, "--config.compute.cpu_tuning=False"]
    benchmark.main(["step", *args, "--steps", "2", "--warmup", "1", "--interleave"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| configs/")]
    assert len(rows) == 2 and "cpu_tuning=False" in rows[1]
    gflops = [float(row.strip("|").split("|")[7]) for row in rows]
    # XLA cannot count inside the kernel's custom calls: the kernel's step is counted as XLA's.
    assert gflops[0] == gflops[1] > 0
    assert "in turn, one step of each per round" in out
    assert "cpu_tuning=False: " in out.split("speed against")[1]


@pytest.mark.slow
def test_interleaving_alternates_the_steps(tiny_config, monkeypatch):
    order = []
    run = step_benchmark.PreparedStep.run

    def logged(self, timed):
        order.append(self.config.train.seed)
        run(self, timed)

    monkeypatch.setattr(step_benchmark.PreparedStep, "run", logged)
    # Without the CPU kernel each step is also the program its FLOPs are counted on: no recompile.
    configs = [tiny_config(seed=seed, cpu_tuning=False) for seed in (1, 2)]
    reports = step_benchmark.benchmark_steps(configs, 2, 1)
    assert order == [1, 2, 1, 2, 1, 2] and len(reports) == 2


def data_rows(out: str) -> dict[str, tuple[float, float, float]]:
    """`benchmark data`'s table: pipeline -> (images/s wall, images/s per CPU-second, ms/image)."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] != "pipeline":
            rows[cells[0]] = tuple(float(c) for c in cells[1:])
    return rows


def check_rates(rows):
    for wall, cpu, ms in rows.values():
        assert wall > 0 and cpu > 0
        assert ms == pytest.approx(1000 / wall, rel=0.01, abs=0.01)


def test_data_command_on_generated_jpegs(capsys):
    benchmark.main(["data", "--images", "2", "--local-crops", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "2 JPEGs (mean" in out and "decode + 2x224 + 1x96" in out
    rows = data_rows(out)
    assert list(rows) == ["PIL baseline", "dino_jax", "dino_jax, augment_on_device (host half)"]
    check_rates(rows)
    assert "speed-up dino_jax / PIL baseline" in out


def test_data_command_on_a_configs_image_folder(tmp_path, capsys):
    """Runs the configured pipeline on the folder's own JPEGs (72x56, unlike the generated
    500x375 ones): all 5 readable ones of its 6 files, whatever --images asks, with the baseline
    on the same files."""
    rng = np.random.default_rng(0)
    for name, count in (("cat", 3), ("dog", 2)):
        folder = tmp_path / "train" / name
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (56, 72, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"not a JPEG")
    source = f"folder:{tmp_path}"
    config = ["--config", "configs/custom.py:smoke", f"--config.data.source={source}"]
    benchmark.main(["data", *config, "--images", "50", "--repeats", "1"])
    out = capsys.readouterr().out
    header = re.search(r"^(\d+) images of (\S+) \(split 'train': (\d+) images; (.*)$", out, re.M)
    assert header, out
    assert (header[1], header[2], header[3]) == ("5", source, "6")
    assert "1 unreadable left out, median 72x56" in header[4]
    assert "decode + 2x32 + 2x16" in header[4]
    assert f"config: configs/custom.py:smoke data.source={source}" in out
    assert str(tmp_path) in next(line for line in out.splitlines() if line.startswith("source:"))
    rows = data_rows(out)
    # custom.py augments on the device: the host's half is what the loader does.
    assert list(rows) == ["PIL baseline", "dino_jax, augment_on_device (host half)"]
    check_rates(rows)
    assert "speed-up dino_jax, augment_on_device (host half) / PIL baseline" in out


def test_data_command_skips_the_baseline_without_files(capsys):
    benchmark.main(["data", "--config", "configs/demo.py:smoke", "--images", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    assert re.search(r"^3 images of synthetic:shapes .*decoded arrays", out, re.M), out
    assert list(data_rows(out)) == ["dino_jax"]
    assert "PIL baseline skipped" in out
    with pytest.raises(ValueError, match="local_crops_number"):
        benchmark.main(["data", "--config", "configs/demo.py:smoke", "--local-crops", "2"])

"""ResNet-50 against a PyTorch transcription of torchvision's, and BatchNorm's torch semantics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from torch import nn

from dino_jax.models.batchnorm import BatchNorm
from dino_jax.models.resnet import ResNet, resnet50

IMAGES, SIZE = 2, 64


class TorchBottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (v1.5: the stride sits on the 3x3 conv)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class TorchResNet50(nn.Module):
    """torchvision.models.resnet50 with `fc` removed: returns the 2048-d average pool."""

    def __init__(self):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 3)
        self.layer2 = self._make_layer(128, 4, stride=2)
        self.layer3 = self._make_layer(256, 6, stride=2)
        self.layer4 = self._make_layer(512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * TorchBottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )
        layers = [TorchBottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * TorchBottleneck.expansion
        layers += [TorchBottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def assert_close(actual, expected, rtol=1e-5):
    """Elementwise rtol, plus an atol of rtol x the array's scale for entries near zero."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def torch_name(path) -> str:
    """('layer1_0', 'downsample_bn') → 'layer1.0.downsample.1' (torchvision's module path)."""
    name = ".".join(k.key for k in path)
    name = name.replace("downsample_conv", "downsample.0").replace("downsample_bn", "downsample.1")
    return name.replace("_", ".")


TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
TORCH_STAT = {"mean": "running_mean", "var": "running_var"}


def torch_resnet_from_flax(variables) -> TorchResNet50:
    """The torch reference loaded with flax `variables`; strict about every name and shape."""
    state = {}
    for path, x in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        x = np.array(x)
        if x.ndim == 4:  # (kh, kw, in, out) → (out, in, kh, kw)
            x = x.transpose(3, 2, 0, 1)
        state[f"{torch_name(path[:-1])}.{TORCH_LEAF[path[-1].key]}"] = torch.from_numpy(x)
    for path, x in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]:
        state[f"{torch_name(path[:-1])}.{TORCH_STAT[path[-1].key]}"] = torch.from_numpy(np.array(x))
    ref = TorchResNet50()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(k.endswith("num_batches_tracked") for k in missing)
    return ref


@pytest.fixture(scope="module")
def variables():
    """Random ResNet-50 variables with every BatchNorm param and running statistic non-trivial.

    Drawn with NumPy into `eval_shape`'s tree: compiling the real init is slow on CPU.
    Residual-branch scales (bn3) are kept small, as in a trained ResNet: with scale ~1 on every
    branch, train-mode BatchNorm over this tiny batch amplifies float32 rounding until torch's
    own float32 and float64 outputs differ by ~3e-4, too much to test parity at 1e-5.
    """
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(resnet50().init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))

    def draw(path, x):
        name, module = path[-1].key, path[-2].key
        if name == "kernel":
            kh, kw, _, out = x.shape
            return rng.normal(0.0, np.sqrt(2.0 / (kh * kw * out)), x.shape)
        if name == "scale":
            low, high = (0.1, 0.3) if module == "bn3" else (0.5, 1.5)
            return rng.uniform(low, high, x.shape)
        if name == "var":
            return rng.uniform(0.5, 2.0, x.shape)
        return rng.normal(0.0, 0.1, x.shape)  # bias, mean

    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(draw(p, x), jnp.float32), shapes
    )


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).normal(size=(IMAGES, SIZE, SIZE, 3)).astype(np.float32)


def nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def apply_jit(train: bool, dtype=jnp.float32):
    """Jitted ResNet-50 forward; train=True also returns the updated batch_stats."""
    mutable = ["batch_stats"] if train else False
    return jax.jit(functools.partial(resnet50(dtype=dtype).apply, train=train, mutable=mutable))


@pytest.fixture(scope="module")
def train_forward(variables, images):
    """(features, updated variables) of one float32 train-mode forward."""
    return apply_jit(train=True)(variables, images)


def test_eval_mode_matches_torchvision(variables, images):
    out = apply_jit(train=False)(variables, images)
    ref = torch_resnet_from_flax(variables).eval()
    with torch.no_grad():
        expected = ref(nchw(images))
    assert out.shape == (IMAGES, 2048) and out.dtype == jnp.float32
    assert_close(out, expected)


def test_train_mode_matches_torchvision_including_running_stats(variables, images, train_forward):
    out, updates = train_forward
    ref = torch_resnet_from_flax(variables).train()
    with torch.no_grad():
        expected = ref(nchw(images))
    assert_close(out, expected)
    ref_state = ref.state_dict()
    for path, x in jax.tree_util.tree_flatten_with_path(updates["batch_stats"])[0]:
        assert_close(x, ref_state[f"{torch_name(path[:-1])}.{TORCH_STAT[path[-1].key]}"])


def test_parameter_counts_match_torchvision():
    shapes = jax.eval_shape(resnet50().init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    n_params = sum(x.size for x in jax.tree.leaves(shapes["params"]))
    n_stats = sum(x.size for x in jax.tree.leaves(shapes["batch_stats"]))
    ref = TorchResNet50()
    ref_stats = sum(b.numel() for n, b in ref.named_buffers() if "num_batches" not in n)
    assert n_params == 23_508_032 == sum(p.numel() for p in ref.parameters())
    assert n_stats == 53_120 == ref_stats
    assert resnet50().embed_dim == 2048


@pytest.mark.slow
def test_init_matches_torchvision_init():
    # One block per stage has every kernel shape of ResNet-50 at a quarter of the compile time.
    model = ResNet(stage_sizes=(1, 1, 1, 1))
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    for path, x in jax.tree_util.tree_flatten_with_path(variables)[0]:
        name, x = path[-1].key, np.asarray(x)
        if name == "kernel":
            ref = torch.empty(x.shape[3], x.shape[2], *x.shape[:2])
            nn.init.kaiming_normal_(ref, mode="fan_out", nonlinearity="relu")
            assert x.std() == pytest.approx(ref.std().item(), rel=0.1), path
            assert abs(x.mean()) < 0.1 * x.std(), path
        else:  # BatchNorm weight 1, bias 0 (zero_init_residual=False); running mean 0, var 1
            np.testing.assert_array_equal(x, 1.0 if name in ("scale", "var") else 0.0)
    # An untruncated normal, as torch's: 2.4M draws reach beyond 4 std.
    big = np.asarray(variables["params"]["layer4_0"]["conv2"]["kernel"])
    assert np.abs(big).max() > 4 * big.std()


def test_bfloat16_returns_float32_close_to_float32(variables, images, train_forward):
    out16 = apply_jit(train=True, dtype=jnp.bfloat16)(variables, images)[0]
    assert out16.dtype == jnp.float32
    # bf16 (8-bit mantissa) through 53 convs and 53 BatchNorms: a few percent.
    rel_err = np.linalg.norm(out16 - train_forward[0]) / np.linalg.norm(train_forward[0])
    assert rel_err < 0.05


def test_batchnorm_statistics_are_over_the_global_sharded_batch():
    devices = np.array(jax.devices())
    assert devices.size == 8
    rng = np.random.default_rng(0)
    # Each device's shard gets its own offset, so per-shard statistics would differ wildly.
    x = rng.normal(size=(16, 3, 3, 5)) + 4.0 * np.repeat(np.arange(8), 2)[:, None, None, None]
    x = x.astype(np.float32)
    sharding = NamedSharding(Mesh(devices, ("data",)), PartitionSpec("data"))
    x_sharded = jax.device_put(x, sharding)
    assert len(x_sharded.sharding.device_set) == 8

    bn = BatchNorm()
    variables = bn.init(jax.random.key(0), x[:2], train=False)
    apply = jax.jit(lambda v, x: bn.apply(v, x, train=True, mutable=["batch_stats"]))
    y, updates = apply(variables, x_sharded)

    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
    n = x.size // x.shape[-1]
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(
        updates["batch_stats"]["var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5
    )


def test_batchnorm_running_stats_use_the_unbiased_variance():
    rng = np.random.default_rng(0)
    x1, x2 = (rng.normal(2.0, 3.0, size=(6, 4)).astype(np.float32) for _ in range(2))
    bn = BatchNorm(momentum=0.3)
    variables = bn.init(jax.random.key(0), x1, train=True)
    # init must not count as a step.
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(4))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(4))

    mean, var = np.zeros(4), np.ones(4)
    for x in (x1, x2):
        _, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
        mean = 0.7 * mean + 0.3 * x.mean(axis=0)
        var = 0.7 * var + 0.3 * x.var(axis=0, ddof=1)
    np.testing.assert_allclose(variables["batch_stats"]["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(variables["batch_stats"]["var"], var, rtol=1e-5)
    # Eval mode normalises with those running statistics.
    y = bn.apply(variables, x1, train=False)
    np.testing.assert_allclose(y, (x1 - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-6)


def test_batchnorm_rejects_a_single_value_per_channel():
    bn = BatchNorm()
    variables = bn.init(jax.random.key(0), jnp.ones((1, 4)), train=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn.apply(variables, jnp.ones((1, 4)), train=True, mutable=["batch_stats"])


def test_custom_stage_sizes_set_the_feature_size():
    model = ResNet(stage_sizes=(1, 1), width=8)
    out, _ = jax.eval_shape(model.init_with_output, jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
    assert out.shape == (2, model.embed_dim) == (2, 64)

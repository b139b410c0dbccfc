"""The linear probe: its features, the classifier's init, SGD with momentum on the per-epoch
cosine against NumPy, learning a separable toy set, the training stream, and the command, whose
reported accuracy is recomputed from the classifier it saves."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from dino_jax.core import parallel
from dino_jax.core.config import base_config
from dino_jax.data.pipeline import MEAN, STD, labelled_train_dataset, resize_center_crop
from dino_jax.data.sources import DecodedSource, balanced_subset
from dino_jax.data.synthetic import ShapesSource
from dino_jax.eval.maths import linear_probe as probe
from dino_jax.interop import hub
from dino_jax.models import VisionTransformer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh((("data", -1),))


@pytest.fixture(scope="module")
def vit():
    model = VisionTransformer(patch_size=8, embed_dim=64, depth=5, num_heads=4, img_size=32)
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    return model, jax.jit(model.init)(jax.random.key(1), images), images


def block_outputs(model, variables, images):
    """Each block's raw output [B, 1+N, D], captured from a forward pass over every token (the
    features' own pass computes the cls token alone in the last block)."""
    _, state = model.apply(
        variables,
        images,
        method="block_outputs",
        capture_intermediates=True,
        mutable=["intermediates"],
    )
    calls = state["intermediates"]
    return [np.asarray(calls[f"blocks_{i}"]["__call__"][0][0]) for i in range(model.depth)]


def layer_norm(x, params):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * params["scale"] + params["bias"]


def test_features_are_the_last_four_cls_tokens_after_the_final_norm(vit):
    model, variables, images = vit
    got = np.asarray(probe.ProbeFeatures(model, 4).apply(variables, images))
    norm = jax.tree.map(np.asarray, variables["params"]["norm"])
    outputs = block_outputs(model, variables, images)
    want = np.concatenate([layer_norm(h, norm)[:, 0] for h in outputs[-4:]], axis=-1)
    assert got.shape == (3, 4 * 64)
    np.testing.assert_allclose(got, want, atol=2e-5)
    # The same as the reference computes it from get_intermediate_layers.
    layers = model.apply(variables, images, 4, method="block_outputs")
    np.testing.assert_allclose(got, np.concatenate([x[:, 0] for x in layers], -1), atol=1e-6)


def test_avgpool_features_interleave_cls_and_patch_mean_like_the_reference(vit):
    model, variables, images = vit
    got = np.asarray(probe.ProbeFeatures(model, 1, avgpool=True).apply(variables, images))
    norm = jax.tree.map(np.asarray, variables["params"]["norm"])
    last = layer_norm(block_outputs(model, variables, images)[-1], norm)
    # torch.cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), -1).reshape(B, -1): c0, m0, c1, m1, ...
    want = np.empty((3, 128))
    want[:, 0::2], want[:, 1::2] = last[:, 0], last[:, 1:].mean(axis=1)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_avgpool_features_of_a_vit_with_registers():
    """The patch mean leaves out the registers (dinov2/eval/linear.py: create_linear_input
    pools get_intermediate_layers' patch tokens): the cls token, then the mean of
    x_norm_patchtokens."""
    model = VisionTransformer(
        patch_size=8, img_size=32, embed_dim=64, depth=2, num_heads=4, dinov2=True,
        layerscale=1.0, num_register_tokens=4,
    )  # fmt: skip
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    variables = model.init(jax.random.key(0), images)
    out = model.apply(variables, images, method="forward_features")
    want = np.stack([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(axis=1)], axis=-1)
    got = np.asarray(probe.ProbeFeatures(model, 1, avgpool=True).apply(variables, images))
    np.testing.assert_allclose(got, want.reshape(3, -1), rtol=1e-5, atol=1e-6)


def test_feature_settings_outside_the_model_are_refused(vit):
    with pytest.raises(ValueError, match=r"n_last_blocks=6 .* depth 5"):
        probe.ProbeFeatures(vit[0], 6)
    with pytest.raises(ValueError, match="n_last_blocks=1 with avgpool"):
        probe.ProbeFeatures(vit[0], 4, avgpool=True)


def test_classifier_starts_at_n_0_001_with_zero_bias():
    params = probe.init_classifier(jax.random.key(0), 512, 1000)
    kernel, bias = np.asarray(params["kernel"]), np.asarray(params["bias"])
    assert kernel.shape == (512, 1000) and bias.shape == (1000,)
    assert abs(kernel.mean()) < 3 * 0.01 / math.sqrt(kernel.size)
    assert abs(kernel.std() / 0.01 - 1) < 0.01  # 512k draws: the std to 1%
    assert not bias.any()


class Identity:
    """Toy 'backbone' whose features are its inputs [B, F]."""

    def apply(self, variables, images, train=False):
        del variables, train
        return images


def numpy_sgd_run(params, batches, lrs, momentum=0.9):
    """torch.optim.SGD(momentum, no dampening, no decay) on the mean softmax cross-entropy."""
    w, b = params["kernel"].astype(np.float64), params["bias"].astype(np.float64)
    buf_w = buf_b = None
    for (x, y), lr in zip(batches, lrs, strict=True):
        z = x @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dz = (p - np.eye(w.shape[1])[y]) / len(x)
        gw, gb = x.T @ dz, dz.sum(0)
        buf_w = gw if buf_w is None else momentum * buf_w + gw
        buf_b = gb if buf_b is None else momentum * buf_b + gb
        w, b = w - lr * buf_w, b - lr * buf_b
    return w, b


def test_sgd_momentum_steps_on_the_per_epoch_cosine_match_numpy(mesh):
    rng = np.random.default_rng(0)
    batches = [
        (rng.normal(size=(16, 6)).astype(np.float32), rng.integers(0, 3, 16)) for _ in range(3)
    ]
    params = {
        "kernel": rng.normal(scale=0.5, size=(6, 3)).astype(np.float32),
        "bias": rng.normal(size=3).astype(np.float32),
    }
    # lr 0.8 for batch 256 -> 0.05 for batch 16; CosineAnnealingLR(T_max=3 epochs) stepped per
    # epoch of 2 steps: epochs 0, 0, 1.
    base = 0.8 * 16 / 256
    lrs = [base, base, base * 0.5 * (1 + math.cos(math.pi / 3))]
    want_w, want_b = numpy_sgd_run(params, batches, lrs)

    optimizer = probe.make_optimizer(0.8, 16, epochs=3, steps_per_epoch=2)
    step = probe.make_train_step(Identity(), optimizer, mesh)
    state = jax.tree.map(np.copy, params)
    opt_state = optimizer.init(state)
    for x, y in batches:
        x, y = parallel.to_global((x, y.astype(np.int32)), mesh)
        state, opt_state, _ = step(state, opt_state, {}, x, y)
    np.testing.assert_allclose(np.asarray(state["kernel"]), want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state["bias"]), want_b, rtol=1e-5, atol=1e-6)


def test_accuracy_counts_top1_and_top5():
    params = {"kernel": np.eye(6, dtype=np.float32), "bias": np.zeros(6, np.float32)}
    features = np.array([[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]], np.float32)
    # Row 0 ranks class 0 first and class 5 last; row 1 the reverse.
    assert probe.accuracy(params, features, np.array([0, 1])) == {"top1": 50.0, "top5": 100.0}
    assert probe.accuracy(params, features, np.array([5, 0])) == {"top1": 0.0, "top5": 0.0}
    few = {"kernel": np.eye(3, dtype=np.float32), "bias": np.zeros(3, np.float32)}
    assert probe.accuracy(few, features[:, :3], np.array([0, 2]))["top5"] is None


def test_a_separable_toy_set_is_learnt(mesh):
    rng = np.random.default_rng(0)
    centers = 3.0 * rng.normal(size=(4, 16))

    def draw(n):
        labels = rng.integers(0, 4, n)
        return (centers[labels] + rng.normal(size=(n, 16))).astype(np.float32), labels

    def stream():
        while True:
            x, y = draw(32)
            yield {"image": x, "label": y.astype(np.int32)}

    val = draw(200)
    schedule = probe.Schedule(epochs=4, steps_per_epoch=10, batch_size=32, lr=0.2)
    params, history = probe.train_classifier(
        Identity(), {}, stream(), schedule, num_labels=4, mesh=mesh, val=val
    )
    assert params["kernel"].shape == (16, 4)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["top1"] == 100.0


def test_training_stream_crops_distinct_labelled_images_of_the_first_limit():
    # Image i is uniformly grey at level 10 i: any crop or flip of it keeps that level.
    source = [
        {"image": np.full((48, 40, 3), 10 * i, np.uint8), "label": np.int32(i)} for i in range(16)
    ]
    config = base_config()
    ds = labelled_train_dataset(config, source, 8, 24, limit=12, process_index=0, process_count=1)
    batch = next(iter(ds))  # 12 images -> one whole batch of 8 per epoch
    assert batch["image"].shape == (8, 24, 24, 3) and batch["image"].dtype == np.float32
    levels = batch["image"] * np.asarray(STD) * 255.0 + np.asarray(MEAN) * 255.0
    want = np.broadcast_to(10.0 * batch["label"][:, None, None, None], levels.shape)
    np.testing.assert_allclose(levels, want, atol=0.01)
    assert len(set(batch["label"].tolist())) == 8 and max(batch["label"]) < 12


@pytest.mark.slow
def test_command_trains_and_saves_the_classifier(export_dir, tmp_path):
    command = [
        sys.executable, "-m", "dino_jax.eval.linear", f"--checkpoint={export_dir}",
        "--train=synthetic:shapes", "--train_examples=64", "--val_examples=24",
        "--n_last_blocks=2", "--resize=40", "--crop=32", "--batch_size=32", "--epochs=2",
        f"--out_dir={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["features"] == {"n_last_blocks": 2, "avgpool": False, "dim": 128}
    assert results["schedule"]["steps_per_epoch"] == 2 and results["num_labels"] == 10
    assert results["val"]["examples"] == 24 and len(results["history"]) == 2
    assert f"Linear probe on 24 images: top-1 {results['top1']:.2f}%" in proc.stdout
    with np.load(tmp_path / "classifier.npz") as saved:
        kernel, bias, labels_saved = saved["kernel"], saved["bias"], int(saved["num_labels"])
    assert kernel.shape == (128, 10) and bias.shape == (10,) and labels_saved == 10

    # The reported accuracy is the saved classifier's on the 24 test images: their features
    # (cls tokens of the last 2 blocks) and the scores recomputed here, ranks counted in NumPy.
    model, variables = hub.load_pretrained(export_dir)
    subset = balanced_subset(DecodedSource(ShapesSource("val")), 24)
    val = [subset[i] for i in range(len(subset))]
    images = np.stack([resize_center_crop(e["image"], 40, 32, Image.BICUBIC) for e in val])
    labels = np.array([e["label"] for e in val])
    layers = hub.intermediate_layers(model, variables, images, 2)
    features = np.concatenate([np.asarray(x[:, 0], np.float64) for x in layers], axis=-1)
    scores = features @ kernel.astype(np.float64) + bias
    own = scores[np.arange(24), labels][:, None]
    # Classes within float32 noise of the true one may rank either side of it.
    eps = 1e-4 * max(1.0, np.abs(scores).max())
    surely_above, maybe_above = (scores > own + eps).sum(1), (scores > own - eps).sum(1) - 1
    for k, key in [(1, "top1"), (5, "top5")]:
        hits = results[key] * 24 / 100
        assert hits == pytest.approx(round(hits), abs=1e-9), key  # a whole number of images
        lo, hi = np.sum(maybe_above < k), np.sum(surely_above < k)
        assert hi - lo <= 1 and lo <= round(hits) <= hi, (key, results[key], lo, hi)

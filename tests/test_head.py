"""DINOHead against a PyTorch transcription of the reference's `DINOHead`, fed the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dino_jax import cpu
from dino_jax.models.head import DINOHead
from dino_jax.models.layers import STOCK

IN, HIDDEN, BOTTLENECK, OUT = 64, 128, 32, 256
B, N_CROPS = 4, 3


class TorchDINOHead(nn.Module):
    """facebookresearch/dino vision_transformer.py DINOHead, transcribed."""

    def __init__(self, in_dim, out_dim, use_bn, norm_last_layer, nlayers, hidden_dim, bottleneck):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck, out_dim, bias=False)
        )
        self.weight_g.data.fill_(1)
        if norm_last_layer:
            self.weight_g.requires_grad = False

    @property
    def weight_g(self) -> nn.Parameter:
        return self.last_layer.parametrizations.weight.original0  # (K, 1)

    @property
    def weight_v(self) -> nn.Parameter:
        return self.last_layer.parametrizations.weight.original1  # (K, bottleneck)

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.mlp.modules() if isinstance(m, nn.Linear)]

    def bns(self) -> list[nn.BatchNorm1d]:
        return [m for m in self.mlp.modules() if isinstance(m, nn.BatchNorm1d)]

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


def assert_close(actual, expected, rtol=1e-5):
    """Elementwise rtol, plus an atol of rtol x the array's scale for entries near zero."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def to_torch(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float32))


def perturbed_variables(variables, seed=0):
    """Init variables with BN affine params and weight_g moved off 1/0, so their wiring shows."""
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        name = path[-1].key
        if name in ("scale", "weight_g"):
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
        if name == "bias" and "bn_" in path[-2].key:
            return jnp.asarray(rng.normal(0.0, 0.1, x.shape), jnp.float32)
        return x

    return jax.tree_util.tree_map_with_path(perturb, variables)


def torch_head_like(head: DINOHead, params) -> TorchDINOHead:
    """The reference head with the same config, loaded with the flax `params`."""
    ref = TorchDINOHead(
        IN, head.out_dim, head.use_bn, head.norm_last_layer, head.nlayers, HIDDEN, BOTTLENECK
    )
    with torch.no_grad():
        for i, lin in enumerate(ref.linears()):
            lin.weight.copy_(to_torch(params[f"mlp_{i}"]["kernel"]).T)
            lin.bias.copy_(to_torch(params[f"mlp_{i}"]["bias"]))
        for i, bn in enumerate(ref.bns()):
            bn.weight.copy_(to_torch(params[f"bn_{i}"]["scale"]))
            bn.bias.copy_(to_torch(params[f"bn_{i}"]["bias"]))
        ref.weight_v.copy_(to_torch(params["last_layer"]["kernel_v"]).T)
        if "weight_g" in params["last_layer"]:
            ref.weight_g.copy_(to_torch(params["last_layer"]["weight_g"]).T)
    return ref


def make_head(**kwargs) -> DINOHead:
    return DINOHead(OUT, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK, **kwargs)


def init_head(head: DINOHead, seed: int = 0):
    return head.init(jax.random.key(seed), jnp.zeros((B, N_CROPS, IN)))


@pytest.mark.parametrize(
    "use_bn, norm_last_layer, nlayers",
    [
        (False, True, 3),
        (False, False, 3),
        (True, True, 3),
        (True, False, 3),
        (False, True, 1),
        (False, False, 1),
    ],
)
@pytest.mark.parametrize("layers", [STOCK, cpu.LAYERS], ids=["stock", "cpu"])
def test_matches_reference_outputs_stats_and_grads(use_bn, norm_last_layer, nlayers, layers):
    head = make_head(use_bn=use_bn, norm_last_layer=norm_last_layer, nlayers=nlayers, layers=layers)
    variables = perturbed_variables(init_head(head))
    params, stats = variables["params"], variables.get("batch_stats", {})
    ref = torch_head_like(head, params)
    x = np.random.default_rng(1).normal(size=(B, N_CROPS, IN)).astype(np.float32)
    cotangent = np.random.default_rng(2).normal(size=(B, N_CROPS, OUT)).astype(np.float32)

    def loss(params):
        out, updates = head.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(out * cotangent), (out, updates)

    grads, (out, updates) = jax.grad(loss, has_aux=True)(params)

    ref.train()
    ref_out = ref(to_torch(x).reshape(B * N_CROPS, IN))
    (ref_out * to_torch(cotangent).reshape(B * N_CROPS, OUT)).sum().backward()

    assert out.shape == (B, N_CROPS, OUT) and out.dtype == jnp.float32
    assert_close(out.reshape(B * N_CROPS, OUT), ref_out.detach())
    assert_close(grads["last_layer"]["kernel_v"], ref.weight_v.grad.T)
    for i, lin in enumerate(ref.linears()):
        assert_close(grads[f"mlp_{i}"]["kernel"], lin.weight.grad.T)
    # (Biases feeding a train-mode BN have a zero gradient, so only the last one is compared.)
    assert_close(grads[f"mlp_{nlayers - 1}"]["bias"], ref.linears()[-1].bias.grad)
    if not norm_last_layer:
        assert_close(grads["last_layer"]["weight_g"], ref.weight_g.grad.T)
    for i, bn in enumerate(ref.bns()):
        assert_close(updates["batch_stats"][f"bn_{i}"]["mean"], bn.running_mean)
        assert_close(updates["batch_stats"][f"bn_{i}"]["var"], bn.running_var)

    # Eval mode normalises with the running statistics just updated.
    ref.eval()
    with torch.no_grad():
        ref_eval = ref(to_torch(x).reshape(B * N_CROPS, IN))
    out_eval = head.apply({"params": params, **updates}, x, train=False)
    assert_close(out_eval.reshape(B * N_CROPS, OUT), ref_eval)


def test_norm_last_layer_fixes_g_at_one():
    head = make_head(norm_last_layer=True)
    variables = init_head(head)
    assert set(variables["params"]["last_layer"]) == {"kernel_v"}
    x = np.random.default_rng(0).normal(size=(B, N_CROPS, IN)).astype(np.float32)
    logits = head.apply(variables, x)
    # Unit-norm features against unit-norm columns: cosines.
    assert float(jnp.max(jnp.abs(logits))) <= 1.0 + 1e-6
    assert float(jnp.max(jnp.abs(logits))) > 0.2


def test_trainable_g_is_a_2d_parameter_of_ones():
    variables = init_head(make_head(norm_last_layer=False))
    weight_g = variables["params"]["last_layer"]["weight_g"]
    assert weight_g.shape == (1, OUT) and weight_g.dtype == jnp.float32
    np.testing.assert_array_equal(weight_g, np.ones((1, OUT)))


def test_init_statistics_match_the_reference_init():
    params = init_head(make_head(), seed=3)["params"]
    torch.manual_seed(0)
    ref = TorchDINOHead(IN, OUT, False, True, 3, HIDDEN, BOTTLENECK)
    for i, lin in enumerate(ref.linears()):
        kernel = np.asarray(params[f"mlp_{i}"]["kernel"])
        assert kernel.std() == pytest.approx(lin.weight.std().item(), rel=0.1)
        assert kernel.std() == pytest.approx(0.02, rel=0.1)
        np.testing.assert_array_equal(params[f"mlp_{i}"]["bias"], 0.0)
    v = np.asarray(params["last_layer"]["kernel_v"])
    ref_v = ref.weight_v.detach().numpy()
    bound = 1.0 / np.sqrt(BOTTLENECK)
    assert np.abs(ref_v).max() <= bound  # torch's default Linear init, kept by the reference
    assert np.abs(v).max() <= bound
    assert np.abs(v).max() > 0.95 * bound
    assert v.std() == pytest.approx(ref_v.std(), rel=0.1)


def test_bfloat16_returns_float32_close_to_float32():
    x = np.random.default_rng(0).normal(size=(B, N_CROPS, IN)).astype(np.float32)
    variables = init_head(make_head(use_bn=True))
    out32 = make_head(use_bn=True).apply(variables, x, train=True, mutable=["batch_stats"])[0]
    out16 = make_head(use_bn=True, dtype=jnp.bfloat16).apply(
        variables, x, train=True, mutable=["batch_stats"]
    )[0]
    assert out16.dtype == jnp.float32
    # Cosines in [-1, 1]; bf16 keeps ~3 significant digits through three matmuls.
    np.testing.assert_allclose(out16, out32, atol=2e-2)


def test_rejects_zero_layers():
    with pytest.raises(ValueError, match="nlayers=0"):
        init_head(make_head(nlayers=0))

"""A PyTorch re-implementation of DINOv2's DinoVisionTransformer, written from its behaviour
(facebookresearch/dinov2: dinov2/models/vision_transformer.py, dinov2/layers/*.py), with its
state-dict keys: the tests measure our DINOv2 ViT and its weight conversion against it."""

import math

import torch
from torch import nn as tnn
from torch.nn import functional as F
from torch_reference import PatchEmbed, TorchAttention, TorchMlp


class TorchLayerScale(tnn.Module):
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = tnn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class TorchSwiGLU(tnn.Module):
    """SwiGLUFFNFused: hidden = (int(2/3 * 4D) + 7) // 8 * 8; w12 rows are [w1; w2]."""

    def __init__(self, dim):
        super().__init__()
        hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8
        self.w12 = tnn.Linear(dim, 2 * hidden)
        self.w3 = tnn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class TorchBlockV2(tnn.Module):
    def __init__(self, dim, num_heads, layerscale, ffn_layer):
        super().__init__()
        self.norm1 = tnn.LayerNorm(dim, eps=1e-6)
        self.attn = TorchAttention(dim, num_heads)
        self.ls1 = TorchLayerScale(dim, layerscale) if layerscale else tnn.Identity()
        self.norm2 = tnn.LayerNorm(dim, eps=1e-6)
        self.mlp = TorchMlp(dim, 4 * dim) if ffn_layer == "mlp" else TorchSwiGLU(dim)
        self.ls2 = TorchLayerScale(dim, layerscale) if layerscale else tnn.Identity()

    def attn_residual(self, x):
        return self.ls1(self.attn(self.norm1(x))[0])

    def ffn_residual(self, x):
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x, branges=None):
        """Inference, or with branges (the two random sample subsets of one training forward)
        dinov2/layers/block.py: drop_add_residual_stochastic_depth on both branches."""
        if branges is None:
            x = x + self.attn_residual(x)
            return x + self.ffn_residual(x)
        for brange, residual in zip(branges, (self.attn_residual, self.ffn_residual), strict=True):
            scale = x.shape[0] / len(brange)
            flat = torch.index_add(
                x.flatten(1), 0, brange, residual(x[brange]).flatten(1), alpha=scale
            )
            x = flat.view_as(x)
        return x

    def attention(self, x):
        return self.attn(self.norm1(x))[1]


class TorchDinoViT(tnn.Module):
    def __init__(
        self,
        patch_size=14,
        embed_dim=384,
        depth=2,
        num_heads=6,
        img_size=518,
        layerscale=None,
        ffn_layer="mlp",
        num_register_tokens=0,
        interpolate_offset=0.1,
        interpolate_antialias=False,
    ):
        super().__init__()
        self.patch_size, self.num_register_tokens = patch_size, num_register_tokens
        self.interpolate_offset, self.interpolate_antialias = (
            interpolate_offset,
            interpolate_antialias,
        )
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = tnn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = tnn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        if num_register_tokens:
            self.register_tokens = tnn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.blocks = tnn.ModuleList(
            [TorchBlockV2(embed_dim, num_heads, layerscale, ffn_layer) for _ in range(depth)]
        )
        self.norm = tnn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = tnn.Parameter(torch.zeros(1, embed_dim))

    def interpolate_pos_encoding(self, x, w, h):
        npatch, N = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        patch_pos_embed, dim = self.pos_embed[:, 1:], x.shape[-1]
        w0, h0 = w // self.patch_size, h // self.patch_size
        M = int(math.sqrt(N))
        if self.interpolate_offset:
            kwargs = {
                "scale_factor": (
                    float(w0 + self.interpolate_offset) / M,
                    float(h0 + self.interpolate_offset) / M,
                )
            }
        else:
            kwargs = {"size": (w0, h0)}
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=self.interpolate_antialias,
            **kwargs,
        )
        assert (w0, h0) == patch_pos_embed.shape[-2:]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((self.pos_embed[:, :1], patch_pos_embed), dim=1)

    def prepare_tokens_with_masks(self, x, masks=None):
        _, _, w, h = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.num_register_tokens:
            registers = self.register_tokens.expand(x.shape[0], -1, -1)
            x = torch.cat((x[:, :1], registers, x[:, 1:]), dim=1)
        return x

    def forward_features(self, x, masks=None, branges=None):
        x = self.prepare_tokens_with_masks(x, masks)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if branges is None else branges[i])
        x_norm, r = self.norm(x), self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
        }

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i >= len(self.blocks) - n:
                outputs.append(tokens)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            B, _, w, h = x.shape
            outputs = [
                out.reshape(B, w // self.patch_size, h // self.patch_size, -1).permute(0, 3, 1, 2)
                for out in outputs
            ]
        if return_class_token:
            return tuple(zip(outputs, class_tokens, strict=True))
        return tuple(outputs)

    def get_last_selfattention(self, x):
        x = self.prepare_tokens_with_masks(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1].attention(x)

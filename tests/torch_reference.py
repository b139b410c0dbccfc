"""PyTorch re-implementations of the reference (facebookresearch/dino), written from its behaviour,
shared by the tests: the ViT, the DINO head with the reference's weight-norm key layout, the
multi-crop wrapper, and one training iteration of main_dino.py (loss, clipping, AdamW, EMAs)."""

import math
import types

import numpy as np
import torch
from torch import nn as tnn
from torch.nn import functional as F

# ---------------------------------------------------------------------------------------------
# PyTorch reference, written from facebookresearch/dino vision_transformer.py's behaviour.
# Runs in float64 so its numbers are the exact answer our float32 code is measured against.


class TorchAttention(tnn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = tnn.Linear(dim, dim * 3)
        self.proj = tnn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x), attn


class TorchMlp(tnn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = tnn.Linear(dim, hidden)
        self.act = tnn.GELU()
        self.fc2 = tnn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TorchBlock(tnn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = tnn.LayerNorm(dim, eps=1e-6)
        self.attn = TorchAttention(dim, num_heads)
        self.norm2 = tnn.LayerNorm(dim, eps=1e-6)
        self.mlp = TorchMlp(dim, 4 * dim)

    def forward(self, x, keep_attn=1.0, keep_mlp=1.0):
        """keep_* multiply the residual branches: 1 in eval, 0 or 1/keep_prob under DropPath."""
        y, attn = self.attn(self.norm1(x))
        x = x + keep_attn * y
        return x + keep_mlp * self.mlp(self.norm2(x)), attn


class PatchEmbed(tnn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = tnn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TorchViT(tnn.Module):
    def __init__(self, patch_size, embed_dim, depth, num_heads, img_size):
        super().__init__()
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = tnn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = tnn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.blocks = tnn.ModuleList([TorchBlock(embed_dim, num_heads) for _ in range(depth)])
        self.norm = tnn.LayerNorm(embed_dim, eps=1e-6)

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size + 0.1
        h0 = h // self.patch_embed.patch_size + 0.1
        side = int(math.sqrt(N))
        patch_pos_embed = tnn.functional.interpolate(
            patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
            mode="bicubic",
        )
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def prepare_tokens(self, x):
        B, _, w, h = x.shape  # as in the reference: "w" is the height (NCHW dim 2)
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        return x + self.interpolate_pos_encoding(x, w, h)

    def forward(self, x, keeps=None):
        x = self.prepare_tokens(x)
        for i, blk in enumerate(self.blocks):
            x, _ = blk(x, *(keeps[i] if keeps else (1.0, 1.0)))
        return self.norm(x)[:, 0]

    def get_last_selfattention(self, x):
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x, attn = blk(x)
        return attn

    def get_intermediate_layers(self, x, n=1):
        x = self.prepare_tokens(x)
        output = []
        for i, blk in enumerate(self.blocks):
            x, _ = blk(x)
            if len(self.blocks) - i <= n:
                output.append(self.norm(x))
        return output


# ---------------------------------------------------------------------------------------------
# The DINO head and the multi-crop wrapper (vision_transformer.py DINOHead, utils.py
# MultiCropWrapper). The last layer keeps the reference's `weight_g` / `weight_v` keys of
# torch.nn.utils.weight_norm.


class TorchWeightNormLinear(tnn.Module):
    """Bias-free Linear with weight = weight_g * weight_v / ||weight_v|| (norm per output row)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.weight_g = tnn.Parameter(torch.ones(out_dim, 1))
        self.weight_v = tnn.Parameter(torch.randn(out_dim, in_dim) / math.sqrt(in_dim))

    def forward(self, x):
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class TorchDINOHead(tnn.Module):
    def __init__(self, in_dim, out_dim, use_bn, norm_last_layer, nlayers, hidden_dim, bottleneck):
        super().__init__()
        if nlayers == 1:
            self.mlp = tnn.Linear(in_dim, bottleneck)
        else:
            layers = [tnn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(tnn.BatchNorm1d(hidden_dim))
            layers.append(tnn.GELU())
            for _ in range(nlayers - 2):
                layers.append(tnn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(tnn.BatchNorm1d(hidden_dim))
                layers.append(tnn.GELU())
            layers.append(tnn.Linear(hidden_dim, bottleneck))
            self.mlp = tnn.Sequential(*layers)
        self.last_layer = TorchWeightNormLinear(bottleneck, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class TorchMultiCrop(tnn.Module):
    """Consecutive crops of one resolution go through the backbone together, then all features
    through the head; crop-major output [n_crops * B, K]."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0)
        start, features = 0, []
        for end in ends:
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(features))


def randomize_(module, seed, *, keep_weight_g=False):
    """Every parameter and BatchNorm buffer drawn at random, away from trivial values (norm
    scales near 1, variances positive), so that a wrong layout or transpose cannot pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight_g"):
                if not keep_weight_g:
                    p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype))
            elif p.ndim == 1 and name.endswith("weight"):  # LayerNorm / BatchNorm scale
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen, dtype=b.dtype))
    return module


# ---------------------------------------------------------------------------------------------
# One iteration of main_dino.py's train_one_epoch, with utils.py's helpers.


def cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup=0.0):
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


class TorchDINOLoss(tnn.Module):
    def __init__(
        self,
        out_dim,
        ncrops,
        warmup_teacher_temp,
        teacher_temp,
        warmup_teacher_temp_epochs,
        nepochs,
        student_temp=0.1,
        center_momentum=0.9,
    ):
        super().__init__()
        self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
            )
        )

    def forward(self, student_output, teacher_output, epoch):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        self.update_center(teacher_output)
        return total_loss / n_loss_terms

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def get_params_groups(model):
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class ReferenceLARS(torch.optim.Optimizer):
    """The reference's utils.LARS (from Barlow Twins), written from its description."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0, g["eta"] * param_norm / update_norm, one),
                        one,
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def reference_optimizer(name, groups):
    """main_dino.py: train_dino's optimizer of `name` over the parameter groups."""
    if name == "adamw":
        return torch.optim.AdamW(groups)  # lr and wd are set by the schedules
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9)
    return ReferenceLARS(groups)


def clip_gradients(model, clip):
    for p in model.parameters():
        if p.grad is not None:
            clip_coef = clip / (p.grad.data.norm(2) + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


def main_dino_args(config):
    """main_dino.py's arguments that train_iteration reads, from a dino_jax config's sections."""
    optim = config.optim
    return types.SimpleNamespace(
        steps_per_epoch=config.train.OFFICIAL_EPOCH_LENGTH,
        batch_size=config.train.batch_size,
        **{k: optim[k] for k in ("lr", "min_lr", "epochs", "warmup_epochs", "clip_grad")},
        weight_decay=optim.weight_decay,
        weight_decay_end=optim.weight_decay_end,
        momentum_teacher=config.teacher.momentum_teacher,
        freeze_last_layer=optim.freeze_last_layer_epochs,
    )


def train_iteration(
    student,
    teacher,
    dino_loss,
    optimizer,
    crops,
    it,
    epoch,
    args,
    fp16_scaler=None,
    gradients=None,
):
    """main_dino.py's train_one_epoch body for iteration `it`; `crops` is crop-major NCHW.
    With `fp16_scaler` (a `torch.amp.GradScaler`), its `--use_fp16 true` path: forwards and loss
    under float16 autocast, the loss scaled, gradients unscaled before clipping.
    Returns the loss; student, teacher, optimizer and dino_loss.center are updated in place, and
    the dict `gradients`, if given, receives each parameter's gradient before clipping."""
    niter = args.steps_per_epoch
    lr = cosine_scheduler(
        args.lr * args.batch_size / 256.0, args.min_lr, args.epochs, niter, args.warmup_epochs
    )
    wd = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter)
    momentum = cosine_scheduler(args.momentum_teacher, 1, args.epochs, niter)
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr[it]
        if i == 0:
            group["weight_decay"] = wd[it]
    device = crops[0].device.type
    with torch.autocast(device, dtype=torch.float16, enabled=fp16_scaler is not None):
        teacher_output = teacher(crops[:2])
        loss = dino_loss(student(crops), teacher_output, epoch)
    optimizer.zero_grad()
    if fp16_scaler is None:
        loss.backward()
        if gradients is not None:
            gradients.update(
                {
                    k: p.grad.detach().clone()
                    for k, p in student.named_parameters()
                    if p.grad is not None
                }
            )
        if args.clip_grad:
            clip_gradients(student, args.clip_grad)
        cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
        optimizer.step()
    else:
        fp16_scaler.scale(loss).backward()
        if args.clip_grad:
            fp16_scaler.unscale_(optimizer)
            clip_gradients(student, args.clip_grad)
        cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
        fp16_scaler.step(optimizer)
        fp16_scaler.update()
    with torch.no_grad():
        m = momentum[it]
        for param_q, param_k in zip(student.parameters(), teacher.parameters(), strict=True):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
    return loss.item()


def save_release_vit(path, *, patch_size=16, embed_dim=384, depth=2, num_heads=6, seed=0):
    """A randomly initialised reference ViT saved like the release files (a flat float32 state
    dict, img_size 224); returns the float64 twin for reference outputs."""
    model = randomize_(TorchViT(patch_size, embed_dim, depth, num_heads, img_size=224), seed)
    torch.save(model.state_dict(), path)
    return model.double().eval()


# ---------------------------------------------------------------------------------------------
# The same iteration timed in float32: the baseline that BENCHMARKS.md sets beside
# `python -m dino_jax.benchmark step` (ViT-S/16, out_dim 65536, 2x224 + 8x96 crops).


# The network and crop sizes of the timed iteration: ViT-S/16 with the reference's head, and the
# sizes of the `:smoke` config variant (dino_jax/core/config.py `smoke`), for checking the plumbing.
VIT_S16 = dict(
    embed_dim=384, depth=12, num_heads=6, out_dim=65536, hidden_dim=2048, bottleneck_dim=256,
    global_size=224, local_size=96,
)  # fmt: skip
SMOKE = dict(
    embed_dim=64, depth=2, num_heads=4, out_dim=256, hidden_dim=256, bottleneck_dim=64,
    global_size=32, local_size=16,
)  # fmt: skip


def make_iteration(batch_size=8, local_crops=8, device="cpu", fp16=False, shapes=VIT_S16):
    """main_dino.py's iteration for ViT-S/16 (or `shapes`) on random crops, on `device`, in
    float32 or, with `fp16`, its mixed-precision path (`--use_fp16 true`): a callable that runs
    the next one."""
    import itertools
    import types

    k = shapes["out_dim"]

    def model():
        head = TorchDINOHead(
            shapes["embed_dim"], k, False, True, 3, shapes["hidden_dim"], shapes["bottleneck_dim"]
        )
        vit = TorchViT(
            16, shapes["embed_dim"], shapes["depth"], shapes["num_heads"], shapes["global_size"]
        )
        return TorchMultiCrop(vit, head).to(device)

    torch.backends.cudnn.benchmark = True  # as main_dino.py
    student, teacher = model(), model()
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    ncrops = 2 + local_crops
    dino_loss = TorchDINOLoss(k, ncrops, 0.04, 0.04, 0, 100).to(device)
    optimizer = torch.optim.AdamW(get_params_groups(student))
    scaler = torch.amp.GradScaler(torch.device(device).type) if fp16 else None
    args = types.SimpleNamespace(
        steps_per_epoch=1000, lr=5e-4, batch_size=batch_size, min_lr=1e-6, epochs=100,
        warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996,
        clip_grad=3.0, freeze_last_layer=1,
    )  # fmt: skip
    sizes = [shapes["global_size"]] * 2 + [shapes["local_size"]] * local_crops
    crops = [torch.randn(batch_size, 3, s, s, device=device) for s in sizes]
    counter = itertools.count()

    def iteration():
        # loss.item() at its end waits for the device
        it = next(counter)
        return train_iteration(student, teacher, dino_loss, optimizer, crops, it, 1, args, scaler)

    return iteration


def time_beside_jax(steps=5, warmup=1, batch_size=8, local_crops=8):
    """(reference s, ours s): medians of the reference's iteration and our jitted step (the same
    ViT-S/16 shapes, float32, CPU) run in turn in this one process, so both see the same minutes.
    A second's pause after each lets the other's idle threads go to sleep first."""
    import time

    from dino_jax.core.config import load_config
    from dino_jax.tools import step_benchmark

    config = load_config("configs/vit_small16.py")
    config.train.batch_size, config.crops.local_crops_number = batch_size, local_crops
    config.compute.dtype = "float32"
    ours = step_benchmark.prepare_step(config)
    reference = make_iteration(batch_size, local_crops)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        reference()
        middle = time.perf_counter()
        time.sleep(1.0)
        ours.run(timed=i >= warmup)
        time.sleep(1.0)
        if i >= warmup:
            times.append(middle - start)
            round_s = f"reference {times[-1]:.3f} s, ours {ours.times[-1]:.3f} s"
            print(f"round {i - warmup + 1}: {round_s}", flush=True)
    return float(np.median(times)), float(np.median(ours.times))


def time_on_device(args):
    """`args`' iteration timed on its device -> the figures `main` prints and writes as JSON.

    The first warm-up iteration (or one more when there is none) runs under PyTorch's FLOP
    counter (matmuls and convolutions, forward and backward), which slows it down; the timed
    ones wait for the device before starting and before stopping the clock."""
    import time

    from torch.utils.flop_counter import FlopCounterMode

    cuda = args.device.startswith("cuda")
    shapes = SMOKE if args.smoke else VIT_S16
    iteration = make_iteration(args.batch_size, args.local_crops, args.device, args.fp16, shapes)
    with FlopCounterMode(display=False) as counter:
        iteration()
    times = []
    for i in range(max(args.warmup - 1, 0) + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        iteration()
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup - 1:
            times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    sizes = f"2x{shapes['global_size']}" + (
        f" + {args.local_crops}x{shapes['local_size']}" if args.local_crops else ""
    )
    device = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    return {
        "device": device,
        "torch": torch.__version__,
        "precision": "float16 autocast + GradScaler" if args.fp16 else "float32",
        "model": f"vit/16 {shapes['embed_dim']}x{shapes['depth']}, K={shapes['out_dim']}",
        "batch_size": args.batch_size,
        "crops": sizes,
        "steps": args.steps,
        "warmup": args.warmup,
        "step_s": step_s,
        "images_per_s": args.batch_size / step_s,
        "flops": float(counter.get_total_flops()),
        "flops_source": "torch.utils.flop_counter",
        # Like JAX's peak_bytes_in_use: tensors' bytes, not the allocator's cached blocks.
        "peak_memory_bytes": float(torch.cuda.max_memory_allocated()) if cuda else None,
    }


def main(argv=None):
    import argparse
    import json

    parser = argparse.ArgumentParser(
        description="Time main_dino.py's iteration (ViT-S/16, out_dim 65536) on random crops."
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--fp16", action="store_true", help="main_dino.py --use_fp16 true")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the `:smoke` config's sizes (64-wide, 2 blocks, K=256, 32/16 crops): a quick check",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument(
        "--beside-jax",
        action="store_true",
        help="CPU: alternate with our jitted step in this process, and print both and the ratio",
    )
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: this PyTorch sees no CUDA device")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.beside_jax:
        from dino_jax.cpu import host_memory

        host_memory.reuse_freed_memory()  # as our commands do, before any thread starts
        reference_s, ours_s = time_beside_jax(
            args.steps, args.warmup, args.batch_size, args.local_crops
        )
        threads = torch.get_num_threads()
        print(f"reference iteration (PyTorch {torch.__version__}, {threads} threads, float32):")
        print(f"  {reference_s:.3f} s per step, {args.batch_size / reference_s:.2f} images/s")
        print(f"dino_jax step: {ours_s:.3f} s per step, {args.batch_size / ours_s:.2f} images/s")
        print(f"dino_jax against the reference: {reference_s / ours_s:.3f}x")
        return
    r = time_on_device(args)
    print(f"reference iteration (PyTorch {r['torch']}, {r['device']}, {r['precision']}):")
    print(f"{r['model']}, batch {r['batch_size']}, {r['crops']}")
    print(f"{r['step_s']:.3f} s per step, {r['images_per_s']:.2f} images/s")
    tflops = r["flops"] / r["step_s"] / 1e12
    print(f"{r['flops'] / 1e9:.1f} GFLOP per step ({r['flops_source']}), {tflops:.3f} TFLOP/s")
    if r["peak_memory_bytes"] is not None:
        gib = r["peak_memory_bytes"] / 2**30
        print(f"peak memory {gib:.2f} GiB (torch.cuda.max_memory_allocated)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()

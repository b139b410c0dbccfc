"""One DINOv2 training iteration in PyTorch, written from the official behaviour
(facebookresearch/dinov2: train/ssl_meta_arch.py, train/train.py, loss/*.py, layers/dino_head.py,
utils/param_groups.py, data/collate.py), with W ranks (GPUs) emulated in one process: the
reference the JAX DINOv2 step is measured against. float32 on the CPU, like the official's
float32 path; no stochastic depth (drop_path_rate 0)."""

import numpy as np
import torch
from torch import nn as tnn
from torch.nn import functional as F
from torch_dinov2 import TorchDinoViT

# ---------------------------------------------------------------------------------------------
# dinov2/layers/dino_head.py: DINOHead. The last layer is torch.nn.utils.weight_norm's
# (`weight_g` [out, 1] trainable, `weight_v` [out, in]; weight = v * (g / ||v||) per row).


class TorchWeightNormLinearV2(tnn.Module):
    """Bias-free Linear under the legacy weight_norm hook (dim 0), same keys and arithmetic."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.weight_g = tnn.Parameter(torch.ones(out_dim, 1))
        self.weight_v = tnn.Parameter(torch.zeros(out_dim, in_dim))

    def forward(self, x):
        return F.linear(x, torch._weight_norm(self.weight_v, self.weight_g, 0))


class TorchDINOv2Head(tnn.Module):
    """mlp (Linear-GELU-...-Linear to the bottleneck), L2 normalisation, weight-normed layer."""

    def __init__(self, in_dim, n_prototypes, hidden_dim=2048, bottleneck_dim=256, nlayers=3):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = tnn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [tnn.Linear(in_dim, hidden_dim), tnn.GELU()]
            for _ in range(nlayers - 2):
                layers += [tnn.Linear(hidden_dim, hidden_dim), tnn.GELU()]
            layers.append(tnn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = tnn.Sequential(*layers)
        self.last_layer = TorchWeightNormLinearV2(bottleneck_dim, n_prototypes)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12)
        return self.last_layer(x)


def build_modules(cfg, state):
    """The SSLMetaArch student or teacher ModuleDict, loaded strictly from a numpy state dict."""
    do_ibot = cfg["ibot_loss_weight"] > 0
    backbone = TorchDinoViT(**cfg["vit"])
    dim = backbone.cls_token.shape[-1]
    modules = {"backbone": backbone, "dino_head": TorchDINOv2Head(dim, **cfg["head"])}
    if do_ibot and cfg["separate_head"]:
        modules["ibot_head"] = TorchDINOv2Head(dim, **cfg["ibot_head"])
    modules = tnn.ModuleDict(modules)
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}
    modules.load_state_dict(tensors, strict=True)
    return modules


# ---------------------------------------------------------------------------------------------
# dinov2/data/collate.py: collate_data_and_cast's mask outputs, per rank.


def collate_masks(masks):
    masks = torch.as_tensor(np.asarray(masks, dtype=bool))
    mask_indices_list = masks.flatten().nonzero().flatten()
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    n_masked_patches = torch.full((1,), mask_indices_list.shape[0], dtype=torch.long)
    return masks, mask_indices_list, masks_weight, n_masked_patches


# ---------------------------------------------------------------------------------------------
# dinov2/loss: the losses and the teacher's target distributions, cross-rank sums emulated.


def all_reduce(tensors):
    """torch.distributed.all_reduce (SUM) of one tensor per rank, in rank order."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total += t
    return total


def softmax_center_teacher(teacher_output, center, teacher_temp):
    """DINOLoss / iBOTPatchLoss.softmax_center_teacher, the lazy center update already applied."""
    return F.softmax((teacher_output - center) / teacher_temp, dim=-1)


def sinkhorn_knopp_teacher(outputs, teacher_temp, n_samples, n_iterations=3):
    """DINOLoss / iBOTPatchLoss.sinkhorn_knopp_teacher over the W ranks' outputs (one [B_r, K]
    tensor each); `n_samples` is B (2b·W for DINO, the all-reduced masked count for iBOT)."""
    qs = [torch.exp(t.float() / teacher_temp).t() for t in outputs]  # K x B_r, no max shift
    K = qs[0].shape[0]
    sum_q = all_reduce([torch.sum(q) for q in qs])
    for q in qs:
        q /= sum_q
    for _ in range(n_iterations):
        sum_of_rows = all_reduce([torch.sum(q, dim=1, keepdim=True) for q in qs])
        for q in qs:
            q /= sum_of_rows
            q /= K
            q /= torch.sum(q, dim=0, keepdim=True)
            q /= n_samples
    for q in qs:
        q *= n_samples
    return [q.t() for q in qs]


def dino_loss(student_output_list, teacher_out_softmaxed_centered_list, student_temp):
    """DINOLoss.forward: -Σ over (student, teacher) pairs of the batch-mean cross-entropy."""
    total_loss = 0
    for s in student_output_list:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teacher_out_softmaxed_centered_list:
            total_loss -= torch.sum(t * lsm, dim=-1).mean()
    return total_loss


def ibot_forward_masked(s, t, masks, n_masked_patches, masks_weight, student_temp):
    """iBOTPatchLoss.forward_masked (lossfunc: Σ_k t · log_softmax(s / temp))."""
    loss = torch.sum(t.float() * F.log_softmax(s.float() / student_temp, dim=-1), dim=-1)
    loss = loss[:n_masked_patches] * masks_weight
    return -loss.sum() / masks.shape[0]


def koleo_loss(student_output, eps=1e-8):
    """KoLeoLoss.forward: -mean log of each L2-normalised row's nearest-neighbour distance."""
    x = F.normalize(student_output, eps=eps, p=2, dim=-1)
    dots = torch.mm(x, x.t())
    n = x.shape[0]
    dots.view(-1)[:: (n + 1)].fill_(-1)  # the diagonal
    _, nearest = torch.max(dots, dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


# ---------------------------------------------------------------------------------------------
# dinov2/utils/param_groups.py: get_params_groups_with_decay (per student submodule).


def get_vit_lr_decay_rate(name, lr_decay_rate, num_layers, force_is_backbone):
    layer_id = num_layers + 1
    if name.startswith("backbone") or force_is_backbone:
        tokens = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
        if any(t in name for t in tokens):
            layer_id = 0
        elif "blocks." in name and "residual." not in name:
            # official names are blocks.{chunk}.{i} (block_chunks) or blocks.{i}: i is global
            layer_id = int(name[name.find("blocks.") :].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def get_params_groups_with_decay(module, lr_decay_rate, patch_embed_lr_mult):
    n_blocks = len(module.blocks) if hasattr(module, "blocks") else 0  # heads: 0
    groups = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        d = {
            "params": [param],
            "name": name,
            "is_last_layer": "last_layer" in name,
            "lr_multiplier": get_vit_lr_decay_rate(
                name, lr_decay_rate, n_blocks, force_is_backbone=n_blocks > 0
            ),
            "wd_multiplier": 1.0,
        }
        if name.endswith(".bias") or "norm" in name or "gamma" in name:
            d["wd_multiplier"] = 0.0
        if "patch_embed" in name:
            d["lr_multiplier"] *= patch_embed_lr_mult
        groups.append(d)
    return groups


# ---------------------------------------------------------------------------------------------
# SSLMetaArch.forward_backward, one rank at a time.


def teacher_outputs(teacher, rank, cfg, do_ibot):
    """get_teacher_output up to the heads: the (swapped) cls outputs through dino_head, the masked
    patch outputs through the iBOT head (dino_head with the cls tokens when shared)."""
    gc = rank["global_crops"]
    _, mask_indices_list, _, _ = rank["collated"]
    n_masked = mask_indices_list.shape[0]
    upperbound = rank.get("upperbound", n_masked)
    out = teacher["backbone"].forward_features(gc)
    cls0, cls1 = out["x_norm_clstoken"].chunk(2)
    cls = torch.cat((cls1, cls0))  # crop 1 first: the targets of student crop 0, and back
    patches = out["x_norm_patchtokens"]
    n_cls, dim = cls.shape
    if do_ibot and not cfg["separate_head"]:
        buffer = patches.new_zeros(upperbound + n_cls, dim)
        buffer[:n_cls] = cls
        buffer[n_cls : n_cls + n_masked] = patches.flatten(0, 1)[mask_indices_list]
        after_head = teacher["dino_head"](buffer)
        return after_head[:n_cls], after_head[n_cls : n_cls + n_masked]
    if do_ibot:
        buffer = patches.new_zeros(upperbound, dim)
        buffer[:n_masked] = patches.flatten(0, 1)[mask_indices_list]
        return teacher["dino_head"](cls), teacher["ibot_head"](buffer)[:n_masked]
    return teacher["dino_head"](cls), None


def teacher_targets(teacher, ranks, centers, cfg, do_dino, do_ibot):
    """The softmaxed-centered targets of every rank and the centers after the iteration."""
    W, temp, m = len(ranks), cfg["teacher_temp"], cfg.get("center_momentum", 0.9)
    with torch.no_grad():
        outs = [teacher_outputs(teacher, r, cfg, do_ibot) for r in ranks]
        dino_c = torch.from_numpy(np.array(centers["dino"], dtype=np.float32))
        ibot_c = torch.from_numpy(np.array(centers["ibot"], dtype=np.float32))
        new_dino_c, new_ibot_c = dino_c.clone(), ibot_c.clone()
        if cfg["centering"] == "centering":
            dino_t = [softmax_center_teacher(c, dino_c, temp) for c, _ in outs]
            # DINOLoss.reduce_center_update / apply_center_update (applied next iteration)
            batch = all_reduce([torch.sum(c, dim=0, keepdim=True) for c, _ in outs])
            batch = batch / (len(outs[0][0]) * W)
            new_dino_c = dino_c * m + batch * (1 - m)
            ibot_t = [None] * W
            if do_ibot:
                ibot_t = [
                    softmax_center_teacher(p.unsqueeze(0), ibot_c, temp).squeeze(0) for _, p in outs
                ]
                # iBOTPatchLoss: the per-rank mean over masked patches, all-reduced, / (1 * W)
                batch = all_reduce(
                    [torch.sum(p.unsqueeze(0).mean(1), dim=0, keepdim=True) for _, p in outs]
                )
                batch = batch / (1 * W)
                new_ibot_c = ibot_c * m + batch * (1 - m)
        elif cfg["centering"] == "sinkhorn_knopp":
            dino_t = sinkhorn_knopp_teacher([c for c, _ in outs], temp, outs[0][0].shape[0] * W)
            ibot_t = [None] * W
            if do_ibot:
                n_total = all_reduce([r["collated"][3] for r in ranks])
                ibot_t = sinkhorn_knopp_teacher([p for _, p in outs], temp, n_total)
        else:
            raise NotImplementedError(cfg["centering"])
    if not do_dino:
        dino_t = [None] * W
    return dino_t, ibot_t, new_dino_c, new_ibot_c


def student_losses(student, rank, dino_t, ibot_t, cfg, do_dino, do_ibot):
    """forward_backward's student side: (loss_accumulator, loss_dict) of one rank."""
    n_global_crops, n_local_crops = 2, cfg["n_local"]
    masks, mask_indices_list, masks_weight, _ = rank["collated"]
    n_masked = mask_indices_list.shape[0]
    upperbound = rank.get("upperbound", n_masked)
    temp = cfg.get("student_temp", 0.1)
    n_local_crops_loss_terms = max(n_local_crops * n_global_crops, 1)
    n_global_crops_loss_terms = (n_global_crops - 1) * n_global_crops
    n_terms = n_global_crops_loss_terms + n_local_crops_loss_terms
    ibot_loss_scale = 1.0 / n_global_crops

    # backbone on [global crops with masks, local crops] (forward_features_list)
    g_out = student["backbone"].forward_features(rank["global_crops"], masks)
    g_cls = g_out["x_norm_clstoken"]
    inputs = [g_cls]
    if n_local_crops > 0:
        inputs.insert(
            0, student["backbone"].forward_features(rank["local_crops"])["x_norm_clstoken"]
        )
    if do_ibot:
        patches = g_out["x_norm_patchtokens"]
        buffer = torch.cat(
            (
                patches.flatten(0, 1)[mask_indices_list],
                patches.new_zeros(upperbound - n_masked, patches.shape[-1]),
            )
        )
        if cfg["separate_head"]:
            s_ibot = student["ibot_head"](buffer)[:n_masked]
        else:
            inputs.append(buffer)
    # one dino_head pass over the concatenation (fmha.BlockDiagonalMask.from_tensor_list / split)
    outputs = student["dino_head"](torch.cat(inputs)).split([len(x) for x in inputs])
    outputs = list(outputs)
    s_local = outputs.pop(0) if n_local_crops > 0 else None
    s_global = outputs.pop(0)
    if do_ibot and not cfg["separate_head"]:
        s_ibot = outputs.pop(0)[:n_masked]

    loss_dict, loss_accumulator = {}, 0
    if do_dino:
        t_list = dino_t.view(n_global_crops, -1, dino_t.shape[-1])
        if n_local_crops > 0:
            local = dino_loss(s_local.chunk(n_local_crops), t_list, temp) / n_terms
            loss_dict["dino_local_crops_loss"] = local
            loss_accumulator += cfg["dino_loss_weight"] * local
        loss_scales = 2  # the two global crops are processed together
        glob = dino_loss([s_global], [t_list.flatten(0, 1)], temp) * loss_scales / n_terms
        loss_dict["dino_global_crops_loss"] = glob
        loss_accumulator += cfg["dino_loss_weight"] * glob
        if cfg["koleo_loss_weight"] > 0:
            # per rank, per crop chunk: no KoLeo between the two crops of an image
            koleo = cfg["koleo_loss_weight"] * sum(koleo_loss(p) for p in g_cls.chunk(2))
            loss_accumulator += koleo
            loss_dict["koleo_loss"] = koleo / loss_scales
    if do_ibot:
        loss_scales = 2
        ibot = ibot_forward_masked(s_ibot, ibot_t, masks, n_masked, masks_weight, temp)
        ibot = ibot * loss_scales * ibot_loss_scale
        loss_dict["ibot_loss"] = ibot / 2
        loss_accumulator += cfg["ibot_loss_weight"] * ibot
    return loss_accumulator, loss_dict


# ---------------------------------------------------------------------------------------------
# The iteration: forward_backward on every rank, then train.py's clip, AdamW step and
# SSLMetaArch.update_teacher.


def _numpy(modules):
    return {k: v.detach().numpy().copy() for k, v in modules.state_dict().items()}


def dinov2_iteration(
    student: dict[str, np.ndarray],
    teacher: dict[str, np.ndarray],
    centers: dict[str, np.ndarray],
    ranks: list[dict],
    cfg: dict,
) -> dict:
    """One official DINOv2 iteration over W = len(ranks) emulated ranks; see the module doc."""
    do_dino = cfg["dino_loss_weight"] > 0
    do_ibot = cfg["ibot_loss_weight"] > 0
    assert do_dino or do_ibot, "the official builds no head without a DINO or iBOT loss"
    W = len(ranks)
    s_mod, t_mod = build_modules(cfg, student), build_modules(cfg, teacher)
    for p in t_mod.parameters():
        p.requires_grad = False
    ranks = [
        {
            **r,
            "global_crops": torch.from_numpy(np.array(r["global_crops"], dtype=np.float32)),
            "local_crops": torch.from_numpy(np.array(r["local_crops"], dtype=np.float32)),
            "collated": collate_masks(r["masks"]),
        }
        for r in ranks
    ]

    dino_t, ibot_t, new_dino_c, new_ibot_c = teacher_targets(
        t_mod, ranks, centers, cfg, do_dino, do_ibot
    )

    # forward_backward per rank; FSDP averages the ranks' gradients
    params = dict(s_mod.named_parameters())
    summed = {k: torch.zeros_like(p) for k, p in params.items()}
    accumulators, loss_dicts = [], []
    for r, rank in enumerate(ranks):
        acc, loss_dict = student_losses(s_mod, rank, dino_t[r], ibot_t[r], cfg, do_dino, do_ibot)
        grads = torch.autograd.grad(acc, list(params.values()), allow_unused=True)
        for k, g in zip(params, grads, strict=True):
            if g is not None:
                summed[k] += g
        accumulators.append(acc.detach())
        loss_dicts.append({k: v.detach() for k, v in loss_dict.items()})
    for k, p in params.items():
        p.grad = summed[k] / W
    grads_out = {k: p.grad.numpy().copy() for k, p in params.items()}

    # train.py: loss_dict all-reduced, .item() / world size
    losses = {k: all_reduce([d[k] for d in loss_dicts]).item() / W for k in loss_dicts[0]}
    losses["total"] = all_reduce(accumulators).item() / W

    # train.py do_train: apply_optim_scheduler, clip per student submodule, AdamW step
    groups = []
    for sub in s_mod.values():
        groups += get_params_groups_with_decay(
            sub, cfg["layerwise_decay"], cfg["patch_embed_lr_mult"]
        )
    for g in groups:
        g["weight_decay"] = cfg["wd"] * g["wd_multiplier"]
        g["lr"] = (cfg["last_layer_lr"] if g["is_last_layer"] else cfg["lr"]) * g["lr_multiplier"]
        g["foreach"] = True
    optimizer = torch.optim.AdamW(groups, betas=tuple(cfg["adamw_betas"]), eps=1e-8)
    clip_norms = {}
    for name, sub in s_mod.items():
        if cfg["clip_grad"]:
            norm = torch.nn.utils.clip_grad_norm_(sub.parameters(), cfg["clip_grad"])
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in sub.parameters()])
            )
        clip_norms[name] = float(norm)
    optimizer.step()

    # SSLMetaArch.update_teacher: teacher = m * teacher + (1 - m) * student, every parameter
    m = cfg["momentum"]
    with torch.no_grad():
        s_list, t_list = [], []
        for k in s_mod.keys():
            s_list += list(s_mod[k].parameters())
            t_list += list(t_mod[k].parameters())
        torch._foreach_mul_(t_list, m)
        torch._foreach_add_(t_list, s_list, alpha=1 - m)

    return {
        "losses": losses,
        "grads": grads_out,
        "clip_norms": clip_norms,
        "student": _numpy(s_mod),
        "teacher": _numpy(t_mod),
        "centers": {"dino": new_dino_c.numpy(), "ibot": new_ibot_c.numpy()},
        "teacher_targets": [
            {
                "dino": None if dino_t[r] is None else dino_t[r].numpy(),
                "ibot": None if ibot_t[r] is None else ibot_t[r].numpy(),
            }
            for r in range(W)
        ],
    }


# ---------------------------------------------------------------------------------------------
# Self-check: finite losses and the invariants of the cross-rank emulation.


def tiny_setup(mode, separate, seed=0, koleo=0.1):
    """Random tiny weights and config; `mode` is the centering."""
    from torch_reference import randomize_

    vit = dict(
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        img_size=16,
        layerscale=1e-5,
        ffn_layer="mlp",
        num_register_tokens=1,
    )
    head = dict(n_prototypes=64, hidden_dim=48, bottleneck_dim=16, nlayers=3)
    cfg = dict(
        vit=vit,
        head=head,
        ibot_head=dict(head, n_prototypes=40),
        separate_head=separate,
        centering=mode,
        n_local=2,
        dino_loss_weight=1.0,
        koleo_loss_weight=koleo,
        ibot_loss_weight=1.0,
        student_temp=0.1,
        teacher_temp=0.07,
        center_momentum=0.9,
        lr=1e-3,
        last_layer_lr=5e-4,
        wd=0.04,
        momentum=0.992,
        layerwise_decay=0.9,
        patch_embed_lr_mult=0.2,
        clip_grad=3.0,
        adamw_betas=(0.9, 0.999),
    )
    states = [_numpy(randomize_(build_empty(cfg), s)) for s in (seed, seed + 1)]
    rng = np.random.default_rng(seed)
    centers = {
        "dino": (0.1 * rng.standard_normal((1, 64))).astype(np.float32),
        "ibot": (0.1 * rng.standard_normal((1, 1, 64 if not separate else 40))).astype(np.float32),
    }
    return cfg, states[0], states[1], centers


def build_empty(cfg):
    backbone = TorchDinoViT(**cfg["vit"])
    dim = backbone.cls_token.shape[-1]
    modules = {"backbone": backbone, "dino_head": TorchDINOv2Head(dim, **cfg["head"])}
    if cfg["ibot_loss_weight"] > 0 and cfg["separate_head"]:
        modules["ibot_head"] = TorchDINOv2Head(dim, **cfg["ibot_head"])
    return tnn.ModuleDict(modules)


def random_rank(rng, b=2, n_local=2, size=16, local=8, patch=4):
    n = (size // patch) ** 2
    masks = np.zeros((2 * b, n), bool)
    for i in range(0, 2 * b, 2):  # half of the global crops masked, a few patches each
        masks[i, rng.choice(n, size=int(rng.integers(2, 6)), replace=False)] = True
    masks = masks[rng.permutation(2 * b)]
    return {
        "global_crops": rng.standard_normal((2 * b, 3, size, size)).astype(np.float32),
        "local_crops": rng.standard_normal((n_local * b, 3, local, local)).astype(np.float32),
        "masks": masks,
    }


def merge_ranks(ranks, n_local):
    """The W ranks' batches as one rank's, crop-major (crop c of every rank's images)."""

    def crop_major(key, n_crops):
        chunks = [np.split(np.asarray(r[key]), n_crops) for r in ranks]
        return np.concatenate([c[i] for i in range(n_crops) for c in chunks])

    return {
        "global_crops": crop_major("global_crops", 2),
        "local_crops": crop_major("local_crops", n_local),
        "masks": crop_major("masks", 2),
    }


def assert_close(got, want, rtol=2e-5, name=""):
    want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
    scale = np.sqrt(np.mean(want**2)) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale + 1e-12, err_msg=name)


def assert_results_close(a, b, rtol=2e-5, keys=("losses", "grads", "student", "teacher")):
    for key in keys:
        for k in a[key]:
            assert_close(a[key][k], b[key][k], rtol, f"{key}/{k}")


def self_check():
    rng = np.random.default_rng(0)
    for mode, separate in (
        ("centering", False),
        ("sinkhorn_knopp", False),
        ("sinkhorn_knopp", True),
    ):
        cfg, student, teacher, centers = tiny_setup(mode, separate)
        ranks = [random_rank(rng) for _ in range(2)]
        out = dinov2_iteration(student, teacher, centers, ranks, cfg)
        losses = out["losses"]
        assert all(np.isfinite(v) for v in losses.values()), losses
        assert set(losses) == {
            "dino_local_crops_loss",
            "dino_global_crops_loss",
            "koleo_loss",
            "ibot_loss",
            "total",
        }
        displayed = (
            losses["dino_local_crops_loss"]
            + losses["dino_global_crops_loss"]
            + 2 * losses["koleo_loss"]
            + 2 * losses["ibot_loss"]
        )
        assert_close(losses["total"], displayed, name="total")
        assert set(out["clip_norms"]) == {"backbone", "dino_head"} | (
            {"ibot_head"} if separate else set()
        )
        for t in out["teacher_targets"]:
            assert_close(t["dino"].sum(-1), np.ones(len(t["dino"])), 1e-5, "dino rows")
            assert_close(t["ibot"].sum(-1), np.ones(len(t["ibot"])), 1e-5, "ibot rows")
        if mode == "sinkhorn_knopp":
            assert all(np.array_equal(out["centers"][k], centers[k]) for k in centers)

        # identical data on both ranks: W=2 is W=1
        one = dinov2_iteration(student, teacher, centers, ranks[:1], cfg)
        two = dinov2_iteration(student, teacher, centers, [ranks[0], ranks[0]], cfg)
        assert_results_close(two, one)
        for k in centers:
            assert_close(two["centers"][k], one["centers"][k], name=k)
        assert_close(two["clip_norms"]["backbone"], one["clip_norms"]["backbone"])

        # without KoLeo (per rank), W ranks are one rank holding all their images
        cfg0 = dict(cfg, koleo_loss_weight=0.0)
        split = dinov2_iteration(student, teacher, centers, ranks, cfg0)
        merged = dinov2_iteration(student, teacher, centers, [merge_ranks(ranks, 2)], cfg0)
        assert "koleo_loss" not in split["losses"]
        assert_results_close(split, merged, rtol=1e-4)
        # (the iBOT center is a mean of per-rank means: equal only with equal masked counts)
        assert_close(split["centers"]["dino"], merged["centers"]["dino"], 1e-5, "dino center")
        want = merged["teacher_targets"][0]["dino"].reshape(2, 2, 2, -1)  # crop, rank, image
        for r in range(2):
            got = split["teacher_targets"][r]["dino"].reshape(2, 2, -1)
            assert_close(got, want[:, r], 1e-4, "dino targets")

        # centering: no cross-rank coupling in the losses, so gradients are per-rank means
        if mode == "centering":
            per_rank = [dinov2_iteration(student, teacher, centers, [r], cfg) for r in ranks]
            for k in out["grads"]:
                mean = (per_rank[0]["grads"][k] + per_rank[1]["grads"][k]) / 2
                assert_close(out["grads"][k], mean, 1e-4, k)
            for k in centers:
                mean = (per_rank[0]["centers"][k] + per_rank[1]["centers"][k]) / 2
                assert_close(out["centers"][k], mean, 1e-5, k)

        # param groups: layer-wise decay, patch_embed multiplier, heads at 1
        groups = {
            g["name"]: g
            for g in get_params_groups_with_decay(build_empty(cfg)["backbone"], 0.9, 0.2)
        }
        assert np.isclose(groups["patch_embed.proj.weight"]["lr_multiplier"], 0.9**3 * 0.2)
        assert np.isclose(groups["register_tokens"]["lr_multiplier"], 0.9**3)
        assert np.isclose(groups["blocks.0.attn.qkv.weight"]["lr_multiplier"], 0.9**2)
        assert groups["norm.weight"]["lr_multiplier"] == 1.0
        assert groups["mask_token"]["wd_multiplier"] == 1.0
        assert groups["blocks.1.ls2.gamma"]["wd_multiplier"] == 0.0
        print(f"{mode:15s} separate_head={separate!s:5s} ok  {losses}")


if __name__ == "__main__":
    torch.manual_seed(0)
    self_check()

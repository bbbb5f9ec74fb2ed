"""DINOv3 training (Siméoni et al. 2025, https://arxiv.org/abs/2508.10104), read top to
bottom: the authors' ``SSLMetaArch`` (facebookresearch/dinov3 ``dinov3/train/ssl_meta_arch.py``) and the loop
of their ``train.py``, on the fused objective.

One iteration: the batch's uint8 images go to the device; :class:`~fastssl.augment.DinoAugment` makes the 2
global and the local crops there; block masks are drawn for the global crops (:mod:`.masking`, the authors'
generator and collate). The teacher (an EMA of the student, no gradient) sees the global crops: its CLS tokens
through the DINO head, its patch tokens at the student's masked positions through the iBOT head, both turned
into targets by Sinkhorn-Knopp (or softmax centering) in fused form. The student sees the global crops with
the mask token in place of the masked patch embeddings, and the local crops. The loss is
``compute_losses``': DINO's CLS cross-entropy of local and global crops (each scaled by its share of the crop
pairs; the global term without a crop's pair with itself), KoLeo on the pre-head CLS tokens, iBOT on the
masked patches. AdamW steps with per-parameter-group learning rates (layer-wise decay, the patch embedding's
multiplier, the heads' last layers at lr 0 at first) and weight decays; the gradients of the backbone and of
each head are clipped on their own; :class:`~fastssl.MomentumTeacher` updates the teacher in one launch.

With ``--gram-use-loss``, DINOv3's Gram anchoring (:mod:`.gram_anchor`): a Gram teacher, a frozen copy of the EMA
teacher's backbone loaded before iteration ``--gram-it-load-ema-teacher`` and replaced by it on the authors'
schedule (:class:`~.gram_anchor.GramRefresh`), sees the global crops (or, with ``--gram-teacher-crops-size``, their
boxes and flips at that size without colour distortions: :func:`gram_teacher_crops`); the Gram loss
(:class:`fastssl.dinov3.GramLoss`) of the student's pre-head patch tokens of the global crops (masked, as the
authors' ``patch_pre_head``) against its final-norm patch tokens, resized to the student's grid, is added
with weight ``--gram-loss-weight`` (or the authors' schedule, ``--gram-loss-weight-schedule``) and logged as
``gram_loss``.

With ``--fsdp`` the student and the teacher are sharded with FSDP2 instead of the student wrapped in DDP
(:mod:`.fsdp`: per transformer block, per head and on the root; the same losses and collectives), and the
checkpoints are sharded folders (``OUTPUT_DIR/checkpoint``), resumed exactly on the same number of processes.
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..dinov3 import DINOLoss, GramLoss, KoLeoLoss, KoLeoLossDistributed, iBOTPatchLoss
from ..ema import MomentumTeacher, cosine_momentum_schedule
from ..losses.targets import TeacherTargets
from . import checkpoint as ckpt
from .data import StreamSampler, collate, decode_batch, gpu_jpeg_decoding_available, training_sets
from .dino import TrainResult
from .dinov3_config import Dinov3Config
from .fsdp import gathered_copy, one_process_group, restore_sharded, save_sharded_run, shard_
from .gram_anchor import GramRefresh, GramTeacher, linear_warmup_cosine_decay, select_patches
from .knn import knn_eval
from .log import EpochMeter, Logger
from .masking import BlockMasks, MaskingGenerator, block_masks, max_num_patches
from .models import DinoHead, add_mask_token, build_backbone, features_with_masks, uniform_drop_path_
from .nonfinite import NonFiniteGuard
from .resume import plan_start, position, restore
from .run_folder import rewind_log, run_folder
from .runtime import (
    any_rank,
    backward_and_step,
    in_process_group,
    iterations_per_epoch,
    mixed_precision,
    print_stop,
    resolve_precision,
    seed_all,
    step_seed,
    version,
)
from .schedules import cosine_schedule

__all__ = ["Dinov3Config", "Dinov3Loss", "Dinov3Model", "build_dinov3_augment", "build_dinov3_model",
           "dinov3_param_groups", "gram_teacher_crops", "lr_scale", "train_dinov3"]

N_GLOBAL = 2  # global crops per image


# ----------------------------------------------------------------------------- the networks

class Dinov3Model(nn.Module):
    """The student (or teacher) of ``SSLMetaArch``: ``backbone`` (a timm ViT with a learned ``mask_token``),
    ``dino_head`` on the CLS tokens, ``ibot_head`` on the masked patch tokens (the DINO head itself when not
    separate). The module names are the authors' (``student.backbone``, ``.dino_head``, ``.ibot_head``)."""

    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module | None):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head
        self.prefix = int(getattr(backbone, "num_prefix_tokens", 1))  # CLS + storage tokens

    def _ibot(self, x: torch.Tensor) -> torch.Tensor:
        return (self.ibot_head if self.ibot_head is not None else self.dino_head)(x)

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor,
                mask_indices: torch.Tensor, patches: bool = False) -> tuple[torch.Tensor, ...]:
        """The student (``get_student_output``): ``global_crops`` ``[2B, 3, S, S]`` and ``local_crops``
        ``[nB, 3, s, s]`` crop-major, ``masks`` ``[2B, patches]``, ``mask_indices`` their flat indices. Returns
        the DINO head's logits of the global ``[2B, K]`` and local ``[nB, K]`` CLS tokens, the iBOT head's
        logits of the masked patches ``[n_masked, K']`` and the global crops' pre-head CLS tokens ``[2B, D]``; with
        ``patches``, also their pre-head patch tokens ``[2B, P, D]`` (the authors' ``patch_pre_head``, masked)."""
        g = features_with_masks(self.backbone, global_crops, masks)
        loc = cast(Any, self.backbone).forward_features(local_crops)
        g_cls, l_cls = g[:, 0], loc[:, 0]
        masked = g[:, self.prefix:].flatten(0, 1).index_select(0, mask_indices)
        ibot = self._ibot(masked)
        cls = self.dino_head(torch.cat((g_cls, l_cls)))
        if patches:
            return cls[: len(g_cls)], cls[len(g_cls):], ibot, g_cls, g[:, self.prefix:]
        return cls[: len(g_cls)], cls[len(g_cls):], ibot, g_cls

    @torch.no_grad()
    def teacher_outputs(self, global_crops: torch.Tensor, mask_indices: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher (``get_teacher_output``): the DINO head's logits of the global crops' CLS tokens
        ``[2B, K]`` and the iBOT head's of their patches at the student's masked positions ``[n_masked, K']``."""
        g = cast(Any, self.backbone).forward_features(global_crops)
        masked = g[:, self.prefix:].flatten(0, 1).index_select(0, mask_indices)
        return self.dino_head(g[:, 0]), self._ibot(masked)


def build_dinov3_model(cfg: Dinov3Config | Mapping[str, Any], *, drop_path_rate: float | None = None
                       ) -> Dinov3Model:
    """The student (or, with ``drop_path_rate=0``, the teacher) of a config (a mapping is read as one)."""
    cfg = Dinov3Config.coerce(cfg)
    extra = {} if cfg.n_storage_tokens is None else {"num_reg_tokens": cfg.n_storage_tokens}
    rate = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
    backbone = build_backbone(cfg.arch, img_size=cfg.img_size, patch_size=cfg.patch_size, **extra)
    uniform_drop_path_(backbone, rate)
    add_mask_token(backbone)
    dim = cast(int, backbone.num_features)

    def head(out_dim: int, layers: int, hidden: int, bottleneck: int) -> DinoHead:
        return DinoHead(dim, out_dim, use_bn=cfg.head_use_bn, nlayers=layers, hidden_dim=hidden,
                        bottleneck_dim=bottleneck, weight_norm=cfg.head_weight_norm, norm_last_layer=False)

    dino_head = head(cfg.dino_out_dim, cfg.dino_head_layers, cfg.dino_head_hidden_dim, cfg.dino_head_bottleneck_dim)
    ibot_head = head(cfg.ibot_out_dim, cfg.ibot_head_layers, cfg.ibot_head_hidden_dim,
                     cfg.ibot_head_bottleneck_dim) if cfg.ibot_separate_head else None
    return Dinov3Model(backbone, dino_head, ibot_head)


def gram_teacher_crops(augment: Any, images: Any, crops: Any, size: int) -> torch.Tensor:
    """The Gram teacher's crops ``[2B, 3, size, size]`` (the authors' ``gram_teacher_no_distortions``): the boxes
    and flips ``crops`` (a :class:`~fastssl.augment.CropParams` of :class:`~fastssl.augment.DinoAugment`
    ``augment``) of the global crops, resized to ``size`` the same way, clipped to [0, 1] and normalised, without
    the colour distortions. One difference: the authors crop once at the larger size and resize that crop to
    the global size for the student; here the student's global crops are resized from the image directly."""
    from ..augment.multicrop import CropParams, MultiCrop

    mc = augment.multicrop
    maker = MultiCrop(size, mc.local_size, mc.n_global, 0, mc.global_scale, mc.local_scale, mc.ratio, mc.flip_p,
                      interpolation=mc.interpolation, antialias=mc.antialias, mean=None, std=None)
    boxes = CropParams(crops.global_boxes, crops.global_flips, crops.local_boxes[:0], crops.local_flips[:0],
                       sampled=crops.sampled)
    g = maker.apply(images, boxes)[0].clamp_(0.0, 1.0)
    mean = torch.tensor(augment.mean, device=g.device, dtype=g.dtype).view(1, -1, 1, 1)
    std = torch.tensor(augment.std, device=g.device, dtype=g.dtype).view(1, -1, 1, 1)
    return (g - mean) / std


def build_dinov3_augment(cfg: Dinov3Config | Mapping[str, Any]):
    """The multi-crop augmentation of ``DataAugmentationDINO`` on the device: ``(uint8 images, generator=) ->
    (globals [2B, ...], locals [nB, ...])``."""
    from ..augment import DinoAugment

    cfg = Dinov3Config.coerce(cfg)
    return DinoAugment(global_size=cfg.global_crop_size, local_size=cfg.local_crop_size, n_local=cfg.local_crops_number,
                       global_scale=cfg.global_crops_scale, local_scale=cfg.local_crops_scale, flip_p=cfg.flip_p,
                       jitter_p=cfg.color_jitter_p, grayscale_p=cfg.grayscale_p, global_blur_p=cfg.global_blur_p,
                       local_blur_p=cfg.local_blur_p, blur_sigma=cfg.blur_sigma,
                       blur_kernel_size=cfg.blur_kernel_size or None, global_solarize_p=(0.0, cfg.solarize_p))


# ----------------------------------------------------------------------------- the objective

class Dinov3Loss(nn.Module):
    """``SSLMetaArch.compute_losses`` on the fused losses: ``dino_loss`` (:class:`fastssl.dinov3.DINOLoss`),
    ``ibot_patch_loss`` (:class:`fastssl.dinov3.iBOTPatchLoss`), ``koleo_loss`` (:class:`fastssl.dinov3.KoLeoLoss`,
    or ``KoLeoLossDistributed``), with the authors' state-dict keys."""

    def __init__(self, cfg: Dinov3Config):
        super().__init__()
        self.dino_loss = DINOLoss(cfg.dino_out_dim, student_temp=cfg.student_temp, center_momentum=cfg.center_momentum)
        self.ibot_patch_loss = iBOTPatchLoss(cfg.ibot_out_dim, student_temp=cfg.student_temp,
                                             center_momentum=cfg.center_momentum)
        self.koleo_loss = KoLeoLossDistributed(cfg.koleo_topk, cfg.koleo_loss_group_size) \
            if cfg.koleo_loss_distributed else KoLeoLoss()
        self.dino_loss.init_weights()  # the centers (softmax centering only) start at 0
        self.ibot_patch_loss.init_weights()
        self.centering = cfg.centering
        self.ignore_diagonal = cfg.global_ignore_diagonal
        self.dino_weight, self.koleo_weight, self.ibot_weight = (cfg.dino_loss_weight, cfg.koleo_loss_weight,
                                                                 cfg.ibot_loss_weight)
        self.gram_loss = GramLoss(apply_norm=cfg.gram_normalized, remove_neg=cfg.gram_remove_neg,
                                  remove_only_teacher_neg=cfg.gram_remove_only_teacher_neg) \
            if cfg.gram_use_loss else None
        self.gram_weight, self.gram_img_level, self.gram_tokens_used = (cfg.gram_loss_weight, cfg.gram_img_level,
                                                                        cfg.gram_tokens_used)

    def gram(self, student_patches: torch.Tensor, teacher_patches: torch.Tensor, masks: torch.Tensor,
             weight: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gram part of ``compute_losses``: the term the total adds (``weight``, by default ``gram_weight``,
        times the loss: the schedule's value of the iteration where there is one) and the
        loss itself (logged as ``gram_loss``), of the student's global patch features ``[2B, P, D]`` against the
        Gram teacher's ``[2B, P, D]`` (on the same grid), where ``--gram-tokens-used`` says (``masks``
        ``[2B, P]``); ``img_level`` as the authors' forward argument."""
        assert self.gram_loss is not None
        s, t = select_patches(student_patches, teacher_patches, masks, self.gram_tokens_used)
        loss = self.gram_loss(s, t, img_level=self.gram_img_level)
        return (self.gram_weight if weight is None else weight) * loss, loss

    @torch.no_grad()
    def teacher_targets(self, cls_logits: torch.Tensor, masked_logits: torch.Tensor, teacher_temp: float
                        ) -> tuple[TeacherTargets, TeacherTargets]:
        """The teacher's targets of its CLS logits ``[2B, K]`` and masked-patch logits ``[n, K']`` (fused:
        logits and row statistics, never ``[rows, K]`` probabilities)."""
        return (self.dino_loss.teacher_targets(cls_logits, teacher_temp, centering=self.centering),
                self.ibot_patch_loss.teacher_targets(masked_logits, teacher_temp, centering=self.centering))

    def forward(self, student_global: torch.Tensor, student_local: torch.Tensor, student_masked: torch.Tensor,
                global_cls: torch.Tensor, dino_targets: TeacherTargets, ibot_targets: TeacherTargets,
                masks: BlockMasks) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``student_global`` ``[2, B, K]``, ``student_local`` ``[n, B, K]``, ``student_masked`` ``[n_masked, K']``,
        ``global_cls`` ``[2, B, D]``: the total loss and its terms."""
        n_global, n_local = student_global.shape[0], student_local.shape[0]
        global_terms = n_global * (n_global - 1) if self.ignore_diagonal else n_global ** 2
        local_terms = n_global * n_local
        global_scale = global_terms / (global_terms + local_terms)
        local_scale = local_terms / (global_terms + local_terms)
        koleo_scale = n_global

        dino_local = self.dino_loss(student_local, dino_targets)
        dino_global = self.dino_loss(student_global, dino_targets, ignore_diagonal=self.ignore_diagonal)
        # A crop of one image has no neighbour (only after unreadable images were dropped): no KoLeo term then.
        koleo = sum(self.koleo_loss(x) for x in global_cls) / n_global if global_cls.shape[1] > 1 \
            else global_cls.sum() * 0.0
        ibot = self.ibot_patch_loss.forward_masked(student_masked, ibot_targets, masks.masks,
                                                  n_masked_patches=masks.n_masked, masks_weight=masks.weights)
        total = (self.dino_weight * local_scale * dino_local + self.dino_weight * global_scale * dino_global
                 + self.koleo_weight * koleo_scale * koleo + self.ibot_weight * ibot)
        parts = {"dino_local_crops_loss": dino_local, "dino_global_crops_loss": dino_global,
                 "koleo_loss": cast(torch.Tensor, koleo), "ibot_loss": ibot}
        return total, parts


# ----------------------------------------------------------------------------- optimisation

def lr_scale(rule: str, global_batch: int) -> float:
    """The authors' scaling of ``optim.lr`` (``apply_scaling_rules_to_cfg``)."""
    return 4 * math.sqrt(global_batch / 1024.0) if rule == "sqrt_wrt_1024" else global_batch / 256.0


def _lr_decay_rate(name: str, rate: float, num_layers: int) -> float:
    """``get_vit_lr_decay_rate`` for a parameter of a ViT with ``num_layers`` blocks (``name`` inside the
    backbone): the embeddings and tokens (timm's ``reg_token`` are the authors' storage tokens) at layer 0,
    block i at layer i + 1, the rest (the last norm) at num_layers + 1; ``rate ** (num_layers + 1 - layer)``."""
    layer = num_layers + 1
    if any(k in name for k in ("pos_embed", "patch_embed", "mask_token", "cls_token", "storage_tokens",
                               "reg_token")):
        layer = 0
    elif "blocks." in name and "residual." not in name:
        layer = int(name[name.find("blocks."):].split(".")[1]) + 1
    return rate ** (num_layers + 1 - layer)


def dinov3_param_groups(model: Dinov3Model, layerwise_decay: float, patch_embed_lr_mult: float) -> list[dict]:
    """The authors' ``get_params_groups_with_decay_fsdp`` on the backbone and on each head (names inside each),
    fused by (lr multiplier, wd multiplier, last layer) as ``fuse_params_groups``: layer-wise lr decay in the
    backbone, the patch embedding's lr times ``patch_embed_lr_mult``, no weight decay on biases, norms and
    layer-scale gammas, ``is_last_layer`` for the heads' last layers."""
    parts: list[tuple[nn.Module, int]] = [(model.backbone, len(cast(nn.ModuleList, model.backbone.blocks))),
                                          (model.dino_head, 0)]
    if model.ibot_head is not None:
        parts.append((model.ibot_head, 0))
    groups: dict[tuple[float, float, bool], dict] = {}
    for module, n_blocks in parts:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            lr_mult = _lr_decay_rate(name, layerwise_decay, n_blocks) if n_blocks else 1.0
            wd_mult = 0.0 if (name.endswith("bias") or "norm" in name or "gamma" in name or "fourier_w" in name) \
                else 1.0
            if "patch_embed" in name:
                lr_mult *= patch_embed_lr_mult
            key = (lr_mult, wd_mult, "last_layer" in name)
            group = groups.setdefault(key, {"params": [], "lr_multiplier": key[0], "wd_multiplier": key[1],
                                            "is_last_layer": key[2]})
            group["params"].append(p)
    return list(groups.values())


def apply_optim_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """The authors' ``apply_optim_scheduler``: each group's lr and weight decay from the iteration's values."""
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]


def _local(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (under FSDP2 a replicated DTensor: its local value is the norm)."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def clip_each_(model: Dinov3Model, clip: float) -> list[torch.Tensor]:
    """``clip_grad_norm_`` on the backbone and on each head on its own (the authors' loop over
    ``student.items()``); returns their norms before clipping."""
    parts = [model.backbone, model.dino_head] + ([model.ibot_head] if model.ibot_head is not None else [])
    return [torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=clip) for m in parts]


# ----------------------------------------------------------------------------- the training run

def train_dinov3(cfg: Dinov3Config | Mapping[str, Any], *, augment=None) -> TrainResult:
    """Train DINOv3 as ``cfg`` says (a :class:`Dinov3Config`; a mapping of its fields is read as one).

    ``augment`` replaces the augmentation (a callable ``(uint8 images, generator=) -> (globals, locals)``),
    e.g. in tests. Resumes from ``output_dir/checkpoint.pth`` when it exists (or from ``resume``); saves a
    checkpoint and returns on SIGTERM / SIGINT. With ``fsdp`` the networks are sharded with FSDP2 (``fsdp.py``)
    and the checkpoint is the sharded folder ``output_dir/checkpoint``.
    """
    config = Dinov3Config.coerce(cfg)
    config.validate()
    return in_process_group(config, lambda device, rank, world: _train(config, device, rank, world, augment))


def _train(cfg: Dinov3Config, device: torch.device, rank: int, world: int, augment) -> TrainResult:
    main = rank == 0
    out = Path(cfg.output_dir)
    cfg = resolve_precision(cfg, device)

    batch = cfg.batch_size_per_gpu
    global_batch = batch * world
    base_lr = cfg.lr * lr_scale(cfg.scaling_rule, global_batch)
    if cfg.min_lr > base_lr:
        raise cfg.fail("min_lr", f"must be at most the peak learning rate, --lr x {base_lr / cfg.lr:g} "
                       f"({cfg.scaling_rule}, global batch {global_batch}) = {base_lr:g}")

    # Data first: a missing or empty folder is an error before any file, model or GPU work.
    assert cfg.data is not None  # validated
    train_set, knn_bank, knn_query = training_sets(
        cfg.data, digits_size=cfg.digits_size, knn_data=cfg.knn_data, knn_val_data=cfg.knn_val_data,
        raw_jpeg=cfg.data != "digits" and cfg.gpu_decode and gpu_jpeg_decoding_available(device))
    n_images = len(cast(Any, train_set))
    data_niter = iterations_per_epoch(n_images, batch, world)  # an error if the data cannot fill one batch
    niter = cfg.official_epoch_length or data_niter

    with contextlib.ExitStack() as stack:
        if cfg.fsdp:  # FSDP2 needs a process group: one of this process alone without torchrun
            stack.enter_context(one_process_group())
            # The student returns slices of its outputs, which nothing changes in place (the equality with DDP
            # is tested): FSDP2's warning about in-place ops on views says nothing to a user.
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        notes = stack.enter_context(run_folder(out, main))
        start = plan_start(cfg, out, world=world, niter=niter, n_images=n_images)
        if start.complete:
            if main:
                print(start.complete_message(out), flush=True)
            return TrainResult(epoch=start.epoch, step=start.epoch * niter, loss=math.nan, out_dim=cfg.dino_out_dim,
                               checkpoint=str(start.path), stopped_early=False, knn=None, complete=True)

        # Every rank builds the same weights (the teacher is loaded from the student before DDP broadcasts it).
        seed_all(cfg.seed)
        student = build_dinov3_model(cfg).to(device)
        # The teacher stays in train mode, as DINO's: the authors' eval mode computes the same (no dropout, no drop
        # path), except with --head-use-bn, whose BatchNorm then uses the batch's statistics (theirs would use
        # running statistics that their EMA never updates).
        teacher_net = build_dinov3_model(cfg, drop_path_rate=0.0).to(device)
        seed_all(cfg.seed + rank)  # then each rank its own randomness (drop path)
        # As DINO's trainer: any BatchNorm (the heads', with --head-use-bn) syncs across GPUs; gloo keeps its own.
        if world > 1 and device.type == "cuda":
            student = cast(Dinov3Model, nn.SyncBatchNorm.convert_sync_batchnorm(student))
            teacher_net = cast(Dinov3Model, nn.SyncBatchNorm.convert_sync_batchnorm(teacher_net))
        teacher_net.load_state_dict(student.state_dict())
        # The Gram teacher (--gram-use-loss), built before --compile wraps the backbones.
        gram_teacher = GramTeacher(teacher_net.backbone) if cfg.gram_use_loss else None
        amp_dtype, scaler = mixed_precision(cfg, device)
        if cfg.fsdp:  # sharded alike: the EMA updates each rank's local shards
            from torch.distributed.fsdp import register_fsdp_forward_method

            shard_(student, amp_dtype, compile_blocks=cfg.compile, checkpoint_blocks=cfg.activation_checkpointing)
            shard_(teacher_net, amp_dtype, compile_blocks=cfg.compile, teacher=True)
            register_fsdp_forward_method(teacher_net, "teacher_outputs")  # gathers the root's shards as forward
        epochs = cfg.epochs
        momentum = cosine_momentum_schedule(cfg.momentum_teacher, cfg.final_momentum_teacher, epochs, niter)
        teacher = MomentumTeacher(student, momentum.tolist(), teacher=teacher_net)
        # --compile: the backbones' forward_features, which every caller goes through (state dict unchanged);
        # under --fsdp each block (shard_).
        if cfg.compile and not cfg.fsdp:
            for net in (student, teacher_net):
                vit = cast(Any, net.backbone)
                vit.forward_features = torch.compile(vit.forward_features)
        student_ddp = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda"
                                                          else None) if world > 1 and not cfg.fsdp else student

        losses = Dinov3Loss(cfg).to(device)
        # The Gram teacher (--gram-use-loss): a frozen copy of the EMA teacher's backbone, loaded before iteration
        # --gram-it-load-ema-teacher and replaced as GramRefresh says; its weights and the replacements made so far
        # are in the checkpoint.
        refresh = GramRefresh(cfg.gram_it_load_ema_teacher, cfg.gram_rep_update, cfg.gram_update_frequency,
                              cfg.gram_it_first_update, cfg.gram_max_updates)
        gram_updates = 0
        gram_weights = linear_warmup_cosine_decay(
            cfg.gram_loss_weight_start, cfg.gram_loss_weight_peak, cfg.gram_loss_weight_end,
            cfg.gram_loss_weight_warmup_epochs * niter, cfg.epochs * niter,
            None if cfg.gram_loss_weight_cosine_epochs is None else cfg.gram_loss_weight_cosine_epochs * niter,
        ).tolist() if cfg.gram_loss_weight_schedule else [cfg.gram_loss_weight] * (cfg.epochs * niter)
        # fused: one kernel, which also skips a step on the device (a non-finite loss)
        optimizer = torch.optim.AdamW(dinov3_param_groups(student, cfg.layerwise_decay, cfg.patch_embed_lr_mult),
                                      betas=(cfg.adamw_beta1, cfg.adamw_beta2), fused=True)
        # The authors' schedules (CosineScheduler), per iteration; plain floats for the checkpoint.
        lr_schedule = cosine_schedule(base_lr, cfg.min_lr, epochs, niter, cfg.warmup_epochs)
        last_layer_lr_schedule = lr_schedule.copy()
        last_layer_lr_schedule[: cfg.freeze_last_layer_epochs * niter] = 0.0
        wd_schedule = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, epochs, niter).tolist()
        temp_schedule = cosine_schedule(cfg.teacher_temp, cfg.teacher_temp, epochs, niter,
                                        cfg.warmup_teacher_temp_epochs, cfg.warmup_teacher_temp).tolist()
        lrs, last_lrs = lr_schedule.tolist(), last_layer_lr_schedule.tolist()

        augment = augment if augment is not None else build_dinov3_augment(cfg)
        aug_gen = torch.Generator(device=device)
        patch = int(cast(Any, student.backbone).patch_embed.patch_size[0])
        grid = cfg.global_crop_size // patch
        mask_generator = MaskingGenerator((grid, grid), min_num_patches=cfg.mask_min_num_patches,
                                          max_num_patches=max_num_patches(cfg.global_crop_size, patch),
                                          min_aspect=cfg.mask_min_aspect)

        if cfg.fsdp and start.state is not None:
            assert start.path is not None
            plain = restore_sharded(start.path, {"student": student, "teacher": teacher_net}, optimizer,
                                    {"losses": losses.state_dict(), "scaler": scaler.state_dict() if scaler else None},
                                    device)
            losses.load_state_dict(plain["losses"])
            if scaler is not None and plain["scaler"]:
                scaler.load_state_dict(plain["scaler"])
        else:
            restore(start, {"student": student, "teacher": teacher_net, "losses": losses,
                            **({"gram_teacher": gram_teacher} if gram_teacher is not None else {})},
                    optimizer, scaler, device)
            if gram_teacher is not None and start.state is not None:
                gram_updates = int(start.state["gram_updates"])
        if main:
            notes.append(rewind_log(out, start.steps_done, start.epoch) or "")
        log = stack.enter_context(Logger(out, cfg, main))
        log.print_config("DINOv3", device, world, niter, base_lr,
                         scaling=f"{cfg.scaling_rule} by global batch {global_batch}")
        log.announce(notes + start.notes, start.events)

        # An endless stream of batches from where the run stands (start.offset is 0: the world size is fixed).
        sampler = StreamSampler(n_images, batch, seed=cfg.seed, rank=rank, world_size=world,
                                start_step=start.epoch * niter + start.step)
        loader = DataLoader(cast(Any, train_set), batch_size=batch, sampler=sampler, num_workers=cfg.num_workers,
                            collate_fn=collate, pin_memory=device.type == "cuda", drop_last=True,
                            generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=False)
        batches = iter(loader)

        def save(epoch: int, step: int, name: str = "checkpoint.pth", meter: dict | None = None) -> Path | None:
            if cfg.fsdp:  # every rank writes its shards: the folder OUTPUT_DIR/checkpoint[NNNN]
                plain = {"scaler": scaler.state_dict() if scaler else None, "losses": losses.state_dict(),
                         **position(start, epoch, step, world, meter), "config": cfg.to_dict(),
                         "fastssl_version": version()}
                return save_sharded_run(out / name.removesuffix(".pth"), {"student": student, "teacher": teacher_net},
                                        optimizer, plain, device)
            rng = ckpt.rng_states(device)  # every rank's (a collective)
            if not main:
                return None
            state = {"student": student.state_dict(), "teacher": teacher_net.state_dict(),
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                     "losses": losses.state_dict(), **position(start, epoch, step, world, meter), "rng": rng,
                     "config": cfg.to_dict(), "fastssl_version": version()}
            if gram_teacher is not None:
                state.update(gram_teacher=gram_teacher.state_dict(), gram_updates=gram_updates)
            return ckpt.save_checkpoint(state, out / name)

        def knn_teacher() -> nn.Module:
            if not cfg.fsdp:
                return teacher_net.backbone
            # a collective: every rank evaluates
            plain = gathered_copy(teacher_net, lambda: build_dinov3_model(cfg, drop_path_rate=0.0), device)
            return cast(nn.Module, plain.backbone)

        def knn(backbone: nn.Module) -> dict[str, float]:
            return knn_eval(backbone, knn_bank, knn_query, device, k=cfg.knn_k, T=cfg.knn_t, size=cfg.global_crop_size,
                            crop_fraction=cfg.eval_crop_fraction, batch_size=cfg.knn_batch_size,
                            num_workers=cfg.num_workers, amp_dtype=amp_dtype)

        signal_received = stack.enter_context(ckpt.StopSignal())
        guard = NonFiniteGuard(device, rank, world, niter, (student, teacher_net, losses),
                               hint="lower --lr, or try --precision fp32")
        last_loss, knn_result, stopped, path, steps_run = math.nan, None, False, None, 0
        it, epochs_done = start.epoch * niter + start.step - 1, start.epoch
        for epoch in range(start.epoch, epochs):
            first = start.step if epoch == start.epoch else 0
            student.train()
            meter = EpochMeter(log, epoch, epochs, niter, first, device, offset=start.offset,
                               saved=start.meter if epoch == start.epoch else None, guard=guard)
            done = first  # iterations of this epoch done
            for i, data in zip(range(first, niter), batches, strict=False):  # the stream never ends
                images, skipped = decode_batch(data, device)
                skipped += data.skipped
                # Host flags, the same on every rank: a signal (stop before this iteration); a batch of unreadable
                # images here or on another rank, or, with KoLeo over every rank's rows (which needs the same batch
                # on each), a batch short of an unreadable image (skip it).
                signalled, empty = any_rank(bool(signal_received), not len(images) or
                                            (cfg.koleo_loss_distributed and len(images) != batch))
                if signalled:
                    stopped = True
                    break
                it, done = epoch * niter + i, i + 1
                apply_optim_schedule(optimizer, lrs[it], wd_schedule[it], last_lrs[it])
                if empty:
                    meter.skip(skipped + len(images), i)
                    continue
                # The same crops and masks on resume: seeded by (seed, rank, iteration).
                aug_gen.manual_seed(step_seed(cfg.seed, rank, it))
                if gram_teacher is not None and cfg.gram_teacher_crops_size is not None:
                    global_crops, local_crops, drawn = augment(images, generator=aug_gen, return_params=True)
                    gram_crops = gram_teacher_crops(augment, images, drawn.crops, cfg.gram_teacher_crops_size)
                else:
                    global_crops, local_crops = augment(images, generator=aug_gen)
                    gram_crops = global_crops
                mask_seed = step_seed(cfg.seed + 1, rank, it)
                masks = block_masks(N_GLOBAL * len(images), mask_generator, cfg.mask_ratio_min_max,
                                    cfg.mask_sample_probability, random.Random(mask_seed),
                                    np.random.RandomState(mask_seed % 2**32),
                                    random_circular_shift=cfg.mask_random_circular_shift).to(device)
                B = len(images)
                if gram_teacher is not None and refresh.loads_before(it):
                    gram_teacher.load_(teacher_net.backbone)

                guard.hold()
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    teacher_cls, teacher_masked = teacher_net.teacher_outputs(global_crops, masks.indices)
                    dino_targets, ibot_targets = losses.teacher_targets(teacher_cls, teacher_masked,
                                                                        temp_schedule[it])
                    s_global, s_local, s_masked, g_cls, *s_patches = student_ddp(
                        global_crops, local_crops, masks.masks, masks.indices, patches=gram_teacher is not None)
                    loss, parts = losses(s_global.unflatten(0, (N_GLOBAL, B)), s_local.unflatten(0, (-1, B)),
                                         s_masked, g_cls.unflatten(0, (N_GLOBAL, B)), dino_targets, ibot_targets,
                                         masks)
                    # The Gram term, from the Gram teacher's loading on (the authors' raises before): it sees the
                    # global crops, its patch grid resized to the student's.
                    if gram_teacher is not None and it >= cfg.gram_it_load_ema_teacher:
                        t_patches = gram_teacher.patch_features(gram_crops, grid,
                                                                cfg.gram_global_teacher_resize_method,
                                                                cfg.gram_global_teacher_resize_antialias)
                        term, parts["gram_loss"] = losses.gram(s_patches[0], t_patches, masks.masks,
                                                               gram_weights[it])
                        loss = loss + term
                    elif gram_teacher is not None:
                        parts["gram_loss"] = loss.detach() * 0.0
                skip = guard.observe(loss, it)  # a non-finite loss: this step and the rest skipped on the device

                norms: list[torch.Tensor] = []

                def before_step(norms=norms):
                    if cfg.clip_grad > 0:
                        norms.extend(_local(n) for n in clip_each_(student, cfg.clip_grad))

                backward_and_step(loss, optimizer, scaler, before_step, skip)
                teacher.update(momentum=guard.momentum(teacher.momentum_at(it)))
                if gram_teacher is not None and refresh.updates_after(it, gram_updates):
                    gram_teacher.load_(teacher_net.backbone)
                    gram_updates += 1
                guard.release()

                # Every value stays on the device: read (with the guard's flags, raising on a non-finite loss) in
                # one transfer once per --log-freq iterations.
                extra: dict[str, float | torch.Tensor] = {k: v.detach() for k, v in parts.items()}
                extra.update(zip(("backbone_grad_norm", "dino_head_grad_norm", "ibot_head_grad_norm"), norms,
                                 strict=False))
                meter.update(loss, len(images), skipped, i=i, it=it, lr=lrs[it], wd=wd_schedule[it],
                             momentum=teacher.momentum_at(it), teacher_temp=temp_schedule[it],
                             last_layer_lr=last_lrs[it], n_masked_patches=masks.n_masked, **extra,
                             **({"gram_loss_weight": gram_weights[it]} if gram_teacher is not None else {}))
                steps_run += 1
                if cfg.stop_after_steps is not None and steps_run >= cfg.stop_after_steps:
                    stopped = True
                    break
            stopped = stopped or any_rank(bool(signal_received))[0]  # a signal in the epoch's last iteration
            if stopped and done < niter:  # mid-epoch: the epoch's end comes when the run resumes
                meter.close_bar()
                path = save(epoch, done, meter=meter.state())  # state() raises on a non-finite loss: no save
                break
            last_loss = meter.close()
            epochs_done = epoch + 1
            path = save(epoch + 1, 0)
            if cfg.saveckp_freq and (epoch + 1) % cfg.saveckp_freq == 0:
                save(epoch + 1, 0, f"checkpoint{epoch + 1:04d}.pth")
            # k-NN of the teacher every --knn-freq epochs, and after the last one whenever there is a bank.
            if knn_bank is not None and ((cfg.knn_freq and (epoch + 1) % cfg.knn_freq == 0) or epoch + 1 == epochs):
                knn_result = knn(knn_teacher())
                log.write({"epoch": epoch + 1, **{f"knn_{k}": v for k, v in knn_result.items()}})
                log.say(f"epoch {epoch + 1}: k-NN top-1 {knn_result['top1']:.2f}% top-5 {knn_result['top5']:.2f}% "
                        f"(k={cfg.knn_k}, T={cfg.knn_t})")
                if epoch + 1 == epochs and cfg.data == "digits":  # the baseline: the student's initialisation
                    seed_all(cfg.seed)
                    rand = knn(build_dinov3_model(cfg).backbone.to(device))
                    log.write({"epoch": epoch + 1, **{f"knn_random_init_{k}": v for k, v in rand.items()}})
                    log.say(f"k-NN top-1 (k={cfg.knn_k}, T={cfg.knn_t}) on the held-out digits: DINOv3 "
                            f"{knn_result['top1']:.1f}% | the same network at random initialisation "
                            f"{rand['top1']:.1f}%")
            if stopped:
                break
        if stopped and main:
            print_stop(signal_received, cfg, steps_run, start.offset + it + 1, epochs_done, path)
        if math.isfinite(last_loss):
            log.say(f"final loss {last_loss:.4f}")
        del batches
    return TrainResult(epoch=epochs_done, step=it + 1, loss=last_loss, out_dim=cfg.dino_out_dim,
                       checkpoint=str(path) if path else None, stopped_early=stopped, knn=knn_result,
                       steps_run=steps_run)


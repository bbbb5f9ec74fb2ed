"""Every option of ``fastssl-train dinov3``: the DINOv3 authors' ViT-L ImageNet-1k recipe, their values.

The defaults are facebookresearch/dinov3 ``dinov3/configs/train/vitl_im1k_lin834.yaml`` over
``ssl_default_config.yaml`` (the names in brackets in the help texts are theirs), for the parts
``SSLMetaArch`` trains: DINO's CLS loss on local and global crops, iBOT's masked-patch loss, KoLeo,
Sinkhorn-Knopp centering, the teacher an EMA of the student; and the Gram anchoring stage's ``gram.*``
options (off by default, as theirs; ``gram.ckpt``, ``gram.ema_teacher`` and ``gram.compute_stats`` not
offered). Read with
:mod:`fastssl.train.config` (how an option is declared) and ``presets.py`` (the recipes as
instances of :class:`Dinov3Config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .config import (
    KNN,
    OPTIM,
    RUN,
    KnnOptions,
    RunConfig,
    at_least,
    fraction_pair,
    in_range,
    known_arch,
    not_empty,
    option,
    positive,
    positive_pair,
)
from .errors import ConfigError

__all__ = ["Dinov3Config"]

MODEL = "model"
LOSSES = "DINO, iBOT and KoLeo losses"
MASKS = "iBOT block masks"
TEACHER = "teacher"
AUGMENT = "multi-crop augmentation (on the GPU)"
GRAM = "Gram anchoring (DINOv3's late stage)"


def probability_pair(v: tuple[float, float]) -> str | None:
    return None if all(0.0 <= p <= 1.0 for p in v) else "must be two probabilities in [0, 1]"


def ratio_range(v: tuple[float, float]) -> str | None:
    """The authors' assertion on ``ibot.mask_ratio_min_max``."""
    return None if 0.0 <= v[0] < v[1] <= 1.0 else "must be two fractions 0 <= min < max <= 1"


def odd_or_zero(v: int) -> str | None:
    return None if v == 0 or (v > 0 and v % 2 == 1) else "must be an odd size, or 0"


@dataclass(frozen=True)
class Dinov3Config(KnnOptions, RunConfig):
    """DINOv3 training (Siméoni et al. 2025), the Gram stage off: the authors' ViT-L/16 ImageNet-1k recipe
    (vitl_im1k_lin834.yaml: 100 epochs of 1250 iterations, 2048 images per step)."""

    command: ClassVar[str] = "dinov3"
    group_order: ClassVar[tuple[str, ...]] = (RUN, MODEL, LOSSES, MASKS, TEACHER, OPTIM, AUGMENT, GRAM, KNN)

    output_dir: str = option("runs/dinov3", "the run folder: checkpoints, config.json and log.jsonl; a run resumes "
                             "from its checkpoint.pth", group=RUN, checks=[not_empty], resumable=True)
    fsdp: bool = option(False, "shard the student and the teacher with FSDP2 instead of DDP (fully_shard per "
                        "transformer block, per head and on the root; with --precision bf16 parameters "
                        "gathered in bf16, gradients reduced in fp32; --compile compiles each block): "
                        "checkpoints are then the folder OUTPUT_DIR/checkpoint (torch.distributed.checkpoint), "
                        "resumed on the same number of processes", group=RUN)
    activation_checkpointing: bool = option(False, "recompute each transformer block's activations in the "
                                            "backward pass (with --fsdp): less memory, one more forward",
                                            group=RUN)

    # The networks [student.*, dino.head_*, ibot.head_*].
    arch: str = option("vit_large_patch16_dinov3_qkvb", "timm ViT: vit_{small,base,large}_patch16_dinov3[_qkvb] "
                       "(RoPE, storage tokens), vit_*_reg4_dinov2, vit_*_patch16_224, or vit_digits; the student "
                       "gets a learned mask token [student.arch]", group=MODEL, checks=[known_arch])
    n_storage_tokens: int | None = option(None, "storage (register) tokens of a *_dinov3 arch (default: the arch's, 4 "
                                          "in timm; the authors' ImageNet-1k ViT-L has 0) [student.n_storage_tokens]",
                                          group=MODEL, checks=[at_least(0)])
    patch_size: int | None = option(None, "ViT patch size (default: the arch's)", group=MODEL, checks=[at_least(1)])
    img_size: int | None = option(None, "ViT position grid in pixels (default: the arch's; RoPE archs have none)",
                                  group=MODEL, checks=[at_least(1)])
    drop_path_rate: float = option(0.3, "stochastic depth rate, the same in every block as the authors' "
                                   "[student.drop_path_rate]", group=MODEL, checks=[in_range(0.0, 1.0, hi_open=True)])
    dino_out_dim: int = option(65536, "prototypes of the DINO head [dino.head_n_prototypes]", group=MODEL,
                               checks=[at_least(1)])
    dino_head_layers: int = option(3, "layers of the DINO head's MLP [dino.head_nlayers]", group=MODEL,
                                   checks=[at_least(1)])
    dino_head_hidden_dim: int = option(2048, "hidden width of the DINO head [dino.head_hidden_dim]", group=MODEL,
                                       checks=[at_least(1)])
    dino_head_bottleneck_dim: int = option(256, "bottleneck width (L2-normalised) of the DINO head "
                                           "[dino.head_bottleneck_dim]", group=MODEL, checks=[at_least(1)])
    head_use_bn: bool = option(False, "BatchNorm in the heads' MLPs (the authors' DINOHead(use_bn=True); off in "
                               "their configs; synchronised across processes on GPUs)", group=MODEL)
    head_weight_norm: bool = option(False, "the heads' last layers weight-normalised (norms trained from 1): "
                                    "DINOv2's DINOHead; DINOv3's is a plain Linear", group=MODEL)
    ibot_separate_head: bool = option(True, "a head of its own for iBOT (DINOv3; false: iBOT shares the DINO head, "
                                      "as DINOv2's default) [ibot.separate_head]", group=MODEL)
    ibot_out_dim: int = option(65536, "prototypes of the iBOT head [ibot.head_n_prototypes]", group=MODEL,
                               checks=[at_least(1)])
    ibot_head_layers: int = option(3, "layers of the iBOT head's MLP [ibot.head_nlayers]", group=MODEL,
                                   checks=[at_least(1)])
    ibot_head_hidden_dim: int = option(2048, "hidden width of the iBOT head [ibot.head_hidden_dim]", group=MODEL,
                                       checks=[at_least(1)])
    ibot_head_bottleneck_dim: int = option(256, "bottleneck width of the iBOT head [ibot.head_bottleneck_dim]",
                                           group=MODEL, checks=[at_least(1)])

    # The objective [dino.*, ibot.loss_weight, train.centering], weighted as SSLMetaArch.compute_losses.
    dino_loss_weight: float = option(1.0, "weight of the DINO loss; its local and global terms are scaled by their "
                                     "shares of the crop pairs [dino.loss_weight]", group=LOSSES,
                                     checks=[at_least(0.0)])
    global_ignore_diagonal: bool = option(True, "leave out the pairs of a global crop with itself from the global "
                                          "DINO term [dino.global_ignore_diagonal]", group=LOSSES)
    koleo_loss_weight: float = option(0.1, "weight of KoLeo on the student's pre-head CLS tokens of each global "
                                      "crop, per process [dino.koleo_loss_weight]", group=LOSSES,
                                      checks=[at_least(0.0)])
    koleo_loss_distributed: bool = option(False, "KoLeo's neighbours from every process's rows (a step whose "
                                          "batch lost an unreadable image is then skipped) [dino."
                                          "koleo_loss_distributed]", group=LOSSES)
    koleo_topk: int = option(1, "neighbours per row of the distributed KoLeo [dino.koleo_topk]", group=LOSSES,
                             checks=[at_least(1)])
    koleo_loss_group_size: int | None = option(None, "rows of the global batch per neighbour set of the distributed "
                                               "KoLeo (default: all) [dino.koleo_distributed_loss_group_size]",
                                               group=LOSSES, checks=[at_least(1)])
    ibot_loss_weight: float = option(1.0, "weight of the iBOT masked-patch loss [ibot.loss_weight]", group=LOSSES,
                                     checks=[at_least(0.0)])
    centering: Literal["sinkhorn_knopp", "softmax"] = option(
        "sinkhorn_knopp", "teacher targets: Sinkhorn-Knopp over every process's rows (DINOv3), or softmax with an EMA "
        "center (DINOv2's default) [train.centering]", group=LOSSES)
    student_temp: float = option(0.1, "student temperature of the DINO and iBOT losses", group=LOSSES,
                                 checks=[positive])
    center_momentum: float = option(0.9, "EMA momentum of the centers (softmax centering only)", group=LOSSES,
                                    checks=[in_range(0.0, 1.0)])

    # The block masks of iBOT [ibot.mask_*; MaskingGenerator's arguments in train.py].
    mask_sample_probability: float = option(0.5, "share of the global crops that are masked [ibot."
                                            "mask_sample_probability]", group=MASKS, checks=[in_range(0.0, 1.0)])
    mask_ratio_min_max: tuple[float, float] = option((0.1, 0.5), "range of the masked share of a masked crop's "
                                                     "patches, spread evenly over the masked crops [ibot."
                                                     "mask_ratio_min_max]", group=MASKS, checks=[ratio_range])
    mask_min_num_patches: int = option(4, "smallest block the mask generator draws, in patches", group=MASKS,
                                       checks=[at_least(1)])
    mask_min_aspect: float = option(0.3, "smallest aspect ratio of a block (the largest is its inverse)",
                                    group=MASKS, checks=[in_range(0.0, 1.0), positive])
    mask_random_circular_shift: bool = option(False, "roll each mask by a random offset [ibot."
                                              "mask_random_circular_shift]", group=MASKS)

    # The teacher [teacher.*].
    momentum_teacher: float = option(0.992, "base EMA momentum of the teacher, cosine to --final-momentum-teacher "
                                     "[teacher.momentum_teacher]", group=TEACHER, checks=[in_range(0.0, 1.0)])
    final_momentum_teacher: float = option(1.0, "EMA momentum at the end of training [teacher."
                                           "final_momentum_teacher]", group=TEACHER, checks=[in_range(0.0, 1.0)])
    warmup_teacher_temp: float = option(0.04, "initial teacher temperature [teacher.warmup_teacher_temp]",
                                        group=TEACHER, checks=[positive])
    teacher_temp: float = option(0.07, "teacher temperature after the warm-up [teacher.teacher_temp]", group=TEACHER,
                                 checks=[positive])
    warmup_teacher_temp_epochs: int = option(30, "epochs of linear teacher-temperature warm-up [teacher."
                                             "warmup_teacher_temp_epochs]", group=TEACHER, checks=[at_least(0)])

    # Optimisation [optim.*, train.OFFICIAL_EPOCH_LENGTH] (epochs and batch_size_per_gpu: RunConfig).
    official_epoch_length: int = option(1250, "iterations per epoch, whatever the data's size (0: one pass over the "
                                        "data per epoch) [train.OFFICIAL_EPOCH_LENGTH]", group=OPTIM,
                                        checks=[at_least(0)])
    lr: float = option(0.001, "peak learning rate before scaling by --scaling-rule [optim.lr]", group=OPTIM,
                       checks=[positive])
    scaling_rule: Literal["sqrt_wrt_1024", "linear_wrt_256"] = option(
        "sqrt_wrt_1024", "peak lr = --lr x 4 sqrt(global batch / 1024), or x global batch / 256 [optim.scaling_rule]",
        group=OPTIM)
    min_lr: float = option(1e-6, "learning rate at the end of the cosine, not scaled (at most the scaled peak) "
                           "[optim.min_lr]", group=OPTIM, checks=[at_least(0.0)])
    warmup_epochs: int = option(10, "epochs of linear lr warm-up from 0 [optim.warmup_epochs]", group=OPTIM,
                                checks=[at_least(0)])
    weight_decay: float = option(0.04, "initial weight decay, cosine to --weight-decay-end [optim.weight_decay]",
                                 group=OPTIM, checks=[at_least(0.0)])
    weight_decay_end: float = option(0.4, "final weight decay [optim.weight_decay_end]", group=OPTIM,
                                     checks=[at_least(0.0)])
    layerwise_decay: float = option(0.9, "lr of block i multiplied by this to the power (blocks - i); the "
                                    "embeddings and tokens by it to the power (blocks + 1) [optim.layerwise_decay]",
                                    group=OPTIM, checks=[in_range(0.0, 1.0), positive])
    patch_embed_lr_mult: float = option(0.2, "extra lr multiplier of the patch embedding [optim."
                                        "patch_embed_lr_mult]", group=OPTIM, checks=[at_least(0.0)])
    freeze_last_layer_epochs: int = option(1, "epochs with the heads' last layers at lr 0 [optim."
                                           "freeze_last_layer_epochs]", group=OPTIM, checks=[at_least(0)])
    clip_grad: float = option(3.0, "maximal gradient norm of the backbone and of each head, each on its own "
                              "(0: no clipping) [optim.clip_grad]", group=OPTIM, checks=[at_least(0.0)])
    adamw_beta1: float = option(0.9, "AdamW's beta1 [optim.adamw_beta1]", group=OPTIM,
                                checks=[in_range(0.0, 1.0, hi_open=True)])
    adamw_beta2: float = option(0.999, "AdamW's beta2 [optim.adamw_beta2]", group=OPTIM,
                                checks=[in_range(0.0, 1.0, hi_open=True)])

    # The multi-crop augmentation [crops.*; DataAugmentationDINO].
    global_crop_size: int = option(224, "side of the 2 global crops [crops.global_crops_size]", group=AUGMENT,
                                   checks=[at_least(1)])
    local_crop_size: int = option(96, "side of the local crops [crops.local_crops_size]", group=AUGMENT,
                                  checks=[at_least(1)])
    global_crops_scale: tuple[float, float] = option((0.32, 1.0), "area range of the global crops, as a fraction of "
                                                     "the image [crops.global_crops_scale]", group=AUGMENT,
                                                     checks=[fraction_pair])
    local_crops_number: int = option(8, "local crops per image [crops.local_crops_number]", group=AUGMENT,
                                     checks=[at_least(1)])
    local_crops_scale: tuple[float, float] = option((0.05, 0.32), "area range of the local crops [crops."
                                                    "local_crops_scale]", group=AUGMENT, checks=[fraction_pair])
    flip_p: float = option(0.5, "horizontal flip probability [crops.horizontal_flips]", group=AUGMENT,
                           checks=[in_range(0.0, 1.0)])
    color_jitter_p: float = option(0.8, "probability of the colour jitter (0.4, 0.4, 0.2, 0.1)", group=AUGMENT,
                                   checks=[in_range(0.0, 1.0)])
    grayscale_p: float = option(0.2, "probability of turning a crop grey", group=AUGMENT,
                                checks=[in_range(0.0, 1.0)])
    global_blur_p: tuple[float, float] = option(
        (0.0, 0.9), "blur probability of the first and second global crop. The authors write GaussianBlur(p=1.0) "
        "and (p=0.1), but their class applies the blur with probability 1 - p: these are the probabilities their "
        "code runs with", group=AUGMENT, checks=[probability_pair])
    local_blur_p: float = option(0.5, "blur probability of a local crop (their p=0.5, applied with 1 - 0.5)",
                                 group=AUGMENT, checks=[in_range(0.0, 1.0)])
    blur_sigma: tuple[float, float] = option((0.1, 2.0), "range of the Gaussian blur's sigma", group=AUGMENT,
                                             checks=[positive_pair])
    blur_kernel_size: int = option(9, "taps of the blur (the authors' 9; 0: 2 ceil(3 sigma) + 1 per crop)",
                                   group=AUGMENT, checks=[odd_or_zero])
    solarize_p: float = option(0.2, "solarisation probability of the second global crop", group=AUGMENT,
                               checks=[in_range(0.0, 1.0)])

    # Gram anchoring [gram.*]: the Gram loss of the student's global patch features against those of the Gram
    # teacher, a frozen copy of the EMA teacher's backbone (fastssl.train.gram_anchor).
    gram_use_loss: bool = option(False, "add the Gram loss [gram.use_loss]",
                                 group=GRAM)
    gram_loss_weight: float = option(1.0, "weight of the Gram loss [gram.loss_weight]", group=GRAM,
                                     checks=[at_least(0.0)])
    gram_it_load_ema_teacher: int = option(-1, "iteration before which the EMA teacher is copied into the Gram "
                                           "teacher (needed, >= 0, with --gram-use-loss: there is no --gram-ckpt) "
                                           "[gram.it_load_ema_teacher]", group=GRAM,
                                           checks=[at_least(-1)])
    gram_rep_update: bool = option(True, "replace the Gram teacher by the EMA teacher after every iteration it with "
                                   "it + 1 >= --gram-it-first-update and it + 1 a multiple of --gram-update-frequency "
                                   "[gram.rep_update]", group=GRAM)
    gram_update_frequency: int = option(50000, "iterations between replacements [gram.update_frequency]", group=GRAM,
                                        checks=[at_least(1)])
    gram_it_first_update: int = option(0, "no replacement before this iteration [gram.it_first_update]", group=GRAM,
                                       checks=[at_least(0)])
    gram_max_updates: int | None = option(None, "at most this many replacements (default: no limit) "
                                          "[gram.max_updates]", group=GRAM, checks=[at_least(0)])
    gram_normalized: bool = option(True, "L2-normalise the patch features before their Gram matrices "
                                   "[gram.normalized]", group=GRAM)
    gram_img_level: bool = option(False, "a Gram matrix per image (false: one over the local batch's patches) "
                                  "[gram.img_level]", group=GRAM)
    gram_remove_neg: bool = option(False, "zero the negative similarities of both matrices [gram.remove_neg]",
                                   group=GRAM)
    gram_remove_only_teacher_neg: bool = option(False, "zero the teacher's negative similarities (and the "
                                                "student's where both are negative) [gram.remove_only_teacher_neg]",
                                                group=GRAM)
    gram_tokens_used: Literal["all", "masked", "unmasked"] = option(
        "all", "the patches compared: all, or those iBOT masks (masked) or not (unmasked; both need "
        "--gram-img-level false) [gram.tokens_used]", group=GRAM)
    gram_global_teacher_resize_method: Literal["bicubic", "bilinear", "nearest", "area"] = option(
        "bicubic", "resize of the Gram teacher's patch grid to the student's, where they differ "
        "[gram.global_teacher_resize_method]", group=GRAM)
    gram_global_teacher_resize_antialias: bool = option(False, "antialias that resize [gram."
                                                        "global_teacher_resize_antialias]", group=GRAM)
    gram_teacher_crops_size: int | None = option(None, "side of the Gram teacher's crops: the global crops' boxes "
                                                 "and flips at this size, without colour distortions (the authors' "
                                                 "gram_teacher_no_distortions; default: the Gram teacher sees the "
                                                 "global crops themselves) [crops.gram_teacher_crops_size]",
                                                 group=GRAM, checks=[at_least(1)])
    gram_loss_weight_schedule: bool = option(False, "weight the Gram loss on a schedule instead of --gram-loss-weight: "
                                             "linear from --gram-loss-weight-start towards --gram-loss-weight-peak "
                                             "over the warm-up epochs, a cosine to --gram-loss-weight-end, then "
                                             "constant [gram.loss_weight_schedule]", group=GRAM)
    gram_loss_weight_start: float = option(0.0, "the schedule's first weight [gram.loss_weight_schedule.start]",
                                           group=GRAM, checks=[at_least(0.0)])
    gram_loss_weight_peak: float = option(0.0, "the weight the warm-up leads to [gram.loss_weight_schedule.peak]",
                                          group=GRAM, checks=[at_least(0.0)])
    gram_loss_weight_end: float = option(2.0, "the cosine's last weight [gram.loss_weight_schedule.end]", group=GRAM,
                                         checks=[at_least(0.0)])
    gram_loss_weight_warmup_epochs: int = option(0, "epochs of the schedule's linear warm-up [gram."
                                                 "loss_weight_schedule.warmup_epochs]", group=GRAM,
                                                 checks=[at_least(0)])
    gram_loss_weight_cosine_epochs: int | None = option(None, "epochs of its cosine (default: the rest) [gram."
                                                        "loss_weight_schedule.cosine_epochs]", group=GRAM,
                                                        checks=[at_least(0)])

    # k-NN evaluation of the teacher during and after training (knn_k, knn_t, ...: KnnOptions).
    knn_freq: int = option(0, "evaluate the teacher's CLS token by k-NN every this many epochs (0: only after the "
                           "last): the held-out digits with --data digits (and the network at its random "
                           "initialisation after the last epoch), else --knn-data / --knn-val-data when given",
                           group=KNN, checks=[at_least(0)], resumable=True)
    knn_data: str | None = option(None, "labelled ImageFolder: the k-NN bank", group=KNN, checks=[not_empty],
                                  resumable=True)
    knn_val_data: str | None = option(None, "labelled ImageFolder to classify", group=KNN, checks=[not_empty],
                                      resumable=True)

    def check(self) -> None:
        super().check()
        from .models import is_vit_name

        for name in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
            if getattr(self, name) > self.epochs:
                raise self.fail(name, f"must be at most --epochs {self.epochs}")
        if not is_vit_name(self.arch):
            raise self.fail("arch", "must be a ViT (the mask token replaces patch embeddings)")
        if self.n_storage_tokens is not None and "dinov3" not in self.arch:
            raise self.fail("n_storage_tokens", f"applies to the *_dinov3 archs only, not to --arch {self.arch}")
        if not self.ibot_separate_head and self.ibot_out_dim != self.dino_out_dim:
            raise self.fail("ibot_out_dim", f"must equal --dino-out-dim {self.dino_out_dim} with a shared head "
                            "(--ibot-separate-head false)")
        if not self.koleo_loss_distributed:
            for name, unset in (("koleo_topk", 1), ("koleo_loss_group_size", None)):
                if getattr(self, name) != unset:
                    raise self.fail(name, "applies to the distributed KoLeo only (--koleo-loss-distributed)")
        if (self.knn_data is None) != (self.knn_val_data is None):
            raise ConfigError("--knn-data and --knn-val-data go together (the labelled bank and the images to "
                              "classify)")
        if self.knn_freq and self.data != "digits" and self.knn_data is None:
            raise self.fail("knn_freq", "needs --knn-data and --knn-val-data (or --data digits)")
        if self.fsdp and self.precision == "fp16":
            raise self.fail("precision", "fp16 is not supported with --fsdp (the grad scaler would check each "
                            "rank's gradient shards for overflow on their own): use bf16")
        if self.fsdp and self.change_world_size:
            raise self.fail("change_world_size", "cannot resume a sharded checkpoint (--fsdp): it resumes on the "
                            "same number of processes")
        if self.activation_checkpointing and not self.fsdp:
            raise self.fail("activation_checkpointing", "needs --fsdp")
        if self.gram_use_loss:
            if self.gram_it_load_ema_teacher < 0:
                raise self.fail("gram_it_load_ema_teacher", "must be >= 0 with --gram-use-loss (the Gram teacher is "
                                "loaded from the EMA teacher; there is no --gram-ckpt)")
            if self.fsdp:
                raise self.fail("fsdp", "is not supported with --gram-use-loss yet (the Gram teacher is not sharded)")
        if self.gram_loss_weight_schedule and self.gram_loss_weight_warmup_epochs + (
                self.gram_loss_weight_cosine_epochs or 0) > self.epochs:
            raise self.fail("gram_loss_weight_warmup_epochs", "and --gram-loss-weight-cosine-epochs must fit in "
                            f"--epochs {self.epochs}")
        if self.gram_tokens_used != "all" and self.gram_img_level:
            raise self.fail("gram_tokens_used", "masked or unmasked needs --gram-img-level false")
        if self.gram_remove_neg and self.gram_remove_only_teacher_neg:
            raise self.fail("gram_remove_only_teacher_neg", "and --gram-remove-neg exclude each other")
        if self.change_world_size:
            raise self.fail("change_world_size", "is not supported by dinov3 yet: resume on the same number of "
                            "processes")

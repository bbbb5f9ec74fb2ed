"""Every option of ``fastssl-train dino``: the DINO authors' ``main_dino.py`` arguments, their defaults.

Read with :mod:`fastssl.train.config` (how an option is declared) and ``presets.py`` (the authors'
recipes as instances of :class:`DinoConfig`).
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
    vit_only,
)
from .errors import ConfigError

__all__ = ["DinoConfig"]

MODEL = "model"
DINO = "DINO"
AUGMENT = "multi-crop augmentation (on the GPU)"


@dataclass(frozen=True)
class DinoConfig(KnnOptions, RunConfig):
    """DINO training (Caron et al. 2021): the authors' defaults, the vanilla 100-epoch ViT-S/16 run."""

    command: ClassVar[str] = "dino"
    group_order: ClassVar[tuple[str, ...]] = (RUN, MODEL, DINO, OPTIM, AUGMENT, KNN)

    output_dir: str = option("runs/dino", "the run folder: checkpoints, config.json and log.jsonl; a run resumes "
                             "from its checkpoint.pth", group=RUN, checks=[not_empty], resumable=True)
    fsdp: bool = option(False, "shard the student and the teacher with FSDP2 instead of DDP (a ViT: fully_shard per "
                        "transformer block, on the head and on the root; with --precision bf16 parameters "
                        "gathered in bf16, gradients reduced in fp32; --compile compiles each block): "
                        "checkpoints are then the folder OUTPUT_DIR/checkpoint (torch.distributed.checkpoint), "
                        "resumed on the same number of processes", group=RUN)
    activation_checkpointing: bool = option(False, "recompute each transformer block's activations in the "
                                            "backward pass (with --fsdp): less memory, one more forward",
                                            group=RUN)

    # The networks.
    arch: str = option("vit_small_patch16_224", "timm backbone name (vit_small_patch16_224, vit_base_patch16_224, "
                       "resnet50, ...) or vit_digits", group=MODEL, checks=[known_arch])
    patch_size: int | None = option(None, "ViT patch size (default: the arch's)", group=MODEL, checks=[at_least(1)])
    img_size: int | None = option(None, "ViT position-embedding grid in pixels (default: the arch's; other sizes "
                                  "interpolate it)", group=MODEL, checks=[at_least(1)])
    drop_path_rate: float = option(0.1, "stochastic depth rate", group=MODEL, checks=[in_range(0.0, 1.0, hi_open=True)])
    out_dim: int = option(65536, "dimension of the DINO head output; large values (65536) for complex data",
                          group=MODEL, checks=[at_least(1)])
    norm_last_layer: bool = option(True, "keep the weight norm of the head's last layer at 1: more stable; false "
                                   "gives better ViT-S results when training is stable", group=MODEL)
    use_bn_in_head: bool = option(False, "BatchNorm in the head's MLP (SyncBatchNorm under torchrun on GPUs)",
                                  group=MODEL)
    head_layers: int = option(3, "layers of the head's MLP", group=MODEL, checks=[at_least(1)])
    head_hidden_dim: int = option(2048, "hidden width of the head", group=MODEL, checks=[at_least(1)])
    head_bottleneck_dim: int = option(256, "bottleneck width (L2-normalised) before the last layer", group=MODEL,
                                      checks=[at_least(1)])

    # The DINO loss and teacher.
    momentum_teacher: float = option(0.996, "base EMA momentum of the teacher, cosine to 1 over training; 0.9995 "
                                     "for small batches", group=DINO, checks=[in_range(0.0, 1.0)])
    warmup_teacher_temp: float = option(0.04, "initial teacher temperature; lower it if training is unstable",
                                        group=DINO, checks=[positive])
    teacher_temp: float = option(0.04, "teacher temperature after the warm-up; above 0.07 training tends to be "
                                 "unstable", group=DINO, checks=[positive])
    warmup_teacher_temp_epochs: int = option(0, "epochs of linear teacher-temperature warm-up", group=DINO,
                                             checks=[at_least(0)])
    student_temp: float = option(0.1, "student temperature", group=DINO, checks=[positive])
    center_momentum: float = option(0.9, "EMA momentum of the teacher-output center", group=DINO,
                                    checks=[in_range(0.0, 1.0)])

    # Optimisation (epochs and batch_size_per_gpu: RunConfig).
    optimizer: Literal["adamw", "sgd"] = option("adamw", "adamw for ViTs, sgd for convnets", group=OPTIM)
    lr: float = option(0.0005, "peak learning rate for a batch of 256, scaled linearly by the total batch size",
                       group=OPTIM, checks=[positive])
    min_lr: float = option(1e-6, "learning rate at the end of the cosine (not scaled; at most the scaled peak)",
                           group=OPTIM, checks=[at_least(0.0)])
    warmup_epochs: int = option(10, "epochs of linear lr warm-up", group=OPTIM, checks=[at_least(0)])
    weight_decay: float = option(0.04, "initial weight decay", group=OPTIM, checks=[at_least(0.0)])
    weight_decay_end: float = option(0.4, "final weight decay (cosine); the authors found a rising decay helps ViTs",
                                     group=OPTIM, checks=[at_least(0.0)])
    clip_grad: float = option(3.0, "maximal gradient norm (0: no clipping); 0.3 to 1.0 helps big ViTs", group=OPTIM,
                              checks=[at_least(0.0)])
    clip_mode: Literal["per_param", "global"] = option(
        "per_param", "per_param: each parameter's gradient on its own (the authors); global: all together",
        group=OPTIM)
    freeze_last_layer: int = option(1, "epochs during which the head's last layer is not updated (helps early "
                                    "training)", group=OPTIM, checks=[at_least(0)])

    # The multi-crop augmentation.
    global_crop_size: int = option(224, "side of the global crops", group=AUGMENT, checks=[at_least(1)])
    local_crop_size: int = option(96, "side of the local crops", group=AUGMENT, checks=[at_least(1)])
    global_crops_scale: tuple[float, float] = option((0.4, 1.0), "area range of the 2 global crops, as a fraction "
                                                     "of the image", group=AUGMENT, checks=[fraction_pair])
    local_crops_number: int = option(8, "local crops per image (0: global crops only)", group=AUGMENT,
                                     checks=[at_least(0)])
    local_crops_scale: tuple[float, float] = option((0.05, 0.4), "area range of the local crops; its upper end "
                                                    "should be the global range's lower end", group=AUGMENT,
                                                    checks=[fraction_pair])
    flip_p: float = option(0.5, "horizontal flip probability", group=AUGMENT, checks=[in_range(0.0, 1.0)])
    color_jitter_p: float = option(0.8, "probability of the colour jitter (0.4, 0.4, 0.2, 0.1)", group=AUGMENT,
                                   checks=[in_range(0.0, 1.0)])
    blur_sigma: tuple[float, float] = option((0.1, 2.0), "range of the Gaussian blur's sigma", group=AUGMENT,
                                             checks=[positive_pair])
    solarize_p: float = option(0.2, "solarisation probability of the second global crop", group=AUGMENT,
                               checks=[in_range(0.0, 1.0)])

    # k-NN evaluation of the teacher during training (knn_k, knn_t, ...: KnnOptions).
    knn_freq: int = option(0, "evaluate the teacher by k-NN every this many epochs and at the end (0: never); with "
                           "--data digits the held-out digits, else --knn-data / --knn-val-data", group=KNN,
                           checks=[at_least(0)], resumable=True)
    knn_data: str | None = option(None, "labelled ImageFolder: the k-NN bank", group=KNN, checks=[not_empty],
                                  resumable=True)
    knn_val_data: str | None = option(None, "labelled ImageFolder to classify", group=KNN, checks=[not_empty],
                                      resumable=True)

    def check(self) -> None:
        super().check()
        for name in ("warmup_epochs", "warmup_teacher_temp_epochs"):
            if getattr(self, name) > self.epochs:
                raise self.fail(name, f"must be at most --epochs {self.epochs}")
        if (self.knn_data is None) != (self.knn_val_data is None):
            raise ConfigError("--knn-data and --knn-val-data go together (the labelled bank and the images to "
                              "classify)")
        if self.knn_freq and self.data != "digits" and self.knn_data is None:
            raise self.fail("knn_freq", "needs --knn-data and --knn-val-data (or --data digits)")
        vit_only(self, self.arch, img_size=self.img_size, patch_size=self.patch_size)
        if self.fsdp:
            from .models import is_vit_name

            if not is_vit_name(self.arch):
                raise self.fail("fsdp", f"shards a ViT's transformer blocks, not --arch {self.arch}")
            if self.precision == "fp16":
                raise self.fail("precision", "fp16 is not supported with --fsdp (the grad scaler would check each "
                                "rank's gradient shards for overflow on their own): use bf16")
            if self.change_world_size:
                raise self.fail("change_world_size", "cannot resume a sharded checkpoint (--fsdp): it resumes on "
                                "the same number of processes")
        if self.activation_checkpointing and not self.fsdp:
            raise self.fail("activation_checkpointing", "needs --fsdp")

"""Every option of ``fastssl-train paws``: the PAWS authors' ImageNet config (suncet
``configs/paws/imgnt_train.yaml``), its values; learning rates per 256 unlabelled images.

Read with :mod:`fastssl.train.config` (how an option is declared) and ``presets.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .config import (
    OPTIM,
    RUN,
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

__all__ = ["PawsConfig"]

LABELLED = "labelled data"
MODEL = "model"
PAWS = "PAWS"
AUGMENT = "multi-crop augmentation (on the GPU)"
SNN = "soft nearest-neighbour evaluation"


@dataclass(frozen=True)
class PawsConfig(RunConfig):
    """PAWS training (Assran et al. 2021): the authors' ImageNet recipe, 100 epochs of a ResNet-50."""

    command: ClassVar[str] = "paws"
    group_order: ClassVar[tuple[str, ...]] = (RUN, LABELLED, MODEL, PAWS, OPTIM, AUGMENT, SNN)

    output_dir: str = option("runs/paws", "the run folder: checkpoints, config.json and log.jsonl; a run resumes "
                             "from its checkpoint.pth", group=RUN, checks=[not_empty], resumable=True)

    # Which images carry labels.
    labelled_data: str | None = option(None, "ImageFolder of the labelled images (default: --data, whose class "
                                       "folders are the labels)", group=LABELLED, checks=[not_empty])
    labelled_list: str | None = option(None, "file of labelled image names, one per line (the authors' "
                                       "imagenet_subsets/1percent.txt, 10percent.txt); default: every image of the "
                                       "labelled folder", group=LABELLED, checks=[not_empty])
    labels_per_class: int | None = option(None, "instead of a list: label this many images of each class (seeded "
                                          "draw)", group=LABELLED, checks=[at_least(1)])
    val_data: str | None = option(None, "labelled ImageFolder classified by soft nearest neighbours after each "
                                  "epoch (digits: the held-out digits)", group=LABELLED, checks=[not_empty],
                                  resumable=True)

    # The encoder.
    arch: str = option("resnet50", "timm backbone name (resnet50, vit_small_patch16_224, ...) or vit_digits",
                       group=MODEL, checks=[known_arch])
    patch_size: int | None = option(None, "ViT patch size (default: the arch's)", group=MODEL, checks=[at_least(1)])
    img_size: int | None = option(None, "ViT position-embedding grid in pixels (default: the arch's)", group=MODEL,
                                  checks=[at_least(1)])
    drop_path_rate: float = option(0.0, "stochastic depth rate", group=MODEL, checks=[in_range(0.0, 1.0, hi_open=True)])
    output_dim: int = option(2048, "width of the projection output", group=MODEL, checks=[at_least(1)])
    hidden_dim: int | None = option(None, "width of the projection head's hidden layers (default: the backbone's "
                                    "feature width)", group=MODEL, checks=[at_least(1)])
    use_pred_head: bool = option(True, "a prediction head on top of the projection (anchors use it, targets do "
                                 "not)", group=MODEL)

    # The PAWS loss and its support batches.
    temperature: float = option(0.1, "tau of the soft nearest-neighbour classifier", group=PAWS, checks=[positive])
    sharpen: float = option(0.25, "T of the target sharpening p**(1/T)", group=PAWS, checks=[positive])
    me_max: bool = option(True, "add the mean-entropy maximisation regulariser", group=PAWS)
    label_smoothing: float = option(0.1, "smoothing of the supports' one-hot labels", group=PAWS,
                                    checks=[in_range(0.0, 1.0, hi_open=True)])
    classes_per_batch: int = option(15, "classes in each process's support batch", group=PAWS, checks=[at_least(1)])
    supervised_imgs_per_class: int = option(7, "labelled images of each of those classes per support batch",
                                            group=PAWS, checks=[at_least(1)])
    supervised_views: int = option(1, "augmented views of each support image", group=PAWS, checks=[at_least(1)])
    unique_classes_per_rank: bool = option(True, "each process draws different classes (the support set spans "
                                           "classes x processes)", group=PAWS)

    # LARS over momentum SGD (epochs: RunConfig).
    batch_size_per_gpu: int = option(64, "unlabelled images per process and step", group=OPTIM, checks=[at_least(1)])
    lr: float = option(0.4, "peak learning rate per 256 unlabelled images, scaled by the total batch (the authors' "
                       "6.4 at 64 x 64 images)", group=OPTIM, checks=[positive])
    start_lr: float = option(0.01875, "learning rate (per 256 images) where the warm-up starts", group=OPTIM,
                             checks=[at_least(0.0)])
    final_lr: float = option(0.004, "learning rate (per 256 images) at the end of the cosine, at most --lr",
                             group=OPTIM, checks=[at_least(0.0)])
    warmup_epochs: int = option(10, "epochs of linear lr warm-up", group=OPTIM, checks=[at_least(0)])
    weight_decay: float = option(1e-6, "weight decay of the weights", group=OPTIM, checks=[at_least(0.0)])
    momentum: float = option(0.9, "SGD momentum", group=OPTIM, checks=[in_range(0.0, 1.0, hi_open=True)])
    nesterov: bool = option(False, "Nesterov momentum", group=OPTIM)
    lars_trust: float = option(0.001, "LARS trust coefficient", group=OPTIM, checks=[positive])
    clip_grad: float = option(0.0, "maximal gradient norm (0: no clipping, as the authors)", group=OPTIM,
                              checks=[at_least(0.0)])
    clip_mode: Literal["per_param", "global"] = option(
        "per_param", "per_param: each parameter's gradient on its own; global: all together", group=OPTIM)

    # The views, made on the device.
    global_crop_size: int = option(224, "side of the 2 global views and of the support views", group=AUGMENT,
                                   checks=[at_least(1)])
    local_crop_size: int = option(96, "side of the small views", group=AUGMENT, checks=[at_least(1)])
    global_crops_scale: tuple[float, float] = option((0.14, 1.0), "area range of the global and support views",
                                                     group=AUGMENT, checks=[fraction_pair])
    multicrop: int = option(6, "small views per unlabelled image (0: none)", group=AUGMENT, checks=[at_least(0)])
    local_crops_scale: tuple[float, float] = option((0.05, 0.14), "area range of the small views", group=AUGMENT,
                                                    checks=[fraction_pair])
    flip_p: float = option(0.5, "horizontal flip probability", group=AUGMENT, checks=[in_range(0.0, 1.0)])
    color_jitter_strength: float = option(1.0, "s of the colour distortion: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) "
                                          "(hue's range ends at 0.5: s <= 2.5)", group=AUGMENT,
                                          checks=[in_range(0.0, 2.5)])
    color_jitter_p: float = option(0.8, "probability of the colour jitter", group=AUGMENT,
                                   checks=[in_range(0.0, 1.0)])
    grayscale_p: float = option(0.2, "probability of grayscale", group=AUGMENT, checks=[in_range(0.0, 1.0)])
    blur_p: float = option(0.5, "probability of the Gaussian blur", group=AUGMENT, checks=[in_range(0.0, 1.0)])
    blur_sigma: tuple[float, float] = option((0.1, 2.0), "range of the Gaussian blur's sigma", group=AUGMENT,
                                             checks=[positive_pair])

    # Soft nearest-neighbour evaluation after each epoch.
    snn_freq: int = option(1, "evaluate every this many epochs and at the end (0: never); needs --val-data or "
                           "digits", group=SNN, checks=[at_least(0)], resumable=True)
    snn_tau: float = option(0.1, "temperature of the evaluation", group=SNN, checks=[positive], resumable=True)
    eval_batch_size: int = option(128, "images per forward pass", group=SNN, checks=[at_least(1)], resumable=True)
    eval_crop_fraction: float = option(0.875, "central crop (fraction of the short side) resized to the global crop "
                                       "size: 224/256", group=SNN, checks=[in_range(0.0, 1.0), positive],
                                       resumable=True)

    def check(self) -> None:
        super().check()
        if self.labelled_list is not None and self.labels_per_class is not None:
            raise ConfigError("give either --labelled-list or --labels-per-class, not both")
        if self.warmup_epochs > self.epochs:
            raise self.fail("warmup_epochs", f"must be at most --epochs {self.epochs}")
        if self.final_lr > self.lr:
            raise self.fail("final_lr", f"must be at most --lr {self.lr:g}")
        if self.nesterov and self.momentum == 0:
            raise self.fail("nesterov", "needs --momentum > 0")
        vit_only(self, self.arch, img_size=self.img_size, patch_size=self.patch_size)

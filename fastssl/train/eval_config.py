"""The options of the evaluation commands: ``fastssl-train knn`` and ``fastssl-train attention``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .config import KNN, KnnOptions, Options, at_least, in_range, known_arch, not_empty, option, positive, vit_only
from .errors import ConfigError

__all__ = ["AttentionConfig", "ExportConfig", "KnnCommandConfig"]

WHAT = "what to evaluate"


@dataclass(frozen=True)
class KnnCommandConfig(KnnOptions):
    """k-NN evaluation of a checkpoint's network, as the DINO authors' eval_knn.py."""

    command: ClassVar[str] = "knn"
    group_order: ClassVar[tuple[str, ...]] = (WHAT, KNN)

    checkpoint: str = option("", "a fastssl-train checkpoint (DINO or PAWS), or the DINO or PAWS authors' (give "
                             "--arch)", group=WHAT, checks=[not_empty], required=True)
    which: Literal["teacher", "student"] = option("teacher", "network to evaluate", group=WHAT)
    data: str = option("", "labelled ImageFolder (the bank), or 'digits'", group=WHAT, checks=[not_empty],
                       required=True)
    val_data: str | None = option(None, "labelled ImageFolder to classify (required with a folder --data)",
                                  group=WHAT, checks=[not_empty])
    arch: str | None = option(None, "backbone, for checkpoints without a fastssl config", group=WHAT,
                              checks=[known_arch])
    patch_size: int | None = option(None, "ViT patch size, as --arch", group=WHAT, checks=[at_least(1)])
    global_crop_size: int | None = option(None, "evaluation crop side (default: the checkpoint's global crop size, "
                                          "else 224)", group=WHAT, flag="--image-size", checks=[at_least(1)])
    device: Literal["auto", "cuda", "cpu"] = option("auto", "auto: the GPU when there is one", group=WHAT)
    num_workers: int = option(8, "data loading workers", group=WHAT, checks=[at_least(0)])

    def check(self) -> None:
        super().check()
        if self.data != "digits" and self.val_data is None:
            raise ConfigError("--val-data (the labelled images to classify) is required with a folder --data")
        if self.arch is not None:
            vit_only(self, self.arch, patch_size=self.patch_size)


@dataclass(frozen=True)
class AttentionConfig(Options):
    """The last block's CLS self-attention of a ViT checkpoint, as PNGs."""

    command: ClassVar[str] = "attention"

    checkpoint: str = option("", "a fastssl-train checkpoint (DINO or PAWS), or the DINO or PAWS authors' (give "
                             "--arch)", group=WHAT, checks=[not_empty], required=True)
    which: Literal["teacher", "student"] = option("teacher", "network to show", group=WHAT)
    image: str = option("", "image file, or 'digits:N' for test digit N", group=WHAT, checks=[not_empty],
                        required=True)
    output_dir: str = option("attention", "where the PNGs go (image.png, attn-head<h>.png, mask-head<h>.png, "
                             "attn-mean.png: files of these names there are replaced)", group=WHAT,
                             checks=[not_empty])
    image_size: int | None = option(None, "side the image is resized to (default: the checkpoint's global crop "
                                    "size; 224 for the authors' checkpoints)", group=WHAT, checks=[at_least(1)])
    threshold: float = option(0.6, "masks keep the patches holding this share of each head's attention mass",
                              group=WHAT, checks=[in_range(0.0, 1.0), positive])
    arch: str | None = option(None, "backbone, for checkpoints without a fastssl config", group=WHAT,
                              checks=[known_arch])
    patch_size: int | None = option(None, "ViT patch size, as --arch", group=WHAT, checks=[at_least(1)])

    def check(self) -> None:
        super().check()
        if self.image.startswith("digits:") and not self.image.removeprefix("digits:").isdigit():
            raise self.fail("image", "must be an image file or digits:N with N a test digit's index")
        if self.arch is not None:
            vit_only(self, self.arch, patch_size=self.patch_size)


@dataclass(frozen=True)
class ExportConfig(Options):
    """A checkpoint's backbone as a safetensors file that timm loads, with the arguments to build it."""

    command: ClassVar[str] = "export"

    checkpoint: str = option("", "a fastssl-train checkpoint (DINO, DINOv3 or PAWS), or the DINO authors' (give "
                             "--arch)", group=WHAT, checks=[not_empty], required=True)
    which: Literal["teacher", "student"] = option("teacher", "network to export (DINO and DINOv3 runs)", group=WHAT)
    output: str = option("", "the safetensors file to write; its timm arguments go beside it, with the suffix "
                         ".json", group=WHAT, checks=[not_empty], required=True)
    consolidated: str | None = option(None, "with an FSDP2 run's sharded checkpoint folder: also write its whole "
                                      "state consolidated into this single file (full tensors, read by knn, "
                                      "attention and export)", group=WHAT, checks=[not_empty])
    overwrite: bool = option(False, "replace existing output files (without it, an existing file is an error)",
                             group=WHAT)
    arch: str | None = option(None, "backbone, for checkpoints without a fastssl config", group=WHAT,
                              checks=[known_arch])
    patch_size: int | None = option(None, "ViT patch size, as --arch", group=WHAT, checks=[at_least(1)])

    def check(self) -> None:
        super().check()
        if not self.output.endswith(".safetensors"):
            raise self.fail("output", "must name a .safetensors file")
        if self.arch is not None:
            vit_only(self, self.arch, patch_size=self.patch_size)

"""Named configurations: the DINO and PAWS authors' recipes, and small runs on the digits.

Each preset is a config instance; what it sets apart from the class defaults (the authors'
main_dino.py / imgnt_train.yaml) becomes the defaults of a command line naming it, and the options
given there override them. Values from the authors' READMEs (and the ``args.txt`` of their released
runs); the type check of ``make lint`` checks every name and type here.
"""

from __future__ import annotations

import dataclasses

from .dino_config import DinoConfig
from .dinov3_config import Dinov3Config
from .paws_config import PawsConfig

__all__ = ["DINOV3_PRESETS", "DINO_PRESETS", "PAWS_PRESETS"]

DINO_PRESETS: dict[str, DinoConfig] = {
    # main_dino.py's defaults: the README's "vanilla" 100-epoch ViT-S/16 run (8 GPUs x 64 images).
    "dino_vits16_100ep": DinoConfig(arch="vit_small_patch16_224", epochs=100),
    # README, "boosting DINO performance": 300 epochs, 16 GPUs x 64, teacher temperature 0.04 -> 0.07
    # over 30 epochs, trainable last-layer norms.
    "dino_vits16": DinoConfig(
        arch="vit_small_patch16_224", epochs=300, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
        norm_last_layer=False),
    # The released ViT-B/16 run (args.txt): 400 epochs, 1024 images per step (32 GPUs x 32).
    "dino_vitb16": DinoConfig(
        arch="vit_base_patch16_224", epochs=400, batch_size_per_gpu=32, lr=0.00075, min_lr=2e-6, teacher_temp=0.07,
        warmup_teacher_temp_epochs=50, clip_grad=0.3, freeze_last_layer=3, global_crops_scale=(0.25, 1.0),
        local_crops_scale=(0.05, 0.25), local_crops_number=10, norm_last_layer=True, precision="bf16"),
    # README, ResNet-50: SGD, the crop scales split at 0.14.
    "dino_resnet50": DinoConfig(
        arch="resnet50", optimizer="sgd", lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4,
        global_crops_scale=(0.14, 1.0), local_crops_scale=(0.05, 0.14)),
    # `make demo` on a CPU: the 1437 training digits of scikit-learn (32x32), a 4-block ViT on 16x16
    # crops of 4x4 patches, k-NN on the teacher's CLS token (eval_knn.py's feature, k=20, T=0.07).
    # Against the collapse to uniform outputs that the authors' values give at this scale: a
    # BatchNorm'd head, a teacher close behind the student (momentum 0.99: 0.98 and 0.996 did worse
    # over 550 steps), out_dim 256 (1024 did worse), 10 large local crops (a digit's 5% is a blank
    # corner; smaller crops did worse), and lr 0.016 per 256 images (the earlier 0.002 with flips, jitter
    # and 6 local crops stayed near ln(out_dim)). No flips (a mirrored digit is another symbol or none),
    # no colour jitter (its brightness/contrast part gave +3 k-NN points over 25 epochs but ~15% more
    # time), no solarisation, a light blur. 1100 steps: about 5.5 min on 2 CPU cores with the k-NN.
    "demo": DinoConfig(
        data="digits", arch="vit_digits", img_size=16, global_crop_size=16, local_crop_size=8, local_crops_number=10,
        global_crops_scale=(0.5, 1.0), local_crops_scale=(0.2, 0.5), flip_p=0.0, color_jitter_p=0.0,
        blur_sigma=(0.1, 0.3), solarize_p=0.0, out_dim=256, head_hidden_dim=512, head_bottleneck_dim=128,
        use_bn_in_head=True, norm_last_layer=False, momentum_teacher=0.99, teacher_temp=0.04,
        warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0, batch_size_per_gpu=64, lr=0.016, min_lr=1e-5,
        warmup_epochs=5, epochs=50, drop_path_rate=0.1, num_workers=0, knn_freq=0, eval_crop_fraction=1.0,
        saveckp_freq=0),
    # `make demo` on a GPU: the same data, a wider and deeper ViT on 32x32 crops, longer.
    "demo_gpu": DinoConfig(
        data="digits", arch="vit_digits", img_size=32, global_crop_size=32, local_crop_size=16, local_crops_number=8,
        global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), blur_sigma=(0.1, 1.0), out_dim=4096,
        head_hidden_dim=1024, head_bottleneck_dim=256, use_bn_in_head=True, norm_last_layer=False,
        momentum_teacher=0.99, teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0,
        batch_size_per_gpu=128, lr=0.002, min_lr=1e-5, warmup_epochs=5, epochs=100, drop_path_rate=0.1,
        num_workers=0, knn_freq=0, eval_crop_fraction=1.0, saveckp_freq=0),
}


# PAWS (facebookresearch/suncet, configs/paws/imgnt_train.yaml; PawsConfig's defaults are that file's values).
# Their runs: 64 GPUs x 64 unlabelled images, 15 classes x 7 images of supports per GPU, ResNet-50,
# output 2048 with the prediction head, 6 small views; learning rates here are per 256 images.
PAWS_PRESETS: dict[str, PawsConfig] = {
    # The 100-epoch ResNet-50 run, for 1% or 10% of the labels (--labelled-list 1percent.txt / 10percent.txt:
    # the recipe is the same, only the labelled list differs).
    "paws_resnet50": PawsConfig(arch="resnet50", epochs=100),
    # The paper's longer run.
    "paws_resnet50_300ep": PawsConfig(arch="resnet50", epochs=300),
    # A PAWS run on the digits for a CPU: 5 labelled images per class, the demo's small ViT. The optimiser
    # is the authors' CIFAR-10 one (lr 3.2 per 256 images, from 0.8, to 0.032; 2 views per support, no
    # prediction head): their ImageNet lr of 0.4 per 256 barely moves LARS in a few hundred steps.
    "paws_digits": PawsConfig(
        data="digits", arch="vit_digits", img_size=16, global_crop_size=16, local_crop_size=8, multicrop=6,
        global_crops_scale=(0.5, 1.0), local_crops_scale=(0.2, 0.5), flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0,
        blur_sigma=(0.1, 0.3), output_dim=128, hidden_dim=256, use_pred_head=False, labels_per_class=5,
        classes_per_batch=10, supervised_imgs_per_class=5, supervised_views=2, batch_size_per_gpu=64, epochs=30,
        lr=3.2, start_lr=0.8, final_lr=0.032, warmup_epochs=3, num_workers=0, eval_crop_fraction=1.0,
        output_dir="runs/paws_digits", saveckp_freq=0),
}


# DINOv3 (facebookresearch/dinov3; Dinov3Config's defaults are vitl_im1k_lin834.yaml's values). What each
# needs: the global batch of the recipe (its lr and Sinkhorn-Knopp / KoLeo batch statistics assume it), in
# per-GPU batches, not gradient accumulation; below it the lr follows the sqrt rule and KoLeo sees fewer
# neighbours (README, "DINOv3").
DINOV3_PRESETS: dict[str, Dinov3Config] = {
    # The authors' ViT-L/16 on ImageNet-1k (82.2 k-NN, 83.3 linear in their comment): 100 epochs of 1250
    # iterations at 2048 images (32 GPUs x 64), bf16, RoPE, no storage tokens, qkv bias (timm's _qkvb).
    "dinov3_vitl16_im1k": Dinov3Config(arch="vit_large_patch16_dinov3_qkvb", n_storage_tokens=0, precision="bf16"),
    # Derived from it, untested by the authors (they train ViT-S/B by distillation): the same recipe and
    # schedules with the smaller backbone, and stochastic depth 0.1 (DINO's and iBOT's rate for ViT-S/B;
    # 0.3 is for ViT-L).
    "dinov3_vitb16_im1k": Dinov3Config(arch="vit_base_patch16_dinov3_qkvb", n_storage_tokens=0, drop_path_rate=0.1,
                                       precision="bf16"),
    "dinov3_vits16_im1k": Dinov3Config(arch="vit_small_patch16_dinov3_qkvb", n_storage_tokens=0, drop_path_rate=0.1,
                                       precision="bf16"),
    # A CPU run on the digits: the demo's ViT (vit_digits), crops and batch, 50 passes over the 1437 training
    # digits (22 iterations each), the recipe's losses, masks, param groups and schedules. Two departures
    # from the authors' values, measured (README, "DINOv3"): with DINOv3's own head (a plain last layer
    # initialised at std 0.02, no BatchNorm) and the teacher temperature 0.04 -> 0.07, the DINO and iBOT losses
    # stay at ln(256) here and KoLeo alone moves the backbone (k-NN 66% after 10 epochs, 32% after 50); with
    # DINOv2's weight-normalised last layer, BatchNorm in the heads and the teacher at 0.04 (DINO's demo too)
    # both losses fall and the k-NN climbs to 89%.
    "dinov3_digits": Dinov3Config(
        data="digits", arch="vit_digits", img_size=16, global_crop_size=16, local_crop_size=8, local_crops_number=8,
        global_crops_scale=(0.5, 1.0), local_crops_scale=(0.2, 0.5), flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0,
        blur_sigma=(0.1, 0.3), solarize_p=0.0, dino_out_dim=256, dino_head_hidden_dim=512,
        dino_head_bottleneck_dim=128, ibot_out_dim=256, ibot_head_hidden_dim=512, ibot_head_bottleneck_dim=128,
        head_weight_norm=True, head_use_bn=True, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
        drop_path_rate=0.1, batch_size_per_gpu=64, official_epoch_length=0, epochs=50, lr=0.004, min_lr=1e-5,
        warmup_epochs=5, momentum_teacher=0.99, num_workers=0,
        eval_crop_fraction=1.0, saveckp_freq=0, output_dir="runs/dinov3_digits"),
}
# Derived from dinov3_digits (untested for accuracy): the same run with Gram anchoring over its last 10 of 50
# epochs (22 iterations each), on the pattern of the authors' ViT-7B stage (dinov3_vit7b16_gram_anchor.yaml:
# a Gram matrix per image, the weight 0 until the stage starts then a one-epoch cosine to 2.0, the Gram teacher
# replaced every update_frequency iterations from it_first_update, at most 3 times): the Gram teacher loaded
# from the EMA teacher before iteration 880 (epoch 40), replaced after iterations 989 and 1099 (every 5 epochs
# from epoch 45). The Gram teacher's crops at twice the global crops' side, without colour distortions, as
# theirs (512 against 256, gram_teacher_no_distortions).
DINOV3_PRESETS["dinov3_digits_gram"] = dataclasses.replace(
    DINOV3_PRESETS["dinov3_digits"], output_dir="runs/dinov3_digits_gram", gram_use_loss=True,
    gram_it_load_ema_teacher=880, gram_update_frequency=110, gram_it_first_update=990, gram_max_updates=3,
    gram_img_level=True, gram_teacher_crops_size=32, gram_loss_weight_schedule=True, gram_loss_weight_start=0.0,
    gram_loss_weight_peak=0.0, gram_loss_weight_end=2.0, gram_loss_weight_warmup_epochs=40,
    gram_loss_weight_cosine_epochs=1)

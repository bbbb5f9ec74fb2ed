"""``fastssl-train`` (or ``python -m fastssl.train``): DINO and PAWS training, k-NN evaluation, attention maps.

    fastssl-train dino --data /path/to/imagenet/train --preset dino_vits16 --output-dir runs/vits16
    fastssl-train paws --data /path/to/imagenet/train --labelled-list imagenet_subsets/10percent.txt \\
        --val-data /path/to/imagenet/val --preset paws_resnet50
    torchrun --nproc_per_node=8 -m fastssl.train dino --data ... --preset dino_vits16
    fastssl-train knn --checkpoint runs/vits16/checkpoint.pth --data .../train --val-data .../val
    fastssl-train attention --checkpoint runs/vits16/checkpoint.pth --image dog.jpg
    fastssl-train demo                  # `make demo`: DINO on scikit-learn's digits, then k-NN

Every hyper-parameter defaults to the authors' (DINO: main_dino.py; PAWS: their ImageNet config,
configs/paws/imgnt_train.yaml); ``--preset`` loads one of their recipes (``fastssl/train/presets.py``),
and any option given explicitly overrides it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from .presets import PAWS_PRESETS, PRESETS

__all__ = ["build_parser", "main"]


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_run_options(p: argparse.ArgumentParser, presets: dict, output_dir: str) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=sorted(presets), help="a named recipe (see fastssl/train/presets.py); "
                   "options given on the command line override its values")
    g.add_argument("--data", default=None, help="training images: an ImageFolder-style folder root/<class>/<image> "
                   "(labels unused for training), or 'digits' for scikit-learn's handwritten digits")
    g.add_argument("--output-dir", dest="output_dir", default=output_dir,
                   help="where the checkpoints, config.json and log.jsonl go; a run resumes from its checkpoint.pth")
    g.add_argument("--resume", default=None,
                   help="checkpoint to resume from (default: OUTPUT_DIR/checkpoint.pth if any)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: the GPU when there is one")
    g.add_argument("--dist-backend", dest="dist_backend", default=None,
                   help="torch.distributed backend under torchrun (default: nccl on GPUs, gloo on CPU)")
    g.add_argument("--num-workers", dest="num_workers", type=int, default=10, help="data loading workers per process")
    g.add_argument("--gpu-decode", dest="gpu_decode", type=_bool, default=True,
                   help="decode JPEGs on the GPU (torchvision's nvJPEG) when possible, else in the workers")
    g.add_argument("--digits-size", dest="digits_size", type=int, default=32,
                   help="side of the digits images (upscaled from 8x8) with --data digits")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="mixed precision: bf16 autocast, or fp16 with a grad scaler; auto = bf16 on GPUs, fp32 on CPU")
    g.add_argument("--compile", type=_bool, default=False, help="torch.compile the backbones")
    g.add_argument("--saveckp-freq", dest="saveckp_freq", type=int, default=20,
                   help="also keep checkpoint<epoch>.pth every this many epochs (0: never)")
    g.add_argument("--stop-after-steps", dest="stop_after_steps", type=int, default=None,
                   help="save a checkpoint and exit after this many iterations in all (to fit a time slot)")
    g.add_argument("--log-freq", dest="log_freq", type=int, default=10, help="iterations between log.jsonl lines")
    g.add_argument("--tensorboard", type=_bool, default=False, help="also write TensorBoard scalars")
    g.add_argument("--progress", type=_bool, default=True, help="show a progress bar per epoch")



def _add_dino_options(p: argparse.ArgumentParser) -> None:
    _add_run_options(p, PRESETS, "runs/dino")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="vit_small_patch16_224",
                   help="timm backbone name (vit_small_patch16_224, vit_base_patch16_224, resnet50, ...) or vit_digits")
    g.add_argument("--patch-size", dest="patch_size", type=int, default=None,
                   help="ViT patch size (default: the arch's)")
    g.add_argument("--img-size", dest="img_size", type=int, default=None,
                   help="ViT position-embedding grid in pixels (default: the arch's; other sizes interpolate it)")
    g.add_argument("--drop-path-rate", dest="drop_path_rate", type=float, default=0.1, help="stochastic depth rate")
    g.add_argument("--out-dim", dest="out_dim", type=int, default=65536,
                   help="dimension of the DINO head output; large values (65536) for complex data")
    g.add_argument("--norm-last-layer", dest="norm_last_layer", type=_bool, default=True,
                   help="keep the weight norm of the head's last layer at 1: more stable; false gives better ViT-S "
                        "results when training is stable")
    g.add_argument("--use-bn-in-head", dest="use_bn_in_head", type=_bool, default=False,
                   help="BatchNorm in the head's MLP (SyncBatchNorm under torchrun on GPUs)")
    g.add_argument("--head-layers", dest="head_layers", type=int, default=3, help="layers of the head's MLP")
    g.add_argument("--head-hidden-dim", dest="head_hidden_dim", type=int, default=2048, help="hidden width of the head")
    g.add_argument("--head-bottleneck-dim", dest="head_bottleneck_dim", type=int, default=256,
                   help="bottleneck width (L2-normalised) before the last layer")

    g = p.add_argument_group("DINO")
    g.add_argument("--momentum-teacher", dest="momentum_teacher", type=float, default=0.996,
                   help="base EMA momentum of the teacher, cosine to 1 over training; 0.9995 for small batches")
    g.add_argument("--warmup-teacher-temp", dest="warmup_teacher_temp", type=float, default=0.04,
                   help="initial teacher temperature; lower it if training is unstable")
    g.add_argument("--teacher-temp", dest="teacher_temp", type=float, default=0.04,
                   help="teacher temperature after the warm-up; above 0.07 training tends to be unstable")
    g.add_argument("--warmup-teacher-temp-epochs", dest="warmup_teacher_temp_epochs", type=int, default=0,
                   help="epochs of linear teacher-temperature warm-up")
    g.add_argument("--student-temp", dest="student_temp", type=float, default=0.1, help="student temperature")
    g.add_argument("--center-momentum", dest="center_momentum", type=float, default=0.9,
                   help="EMA momentum of the teacher-output center")

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="adamw for ViTs, sgd for convnets")
    g.add_argument("--batch-size-per-gpu", dest="batch_size_per_gpu", type=int, default=64,
                   help="images per process and step")
    g.add_argument("--epochs", type=int, default=100, help="training epochs")
    g.add_argument("--lr", type=float, default=0.0005,
                   help="peak learning rate for a batch of 256, scaled linearly by the total batch size")
    g.add_argument("--min-lr", dest="min_lr", type=float, default=1e-6, help="learning rate at the end (cosine)")
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=int, default=10, help="epochs of linear lr warm-up")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=0.04, help="initial weight decay")
    g.add_argument("--weight-decay-end", dest="weight_decay_end", type=float, default=0.4,
                   help="final weight decay (cosine); the authors found a rising decay helps ViTs")
    g.add_argument("--clip-grad", dest="clip_grad", type=float, default=3.0,
                   help="maximal gradient norm (0: no clipping); 0.3 to 1.0 helps big ViTs")
    g.add_argument("--clip-mode", dest="clip_mode", choices=("per_param", "global"), default="per_param",
                   help="per_param: each parameter's gradient on its own (the authors); global: all together")
    g.add_argument("--freeze-last-layer", dest="freeze_last_layer", type=int, default=1,
                   help="epochs during which the head's last layer is not updated (helps early training)")

    g = p.add_argument_group("multi-crop augmentation (on the GPU)")
    g.add_argument("--global-crop-size", dest="global_crop_size", type=int, default=224,
                   help="side of the global crops")
    g.add_argument("--local-crop-size", dest="local_crop_size", type=int, default=96, help="side of the local crops")
    g.add_argument("--global-crops-scale", dest="global_crops_scale", type=float, nargs=2, default=(0.4, 1.0),
                   help="area range of the 2 global crops, as a fraction of the image")
    g.add_argument("--local-crops-number", dest="local_crops_number", type=int, default=8,
                   help="local crops per image (0: global crops only)")
    g.add_argument("--local-crops-scale", dest="local_crops_scale", type=float, nargs=2, default=(0.05, 0.4),
                   help="area range of the local crops; its upper end should be the global range's lower end")
    g.add_argument("--flip-p", dest="flip_p", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--color-jitter-p", dest="color_jitter_p", type=float, default=0.8,
                   help="probability of the colour jitter (0.4, 0.4, 0.2, 0.1)")
    g.add_argument("--blur-sigma", dest="blur_sigma", type=float, nargs=2, default=(0.1, 2.0),
                   help="range of the Gaussian blur's sigma")
    g.add_argument("--solarize-p", dest="solarize_p", type=float, default=0.2,
                   help="solarisation probability of the second global crop")

    g = p.add_argument_group("k-NN evaluation during training")
    g.add_argument("--knn-freq", dest="knn_freq", type=int, default=0,
                   help="evaluate the teacher by k-NN every this many epochs and at the end (0: never); "
                        "with --data digits the held-out digits, else --knn-data / --knn-val-data")
    g.add_argument("--knn-data", dest="knn_data", default=None, help="labelled ImageFolder: the k-NN bank")
    g.add_argument("--knn-val-data", dest="knn_val_data", default=None, help="labelled ImageFolder to classify")
    _add_knn_params(g)


def _add_paws_options(p: argparse.ArgumentParser) -> None:
    _add_run_options(p, PAWS_PRESETS, "runs/paws")

    g = p.add_argument_group("labelled data")
    g.add_argument("--labelled-data", dest="labelled_data", default=None,
                   help="ImageFolder of the labelled images (default: --data, whose class folders are the labels)")
    g.add_argument("--labelled-list", dest="labelled_list", default=None,
                   help="file of labelled image names, one per line (the authors' imagenet_subsets/1percent.txt, "
                        "10percent.txt); default: every image of the labelled folder")
    g.add_argument("--labels-per-class", dest="labels_per_class", type=int, default=None,
                   help="instead of a list: label this many images of each class (seeded draw)")
    g.add_argument("--val-data", dest="val_data", default=None,
                   help="labelled ImageFolder classified by soft nearest neighbours after each epoch (digits: the "
                        "held-out digits)")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", help="timm backbone name (resnet50, vit_small_patch16_224, ...)")
    g.add_argument("--patch-size", dest="patch_size", type=int, default=None,
                   help="ViT patch size (default: the arch's)")
    g.add_argument("--img-size", dest="img_size", type=int, default=None,
                   help="ViT position-embedding grid in pixels (default: the arch's)")
    g.add_argument("--drop-path-rate", dest="drop_path_rate", type=float, default=0.0, help="stochastic depth rate")
    g.add_argument("--output-dim", dest="output_dim", type=int, default=2048, help="width of the projection output")
    g.add_argument("--hidden-dim", dest="hidden_dim", type=int, default=None,
                   help="width of the projection head's hidden layers (default: the backbone's feature width)")
    g.add_argument("--use-pred-head", dest="use_pred_head", type=_bool, default=True,
                   help="a prediction head on top of the projection (anchors use it, targets do not)")

    g = p.add_argument_group("PAWS")
    g.add_argument("--temperature", type=float, default=0.1, help="tau of the soft nearest-neighbour classifier")
    g.add_argument("--sharpen", type=float, default=0.25, help="T of the target sharpening p**(1/T)")
    g.add_argument("--me-max", dest="me_max", type=_bool, default=True,
                   help="add the mean-entropy maximisation regulariser")
    g.add_argument("--label-smoothing", dest="label_smoothing", type=float, default=0.1,
                   help="smoothing of the supports' one-hot labels")
    g.add_argument("--classes-per-batch", dest="classes_per_batch", type=int, default=15,
                   help="classes in each process's support batch")
    g.add_argument("--supervised-imgs-per-class", dest="supervised_imgs_per_class", type=int, default=7,
                   help="labelled images of each of those classes per support batch")
    g.add_argument("--supervised-views", dest="supervised_views", type=int, default=1,
                   help="augmented views of each support image")
    g.add_argument("--unique-classes-per-rank", dest="unique_classes_per_rank", type=_bool, default=True,
                   help="each process draws different classes (the support set spans classes x processes)")

    g = p.add_argument_group("optimisation (LARS over momentum SGD)")
    g.add_argument("--batch-size-per-gpu", dest="batch_size_per_gpu", type=int, default=64,
                   help="unlabelled images per process and step")
    g.add_argument("--epochs", type=int, default=100, help="training epochs")
    g.add_argument("--lr", type=float, default=0.4,
                   help="peak learning rate per 256 unlabelled images, scaled by the total batch (the authors' 6.4 "
                        "at 64 x 64 images)")
    g.add_argument("--start-lr", dest="start_lr", type=float, default=0.01875,
                   help="learning rate (per 256 images) where the warm-up starts")
    g.add_argument("--final-lr", dest="final_lr", type=float, default=0.004,
                   help="learning rate (per 256 images) at the end of the cosine")
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=int, default=10, help="epochs of linear lr warm-up")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=1e-6, help="weight decay of the weights")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", type=_bool, default=False, help="Nesterov momentum")
    g.add_argument("--lars-trust", dest="lars_trust", type=float, default=0.001, help="LARS trust coefficient")
    g.add_argument("--clip-grad", dest="clip_grad", type=float, default=0.0,
                   help="maximal gradient norm (0: no clipping, as the authors)")
    g.add_argument("--clip-mode", dest="clip_mode", choices=("per_param", "global"), default="per_param",
                   help="per_param: each parameter's gradient on its own; global: all together")

    g = p.add_argument_group("multi-crop augmentation (on the GPU)")
    g.add_argument("--global-crop-size", dest="global_crop_size", type=int, default=224,
                   help="side of the 2 global views and of the support views")
    g.add_argument("--local-crop-size", dest="local_crop_size", type=int, default=96, help="side of the small views")
    g.add_argument("--global-crops-scale", dest="global_crops_scale", type=float, nargs=2, default=(0.14, 1.0),
                   help="area range of the global and support views")
    g.add_argument("--multicrop", type=int, default=6, help="small views per unlabelled image (0: none)")
    g.add_argument("--local-crops-scale", dest="local_crops_scale", type=float, nargs=2, default=(0.05, 0.14),
                   help="area range of the small views")
    g.add_argument("--flip-p", dest="flip_p", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--color-jitter-strength", dest="color_jitter_strength", type=float, default=1.0,
                   help="s of the colour distortion: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)")
    g.add_argument("--color-jitter-p", dest="color_jitter_p", type=float, default=0.8,
                   help="probability of the colour jitter")
    g.add_argument("--grayscale-p", dest="grayscale_p", type=float, default=0.2, help="probability of grayscale")
    g.add_argument("--blur-p", dest="blur_p", type=float, default=0.5, help="probability of the Gaussian blur")
    g.add_argument("--blur-sigma", dest="blur_sigma", type=float, nargs=2, default=(0.1, 2.0),
                   help="range of the Gaussian blur's sigma")

    g = p.add_argument_group("soft nearest-neighbour evaluation")
    g.add_argument("--snn-freq", dest="snn_freq", type=int, default=1,
                   help="evaluate every this many epochs and at the end (0: never); needs --val-data or digits")
    g.add_argument("--snn-tau", dest="snn_tau", type=float, default=0.1, help="temperature of the evaluation")
    g.add_argument("--eval-batch-size", dest="eval_batch_size", type=int, default=128, help="images per forward pass")
    g.add_argument("--eval-crop-fraction", dest="eval_crop_fraction", type=float, default=0.875,
                   help="central crop (fraction of the short side) resized to the global crop size: 224/256")


def _add_knn_params(g) -> None:
    g.add_argument("--knn-k", dest="knn_k", type=int, default=20, help="neighbours that vote")
    g.add_argument("--knn-t", dest="knn_t", type=float, default=0.07,
                   help="temperature of the exp(sim / T) vote weights")
    g.add_argument("--knn-batch-size", dest="knn_batch_size", type=int, default=128, help="images per forward pass")
    g.add_argument("--eval-crop-fraction", dest="eval_crop_fraction", type=float, default=0.875,
                   help="central crop (fraction of the short side) resized to the global crop size: "
                        "224/256 as the authors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastssl-train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    _add_dino_options(sub.add_parser("dino", help="train DINO", formatter_class=fmt))
    _add_paws_options(sub.add_parser("paws", help="train PAWS (semi-supervised, a few labels)", formatter_class=fmt))

    p = sub.add_parser("demo", help="`make demo`: DINO on scikit-learn's digits, then k-NN against random init",
                       formatter_class=fmt)
    _add_dino_options(p)

    p = sub.add_parser("knn", help="k-NN evaluation of a checkpoint's teacher (eval_knn.py)", formatter_class=fmt)
    p.add_argument("--checkpoint", required=True,
                   help="a fastssl-train checkpoint (DINO or PAWS), or the DINO or PAWS authors' (give --arch)")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher", help="network to evaluate")
    p.add_argument("--data", required=True, help="labelled ImageFolder (the bank), or 'digits'")
    p.add_argument("--val-data", dest="val_data", default=None, help="labelled ImageFolder to classify")
    p.add_argument("--arch", default=None, help="backbone, for checkpoints without a fastssl config")
    p.add_argument("--patch-size", dest="patch_size", type=int, default=None, help="ViT patch size, as --arch")
    p.add_argument("--image-size", dest="global_crop_size", type=int, default=None,
                   help="evaluation crop side (default: the checkpoint's global crop size, else 224)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: the GPU when there is one")
    p.add_argument("--num-workers", dest="num_workers", type=int, default=8, help="data loading workers")
    _add_knn_params(p)

    p = sub.add_parser("attention", help="the last layer's CLS self-attention maps of a ViT checkpoint, as PNGs",
                       formatter_class=fmt)
    p.add_argument("--checkpoint", required=True,
                   help="a fastssl-train checkpoint (DINO or PAWS), or the DINO or PAWS authors' (give --arch)")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher", help="network to show")
    p.add_argument("--image", required=True, help="image file, or 'digits:N' for test digit N")
    p.add_argument("--output-dir", dest="output_dir", default="attention", help="where the PNGs go")
    p.add_argument("--image-size", dest="image_size", type=int, default=None,
                   help="side the image is resized to (default: the checkpoint's global crop size, else 480)")
    p.add_argument("--threshold", type=float, default=0.6,
                   help="masks keep the patches holding this share of each head's attention mass")
    p.add_argument("--arch", default=None, help="backbone, for checkpoints without a fastssl config")
    p.add_argument("--patch-size", dest="patch_size", type=int, default=None, help="ViT patch size, as --arch")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse twice: a ``--preset`` becomes the defaults, then explicit options override it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = getattr(args, "preset", None) or ("demo" if args.command == "demo" else None)
    if args.command == "demo" and not getattr(args, "preset", None):
        import torch

        preset = "demo_gpu" if torch.cuda.is_available() and args.device != "cpu" else "demo"
    if preset:
        sub = parser._subparsers._group_actions[0].choices[args.command]  # noqa: SLF001 - argparse has no API
        sub.set_defaults(**(PAWS_PRESETS if args.command == "paws" else PRESETS)[preset])
        args = parser.parse_args(argv)
        args.preset = preset
    if args.command in ("dino", "demo", "paws") and args.data is None:
        parser.error(f"{args.command}: --data is required (an ImageFolder root, or 'digits')")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = vars(args)
    if args.command == "dino":
        from .dino import train_dino

        train_dino(cfg)
    elif args.command == "paws":
        from .paws import train_paws

        train_paws(cfg)
    elif args.command == "demo":
        return run_demo(cfg)
    elif args.command == "knn":
        from .evaluate import knn_command

        knn_command(cfg)
    elif args.command == "attention":
        from .attention import attention_command

        attention_command(cfg)
    return 0


def run_demo(cfg: dict) -> int:
    """Train on the digits from scratch, then k-NN of the trained teacher and of the same network at
    its random initialisation, on the held-out digits; one summary line."""
    import torch

    from .data import DigitsImages, load_digits_split
    from .dino import build_dino_model, train_dino
    from .knn import knn_eval

    out = Path(cfg["output_dir"])
    if out.exists() and not cfg["resume"]:  # a demo always trains: start from scratch
        shutil.rmtree(out)
    t0 = time.perf_counter()
    result = train_dino(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg["device"] != "cpu" else "cpu")
    xtr, ytr, xte, yte = load_digits_split(cfg["digits_size"])
    bank, query = DigitsImages(xtr, ytr), DigitsImages(xte, yte)
    trained = build_dino_model(cfg, drop_path_rate=0.0).to(device)
    from .checkpoint import load_pretrained

    load_pretrained(trained, out / "checkpoint.pth", "teacher")
    torch.manual_seed(cfg["seed"])  # the student's seed: the very network training started from
    random_init = build_dino_model(cfg).to(device)
    dino = knn_eval(trained.backbone, bank, query, device, cfg)
    rand = knn_eval(random_init.backbone, bank, query, device, cfg)
    minutes = (time.perf_counter() - t0) / 60
    print(f"{result.step} training steps; training and evaluation took {minutes:.1f} min")
    print(f"kNN top-1 (k={cfg['knn_k']}): DINO {dino['top1']:.1f}% | random init {rand['top1']:.1f}%")
    sys.stdout.flush()
    return 0

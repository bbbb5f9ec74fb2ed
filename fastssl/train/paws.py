"""PAWS training (Assran et al. 2021, https://arxiv.org/abs/2104.13963), read top to bottom.

One iteration: a batch of unlabelled images and a class-stratified batch of labelled supports
(:class:`~fastssl.ClassStratifiedSampler`: ``classes_per_batch`` classes, ``supervised_imgs_per_class``
images of each) go to the device as uint8; :class:`~fastssl.augment.DinoAugment`, set to PAWS's
pipeline (random resized crop, flip, colour distortion of strength 1, grayscale, blur p 0.5), makes
two global views and ``multicrop`` small views of every unlabelled image and ``supervised_views``
views of every support there. The encoder embeds supports and global views in one backbone call,
the small views in another, and its heads once: ``h`` (projection) and ``z`` (prediction). The
fused PAWS loss (:class:`~fastssl.PawsLoss`) classifies each view's ``z`` by soft nearest neighbours
against the supports' ``z`` (all-gathered across ranks), with targets from the other global view's
``h`` against the supports' ``h``, sharpened, plus the mean-entropy regulariser. LARS over momentum
SGD (:class:`~fastssl.train.optim.Lars`) steps with the per-iteration warm-up + cosine learning rate.
After each epoch the encoder's output ``z`` is evaluated by soft nearest neighbours against the
labelled images (:class:`~fastssl.SoftNNClassifier`) on a labelled validation set.

Differences from the authors' ``paws_train.py``: the augmentation runs on the device, in one go per
batch; the learning rates are given per 256 unlabelled images and scaled by the total batch (the
authors' 6.4 at 4096 images is 0.4 per 256), and the warm-up reaches its peak one iteration early
(``np.linspace`` includes its end, as DINO's schedule); biases and every 1-D parameter (all norms)
are excluded from decay and LARS (the authors match ``bias`` / ``bn`` in names); with several
support views and several ranks the labels follow the supports' gathered order; label smoothing
spreads over the class slots in use (the authors' matrix with shared classes on several ranks is
``world`` times wider); each support batch draws its images afresh (the authors walk each class
without repeats within an epoch); with ``--multicrop 0`` the authors widen the global crops' scale
to (0.08, 1): pass ``--global-crops-scale 0.08 1`` for that.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ..evaluation import SoftNNClassifier
from ..losses import PawsLoss
from ..samplers import ClassStratifiedSampler
from . import checkpoint as ckpt
from .data import (
    DataError,
    DigitsImages,
    ImageFolder,
    ResumableSampler,
    collate,
    decode_batch,
    gpu_jpeg_decoding_available,
    labelled_subset,
    load_digits_split,
)
from .knn import embed_datasets
from .log import EpochMeter, Logger
from .models import PawsModel, build_backbone
from .nonfinite import NonFiniteGuard
from .optim import Lars
from .paws_config import PawsConfig
from .resume import plan_start, position, restore
from .run_folder import rewind_log, run_folder
from .runtime import (
    any_rank,
    backward_and_step,
    clip_gradients_,
    in_process_group,
    iterations_per_epoch,
    mixed_precision,
    param_groups,
    print_stop,
    resolve_precision,
    seed_all,
    step_seed,
    strip_prefix,
    version,
)
from .schedules import cosine_schedule

__all__ = ["PawsConfig", "PawsResult", "SupportBatches", "build_paws_augment", "build_paws_model",
           "paws_state_from_authors", "snn_eval", "train_paws"]


@dataclass
class PawsResult:
    epoch: int  # epochs completed
    step: int  # iterations completed (all epochs)
    loss: float  # mean loss (cross-entropy + me-max) of the last epoch trained (nan if none)
    checkpoint: str | None
    stopped_early: bool
    snn: dict | None  # the last soft-NN evaluation, if any
    steps_run: int = 0  # iterations trained by this call
    complete: bool = False  # the run was already finished: nothing was trained


# ----------------------------------------------------------------------------- setup

def build_paws_datasets(cfg: PawsConfig, device: torch.device):
    """``(unlabelled set, labelled set, validation set or None)``; data errors come from here,
    before any file, model or GPU work."""
    if cfg.data == "digits":
        xtr, ytr, xte, yte = load_digits_split(cfg.digits_size)
        train = DigitsImages(xtr, ytr)
        return train, labelled_subset(train, per_class=cfg.labels_per_class, seed=cfg.seed), DigitsImages(xte, yte)
    assert cfg.data is not None  # validated
    raw = cfg.gpu_decode and gpu_jpeg_decoding_available(device)
    folder = ImageFolder(cfg.data, raw_jpeg=raw)
    labelled_root = ImageFolder(cfg.labelled_data, raw_jpeg=raw) if cfg.labelled_data else folder
    labelled = labelled_subset(labelled_root, names_file=cfg.labelled_list, per_class=cfg.labels_per_class,
                               seed=cfg.seed)
    val = ImageFolder(cfg.val_data) if cfg.val_data else None
    if val is not None and val.classes != labelled.classes:
        raise DataError(f"--val-data {cfg.val_data!r} has other class folders than the labelled images")
    return folder, labelled, val


def build_paws_model(cfg: PawsConfig | Mapping[str, Any]) -> PawsModel:
    cfg = PawsConfig.coerce(cfg)
    # The authors' ResNets keep the last BatchNorm of each block at 1 (zero_init_residual=False); timm's
    # default sets it to 0.
    extra = {"zero_init_last": False} if cfg.arch.startswith(("resnet", "wide_resnet")) else {}
    backbone = build_backbone(cfg.arch, drop_path_rate=cfg.drop_path_rate, img_size=cfg.img_size,
                              patch_size=cfg.patch_size, **extra)
    return PawsModel(backbone, cfg.output_dim, cfg.hidden_dim, cfg.use_pred_head)


def build_paws_augment(cfg: PawsConfig | Mapping[str, Any]):
    """``(views, supports)``: two augmentations on the device, PAWS's ImageNet pipeline. ``views(images)``
    gives ``(2 global views, multicrop small views)`` of each unlabelled image, ``supports(images)``
    ``(supervised_views views, nothing)`` of each labelled one, crop-major."""
    from ..augment import DinoAugment

    cfg = PawsConfig.coerce(cfg)
    s = cfg.color_jitter_strength
    common: dict[str, Any] = dict(
        brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=0.2 * s, jitter_p=cfg.color_jitter_p,
        grayscale_p=cfg.grayscale_p, blur_sigma=cfg.blur_sigma, flip_p=cfg.flip_p, interpolation="bilinear",
        global_scale=cfg.global_crops_scale, local_scale=cfg.local_crops_scale, global_size=cfg.global_crop_size,
        local_size=cfg.local_crop_size, local_solarize_p=0.0, local_blur_p=cfg.blur_p)
    views = DinoAugment(n_local=cfg.multicrop, global_blur_p=(cfg.blur_p,) * 2, global_solarize_p=(0.0, 0.0),
                        **common)
    v = cfg.supervised_views
    supports = DinoAugment(n_local=0, global_blur_p=(cfg.blur_p,) * v, global_solarize_p=(0.0,) * v, **common)
    return views, supports


class SupportBatches(Sampler):
    """The support batches of iterations ``start, start + 1, ...`` without end: pass ``k`` over the
    :class:`ClassStratifiedSampler` is its epoch ``k``. Batch ``i`` depends only on ``i`` (and the
    seed), so a resumed run draws the supports the uninterrupted one would have."""

    def __init__(self, sampler: ClassStratifiedSampler, start: int = 0):
        self.sampler, self.start = sampler, start

    def __iter__(self):
        n = len(self.sampler)
        epoch, skip = divmod(self.start, n)
        while True:
            self.sampler.set_epoch(epoch)
            for j, batch in enumerate(self.sampler):
                if j >= skip:
                    yield batch
            epoch, skip = epoch + 1, 0


def paws_state_from_authors(state: dict) -> dict:
    """A PAWS authors' checkpoint (``{"encoder": ...}``, their ResNet with ``fc`` / ``pred`` heads)
    as a :class:`PawsModel` state dict: ``module.`` stripped, the trunk under ``backbone.``."""
    encoder = strip_prefix(state["encoder"] if "encoder" in state else state)
    return {k if k.startswith(("fc.", "pred.")) else f"backbone.{k}": v for k, v in encoder.items()}


@torch.no_grad()
def snn_eval(model: PawsModel, labelled_set, val_set, device: torch.device, cfg: PawsConfig,
             amp_dtype=None) -> dict:
    """Top-1 / top-5 (percent) of soft nearest neighbours (``tau = cfg.snn_tau``) of the validation
    images' embeddings against every labelled image's, as the authors' ``snn_eval.py``: the encoder's
    output (``z``, after the prediction head when there is one), centre crops resized bilinearly."""
    (bank, bank_labels), (query, query_labels) = embed_datasets(
        model, (labelled_set, val_set), device, forward=model.embed, size=cfg.global_crop_size,
        crop_fraction=cfg.eval_crop_fraction, batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers,
        amp_dtype=amp_dtype, interpolation="bilinear")
    clf = SoftNNClassifier(bank.float(), bank_labels, cfg.snn_tau, num_classes=len(labelled_set.classes))
    acc = clf.accuracy(query.float(), query_labels, topk=(1, min(5, clf.num_classes)))
    return {"top1": 100.0 * acc[1], "top5": 100.0 * acc[min(5, clf.num_classes)]}


# ----------------------------------------------------------------------------- the training run

def train_paws(cfg: PawsConfig | Mapping[str, Any], *, augment=None) -> PawsResult:
    """Train PAWS as ``cfg`` says (a :class:`PawsConfig`; a mapping of its fields is read as one).

    ``augment`` replaces the device augmentation: a pair ``(views, supports)`` of callables as
    :func:`build_paws_augment` returns. Resumes from ``output_dir/checkpoint.pth`` (or ``resume``);
    saves a checkpoint and returns on SIGTERM / SIGINT.
    """
    config = PawsConfig.coerce(cfg)
    config.validate()
    return in_process_group(config, lambda device, rank, world: _train(config, device, rank, world, augment))


def _train(cfg: PawsConfig, device: torch.device, rank: int, world: int, augment) -> PawsResult:
    main = rank == 0
    out = Path(cfg.output_dir)
    cfg = resolve_precision(cfg, device)

    # Data first: missing folders, lists or too few images are errors before any file, model or GPU work.
    train_set, labelled_set, val_set = build_paws_datasets(cfg, device)
    batch = cfg.batch_size_per_gpu
    niter = iterations_per_epoch(len(train_set), batch, world)  # drop_last, as the authors
    needed = cfg.classes_per_batch * (world if cfg.unique_classes_per_rank else 1)
    if len(labelled_set.classes) < needed:
        raise cfg.fail("classes_per_batch", f"must be at most the {len(labelled_set.classes)} labelled classes"
                       + (f" / {world} processes (--unique-classes-per-rank)" if cfg.unique_classes_per_rank
                          and world > 1 else ""))
    support_sampler = ClassStratifiedSampler(labelled_set, cfg.classes_per_batch, cfg.supervised_imgs_per_class,
                                             world_size=world, rank=rank, seed=cfg.seed,
                                             unique_classes=cfg.unique_classes_per_rank)
    sampler = ResumableSampler(len(train_set), shuffle=True, seed=cfg.seed, rank=rank, world_size=world)

    with contextlib.ExitStack() as stack:
        # The run folder is this run's from here (a lock); its checkpoint is checked before any model exists.
        notes = stack.enter_context(run_folder(out, main))
        start = plan_start(cfg, out, world=world, niter=niter, n_images=len(train_set))
        if start.complete:
            if main:
                print(start.complete_message(out), flush=True)
            return PawsResult(epoch=start.epoch, step=start.epoch * niter, loss=math.nan,
                              checkpoint=str(start.path), stopped_early=False, snn=None, complete=True)

        seed_all(cfg.seed)  # every rank starts from the same weights (DDP also broadcasts them)
        model = build_paws_model(cfg).to(device)
        seed_all(cfg.seed + rank)  # then each rank its own randomness (drop path)
        if world > 1 and device.type == "cuda":  # the authors: apex's SyncBatchNorm (CUDA only; gloo: per process)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if cfg.compile:  # in place: the state dict keeps its keys (no _orig_mod.)
            model.backbone.compile()
        model_ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None, broadcast_buffers=False) if world > 1 else model

        views = cfg.supervised_views
        support_labels = support_sampler.labels(gathered=True, device=device, views=views)
        paws = PawsLoss(cfg.multicrop, cfg.temperature, cfg.sharpen, cfg.me_max,
                        num_classes=support_sampler.num_classes, smoothing=cfg.label_smoothing)
        groups = param_groups(model)
        groups[1]["lars_exclude"] = True  # biases and norms: no decay, no LARS (the authors' LARS_exclude)
        optimizer = Lars(groups, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                         nesterov=cfg.nesterov, trust_coefficient=cfg.lars_trust)
        epochs = cfg.epochs
        scale = batch * world / 256.0  # learning rates are per 256 unlabelled images
        lr_schedule = cosine_schedule(cfg.lr * scale, cfg.final_lr * scale, epochs, niter, cfg.warmup_epochs,
                                      start_warmup_value=cfg.start_lr * scale).tolist()

        amp_dtype, scaler = mixed_precision(cfg, device)
        view_aug, support_aug = augment if augment is not None else build_paws_augment(cfg)
        aug_gen = torch.Generator(device=device)

        restore(start, {"model": model}, optimizer, scaler, device)
        first_it = start.epoch * niter + start.step
        if main:
            notes.append(rewind_log(out, start.steps_done, start.epoch) or "")
        log = stack.enter_context(Logger(out, cfg, main))
        log.print_config("PAWS", device, world, niter, cfg.lr * scale)
        log.say(f"  {len(labelled_set)} labelled images in {len(labelled_set.classes)} classes; supports per step: "
                f"{support_sampler.batch_size} x {views} view(s) per process, {support_sampler.num_classes} class "
                f"slots" + ("" if val_set is not None else "; no --val-data: no soft-NN evaluation"))
        log.announce(notes + start.notes, start.events)

        loader_gen = torch.Generator()
        loader = DataLoader(train_set, batch_size=batch, sampler=sampler, num_workers=cfg.num_workers,
                            collate_fn=collate, pin_memory=device.type == "cuda", drop_last=True, generator=loader_gen)
        # The supports of iteration it are batch it of an endless stream (continued across epochs).
        support_loader = DataLoader(labelled_set, batch_sampler=SupportBatches(support_sampler, first_it),
                                    num_workers=min(cfg.num_workers, 4), collate_fn=collate,
                                    pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
        supports_iter = iter(support_loader)

        def clip() -> None:
            if cfg.clip_grad > 0:
                clip_gradients_(model, cfg.clip_grad, cfg.clip_mode)

        def save(epoch: int, step: int, name: str = "checkpoint.pth", meter: dict | None = None) -> Path | None:
            rng = ckpt.rng_states(device)  # every rank's (a collective: every rank saves, rank 0 writes)
            if not main:
                return None
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler else None, **position(start, epoch, step, world, meter),
                     "rng": rng, "config": cfg.to_dict(), "fastssl_version": version()}
            return ckpt.save_checkpoint(state, out / name)

        signal_received = stack.enter_context(ckpt.StopSignal())
        guard = NonFiniteGuard(device, rank, world, niter, (model, paws), hint="lower --lr, or try --precision fp32")
        last_loss, snn_result, stopped, path, steps_run = math.nan, None, False, None, 0
        it, epochs_done = first_it - 1, start.epoch
        for epoch in range(start.epoch, epochs):
            first = start.step if epoch == start.epoch else 0
            sampler.set_epoch(epoch, start=first * batch)
            loader_gen.manual_seed(cfg.seed * 7919 + epoch)
            model.train()
            meter = EpochMeter(log, epoch, epochs, niter, first, device, offset=start.offset,
                               saved=start.meter if epoch == start.epoch else None, guard=guard)
            done = first  # iterations of this epoch done
            for i, data in enumerate(loader, start=first):
                sdata = next(supports_iter)  # one support batch per iteration, skipped images or not
                images, skipped = decode_batch(data, device)
                simages, s_skipped = decode_batch(sdata, device)
                skipped += data.skipped
                # Host flags, decided alike on every rank: a rank that skipped the step's collectives would hang
                # the rest. A signal stops before this iteration.
                signalled, bad_supports, empty = any_rank(bool(signal_received), bool(s_skipped or sdata.skipped),
                                                          not len(images))
                if signalled:
                    stopped = True
                    break
                it, done = epoch * niter + i, i + 1
                for group in optimizer.param_groups:
                    group["lr"] = lr_schedule[it]
                if bad_supports:  # the label slots assume complete support batches
                    raise DataError(f"a labelled image could not be read (support batch of iteration {it}): fix or "
                                    "remove it from the labelled set")
                if empty:
                    meter.skip(skipped + len(images), i)
                    continue
                aug_gen.manual_seed(step_seed(cfg.seed, rank, it))  # the same crops on resume
                global_views, small_views = view_aug(images, generator=aug_gen)
                support_views, _ = support_aug(simages, generator=aug_gen)
                B = len(images)

                guard.hold()
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    h, z = model_ddp(torch.cat([support_views, global_views]), small_views)
                h, z = h.float(), z.float()  # the loss in full precision, as the authors
                ns = support_views.shape[0]
                target_views = h[ns:ns + 2 * B].detach()
                target_views = torch.cat([target_views[B:], target_views[:B]])  # each view's target: the other
                ploss, me_max = paws(z[ns:], z[:ns], support_labels, target_views, h[:ns].detach(), support_labels)
                loss = ploss + me_max
                skip = guard.observe(loss, it)  # a non-finite loss: this step and the rest skipped on the device

                backward_and_step(loss, optimizer, scaler, clip, skip)
                guard.release()

                # Read (with the guard's flags) once per --log-freq iterations: it raises on a non-finite loss.
                meter.update(loss, B, skipped, i=i, it=it, lr=lr_schedule[it], paws_xent=ploss.detach(),
                             me_max=me_max.detach())
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
            if val_set is not None and cfg.snn_freq and ((epoch + 1) % cfg.snn_freq == 0 or epoch + 1 == epochs):
                snn_result = snn_eval(model, labelled_set, val_set, device, cfg, amp_dtype)
                log.write({"epoch": epoch + 1, **{f"snn_{k}": v for k, v in snn_result.items()}})
                log.say(f"epoch {epoch + 1}: soft-NN top-1 {snn_result['top1']:.2f}% top-5 {snn_result['top5']:.2f}% "
                        f"({len(labelled_set)} labelled images, tau={cfg.snn_tau})")
            if stopped:
                break
        if stopped and main:
            print_stop(signal_received, cfg, steps_run, start.offset + it + 1, epochs_done, path)
        if math.isfinite(last_loss):
            log.say(f"final loss {last_loss:.4f}")
    return PawsResult(epoch=epochs_done, step=it + 1, loss=last_loss, checkpoint=str(path) if path else None,
                      stopped_early=stopped, snn=snn_result, steps_run=steps_run)

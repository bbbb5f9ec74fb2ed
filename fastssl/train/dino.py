"""DINO training (Caron et al. 2021, https://arxiv.org/abs/2104.14294), read top to bottom.

One iteration: the batch's uint8 images go to the device; :class:`~fastssl.augment.DinoAugment`
makes every crop there; the teacher (an EMA of the student, no gradient) sees the 2 global crops,
the student all of them (one backbone call per resolution, one head call); the fused
:class:`~fastssl.DinoLoss` scores every (teacher, student) pair and moves its center; AdamW steps
with the per-iteration lr and weight decay; :class:`~fastssl.MomentumTeacher` updates the teacher
with the per-iteration momentum in one launch.

With ``--fsdp`` (a ViT) the student and the teacher are sharded with FSDP2 instead of the student wrapped
in DDP (:mod:`.fsdp`), and the checkpoints are sharded folders (``OUTPUT_DIR/checkpoint``), resumed exactly
on the same number of processes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..ema import MomentumTeacher, cosine_momentum_schedule
from ..losses import DinoLoss
from . import checkpoint as ckpt
from .data import (
    DigitsImages,
    ImageFolder,
    ResumableSampler,
    collate,
    decode_batch,
    gpu_jpeg_decoding_available,
    load_digits_split,
)
from .dino_config import DinoConfig
from .fsdp import gathered_copy, one_process_group, restore_sharded, save_sharded_run, shard_
from .knn import knn_eval
from .log import EpochMeter, Logger
from .models import DinoHead, MultiCropModel, build_backbone
from .nonfinite import NonFiniteGuard
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
    version,
)
from .schedules import cosine_schedule

__all__ = ["DinoConfig", "TrainResult", "build_augment", "build_dino_model", "clip_gradients_", "param_groups",
           "train_dino"]


@dataclass
class TrainResult:
    epoch: int  # epochs completed
    step: int  # iterations completed (all epochs)
    loss: float  # mean loss of the last epoch trained (nan if none)
    out_dim: int
    checkpoint: str | None
    stopped_early: bool  # a signal or --stop-after-steps ended the run before the last epoch
    knn: dict | None  # the last k-NN evaluation, if any
    steps_run: int = 0  # iterations trained by this call
    complete: bool = False  # the run was already finished: nothing was trained


# ----------------------------------------------------------------------------- setup

def build_datasets(cfg: DinoConfig, device: torch.device):
    """``(train set, k-NN bank set or None, k-NN query set or None)``; errors on bad folders come
    from here, before any file or GPU work."""
    if cfg.data == "digits":
        xtr, ytr, xte, yte = load_digits_split(cfg.digits_size)
        train = DigitsImages(xtr, ytr)
        return train, train, DigitsImages(xte, yte)
    assert cfg.data is not None  # validated
    raw = cfg.gpu_decode and gpu_jpeg_decoding_available(device)
    folder = ImageFolder(cfg.data, raw_jpeg=raw)
    bank = ImageFolder(cfg.knn_data) if cfg.knn_data else None
    query = ImageFolder(cfg.knn_val_data) if cfg.knn_val_data else None
    return folder, bank, query


def build_dino_model(cfg: DinoConfig | Mapping[str, Any], *, drop_path_rate: float | None = None) -> MultiCropModel:
    """The student (or, with ``drop_path_rate=0``, the teacher) of a config (a mapping is read as one)."""
    cfg = DinoConfig.coerce(cfg)
    backbone = build_backbone(cfg.arch, drop_path_rate=cfg.drop_path_rate if drop_path_rate is None
                              else drop_path_rate, img_size=cfg.img_size, patch_size=cfg.patch_size)
    head = DinoHead(cast(int, backbone.num_features), cfg.out_dim, use_bn=cfg.use_bn_in_head,
                    norm_last_layer=cfg.norm_last_layer, nlayers=cfg.head_layers,
                    hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim)
    return MultiCropModel(backbone, head)


def build_augment(cfg: DinoConfig | Mapping[str, Any]):
    """The GPU multi-crop augmentation: one call on a batch of uint8 images -> (globals, locals)."""
    cfg = DinoConfig.coerce(cfg)
    try:
        from ..augment import DinoAugment
    except ImportError as e:
        raise ImportError("fastssl.augment.DinoAugment is not available in this installation; the DINO trainer "
                          "needs it for its multi-crop augmentation") from e
    return DinoAugment(global_size=cfg.global_crop_size, local_size=cfg.local_crop_size,
                       n_local=cfg.local_crops_number, global_scale=cfg.global_crops_scale,
                       local_scale=cfg.local_crops_scale, flip_p=cfg.flip_p, blur_sigma=cfg.blur_sigma,
                       jitter_p=cfg.color_jitter_p, global_solarize_p=(0.0, cfg.solarize_p))


# ----------------------------------------------------------------------------- the training run

def train_dino(cfg: DinoConfig | Mapping[str, Any], *, augment=None) -> TrainResult:
    """Train DINO as ``cfg`` says (a :class:`DinoConfig`; a mapping of its fields is read as one).

    ``augment`` replaces the GPU augmentation (a callable ``(uint8 images, generator=) ->
    (globals, locals)``), e.g. in tests. Resumes from ``output_dir/checkpoint.pth`` when it exists
    (or from ``resume``); saves a checkpoint and returns on SIGTERM / SIGINT.
    """
    config = DinoConfig.coerce(cfg)
    config.validate()
    return in_process_group(config, lambda device, rank, world: _train(config, device, rank, world, augment))


def _train(cfg: DinoConfig, device: torch.device, rank: int, world: int, augment) -> TrainResult:
    main = rank == 0
    out = Path(cfg.output_dir)
    cfg = resolve_precision(cfg, device)

    batch = cfg.batch_size_per_gpu
    base_lr = cfg.lr * batch * world / 256.0  # the linear scaling rule
    if cfg.min_lr > base_lr:
        raise cfg.fail("min_lr", f"must be at most the peak learning rate, --lr x {batch * world} images / 256 = "
                       f"{base_lr:g}")

    # Data first: a missing or empty folder is an error before any file, model or GPU work.
    train_set, knn_bank, knn_query = build_datasets(cfg, device)
    niter = iterations_per_epoch(len(train_set), batch, world)  # drop_last, as the authors
    sampler = ResumableSampler(len(train_set), shuffle=True, seed=cfg.seed, rank=rank, world_size=world)

    with contextlib.ExitStack() as stack:
        # The run folder is this run's from here (a lock); its checkpoint is checked before any model exists.
        if cfg.fsdp:  # FSDP2 needs a process group: one of this process alone without torchrun
            stack.enter_context(one_process_group())
        notes = stack.enter_context(run_folder(out, main))
        start = plan_start(cfg, out, world=world, niter=niter, n_images=len(train_set))
        if start.complete:
            if main:
                print(start.complete_message(out), flush=True)
            return TrainResult(epoch=start.epoch, step=start.epoch * niter, loss=math.nan, out_dim=cfg.out_dim,
                               checkpoint=str(start.path), stopped_early=False, knn=None, complete=True)

        # Every rank builds the same weights: DDP broadcasts rank 0's student, but the teacher (loaded from the
        # student before that) would otherwise start from each rank's own initialisation.
        seed_all(cfg.seed)
        student = build_dino_model(cfg).to(device)
        teacher_net = build_dino_model(cfg, drop_path_rate=0.0).to(device)  # the teacher never drops paths
        seed_all(cfg.seed + rank)  # then each rank its own randomness (drop path)
        # As the authors, any BatchNorm (a ResNet backbone's, or the head's) syncs across ranks; without one
        # this is a no-op. SyncBatchNorm is CUDA only: under gloo each process keeps its own statistics.
        if world > 1 and device.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher_net = nn.SyncBatchNorm.convert_sync_batchnorm(teacher_net)
        teacher_net.load_state_dict(student.state_dict())
        amp_dtype, scaler = mixed_precision(cfg, device)
        if cfg.fsdp:  # sharded alike: the EMA updates each rank's local shards
            shard_(student, amp_dtype, compile_blocks=cfg.compile, checkpoint_blocks=cfg.activation_checkpointing)
            shard_(teacher_net, amp_dtype, compile_blocks=cfg.compile, teacher=True)
        epochs = cfg.epochs
        momentum = cosine_momentum_schedule(cfg.momentum_teacher, 1.0, epochs, niter)
        teacher = MomentumTeacher(student, momentum.tolist(), teacher=teacher_net)
        if cfg.compile and not cfg.fsdp:  # in place: the state dict keeps its keys (no _orig_mod.); --fsdp: per block
            student.backbone.compile()
            teacher_net.backbone.compile()
        student_ddp = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda"
                                                          else None) if world > 1 and not cfg.fsdp else student

        ncrops = 2 + cfg.local_crops_number
        dino_loss = DinoLoss(cfg.out_dim, ncrops, cfg.warmup_teacher_temp, cfg.teacher_temp,
                             cfg.warmup_teacher_temp_epochs, epochs, student_temp=cfg.student_temp,
                             center_momentum=cfg.center_momentum).to(device)
        groups = param_groups(student)
        optimizer: torch.optim.Optimizer
        # fused: their kernels skip a step on the device (a non-finite loss, see optim.step_unless)
        if cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, fused=True)
        else:
            optimizer = torch.optim.SGD(groups, lr=0.0, momentum=0.9, fused=True)
        # Plain floats: numpy scalars in the optimiser state would not load with weights_only=True.
        lr_schedule = cosine_schedule(base_lr, cfg.min_lr, epochs, niter, cfg.warmup_epochs).tolist()
        wd_schedule = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, epochs, niter).tolist()

        augment = augment if augment is not None else build_augment(cfg)
        aug_gen = torch.Generator(device=device)

        if cfg.fsdp and start.state is not None:
            assert start.path is not None
            plain = restore_sharded(start.path, {"student": student, "teacher": teacher_net}, optimizer,
                                    {"dino_loss": dino_loss.state_dict(),
                                     "scaler": scaler.state_dict() if scaler else None}, device)
            dino_loss.load_state_dict(plain["dino_loss"])
            if scaler is not None and plain["scaler"]:
                scaler.load_state_dict(plain["scaler"])
        else:
            restore(start, {"student": student, "teacher": teacher_net, "dino_loss": dino_loss}, optimizer, scaler,
                    device)
        if main:
            notes.append(rewind_log(out, start.steps_done, start.epoch) or "")
        log = stack.enter_context(Logger(out, cfg, main))
        log.print_config("DINO", device, world, niter, base_lr)
        log.announce(notes + start.notes, start.events)

        loader_gen = torch.Generator()  # the loader's own seeds: the global RNG is left to the model
        loader = DataLoader(train_set, batch_size=batch, sampler=sampler, num_workers=cfg.num_workers,
                            collate_fn=collate, pin_memory=device.type == "cuda", drop_last=True,
                            generator=loader_gen, persistent_workers=False)

        def save(epoch: int, step: int, name: str = "checkpoint.pth", meter: dict | None = None) -> Path | None:
            if cfg.fsdp:  # every rank writes its shards: the folder OUTPUT_DIR/checkpoint[NNNN]
                plain = {"scaler": scaler.state_dict() if scaler else None, "dino_loss": dino_loss.state_dict(),
                         **position(start, epoch, step, world, meter), "config": cfg.to_dict(),
                         "fastssl_version": version()}
                return save_sharded_run(out / name.removesuffix(".pth"), {"student": student, "teacher": teacher_net},
                                        optimizer, plain, device)
            rng = ckpt.rng_states(device)  # every rank's (a collective: every rank saves, rank 0 writes)
            if not main:
                return None
            state = {"student": student.state_dict(), "teacher": teacher_net.state_dict(),
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                     "dino_loss": dino_loss.state_dict(), **position(start, epoch, step, world, meter),
                     "rng": rng, "config": cfg.to_dict(), "fastssl_version": version()}
            return ckpt.save_checkpoint(state, out / name)

        def knn_teacher() -> nn.Module:
            if not cfg.fsdp:
                return teacher_net.backbone
            # a collective: every rank evaluates
            plain = gathered_copy(teacher_net, lambda: build_dino_model(cfg, drop_path_rate=0.0), device)
            return cast(nn.Module, plain.backbone)

        signal_received = stack.enter_context(ckpt.StopSignal())
        guard = NonFiniteGuard(device, rank, world, niter, (student, teacher_net, dino_loss),
                               hint="lower --lr, raise --clip-grad, or try --precision fp32")
        last_loss, knn_result, stopped, path, steps_run = math.nan, None, False, None, 0
        it, epochs_done = start.epoch * niter + start.step - 1, start.epoch
        for epoch in range(start.epoch, epochs):
            first = start.step if epoch == start.epoch else 0
            sampler.set_epoch(epoch, start=first * batch)
            loader_gen.manual_seed(cfg.seed * 7919 + epoch)
            student.train()
            meter = EpochMeter(log, epoch, epochs, niter, first, device, offset=start.offset,
                               saved=start.meter if epoch == start.epoch else None, guard=guard)
            done = first  # iterations of this epoch done
            for i, data in enumerate(loader, start=first):
                images, skipped = decode_batch(data, device)
                skipped += data.skipped
                # Host flags, the same on every rank: a signal (stop before this iteration), a batch of
                # unreadable images here or on another rank (skip it).
                signalled, empty = any_rank(bool(signal_received), not len(images))
                if signalled:
                    stopped = True
                    break
                it, done = epoch * niter + i, i + 1
                for j, group in enumerate(optimizer.param_groups):
                    group["lr"] = lr_schedule[it]
                    if j == 0:  # only the weights are regularised
                        group["weight_decay"] = wd_schedule[it]
                if empty:
                    meter.skip(skipped + len(images), i)
                    continue
                aug_gen.manual_seed(step_seed(cfg.seed, rank, it))  # the same crops on resume
                global_crops, local_crops = augment(images, generator=aug_gen)

                guard.hold()
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    with torch.no_grad():
                        teacher_out = teacher(global_crops)
                    student_out = student_ddp(global_crops, local_crops)
                    loss = dino_loss(student_out, teacher_out, epoch)
                skip = guard.observe(loss, it)  # a non-finite loss: this step and the rest skipped on the device

                def before_step(epoch=epoch):
                    if cfg.clip_grad > 0:
                        clip_gradients_(student, cfg.clip_grad, cfg.clip_mode)
                    if epoch < cfg.freeze_last_layer:  # the authors: no last-layer update in the first epoch(s)
                        for p in student.get_submodule("head.last_layer").parameters():
                            p.grad = None

                backward_and_step(loss, optimizer, scaler, before_step, skip)
                teacher.update(momentum=guard.momentum(teacher.momentum_at(it)))
                guard.release()

                # Read (with the guard's flags) once per --log-freq iterations: it raises on a non-finite loss.
                meter.update(loss, len(images), skipped, i=i, it=it, lr=lr_schedule[it], wd=wd_schedule[it],
                             momentum=teacher.momentum_at(it), teacher_temp=dino_loss.teacher_temp_at(epoch))
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
            if knn_bank is not None and cfg.knn_freq and ((epoch + 1) % cfg.knn_freq == 0 or epoch + 1 == epochs):
                knn_result = knn_eval(knn_teacher(), knn_bank, knn_query, device, k=cfg.knn_k, T=cfg.knn_t,
                                      size=cfg.global_crop_size, crop_fraction=cfg.eval_crop_fraction,
                                      batch_size=cfg.knn_batch_size, num_workers=cfg.num_workers, amp_dtype=amp_dtype)
                log.write({"epoch": epoch + 1, **{f"knn_{k}": v for k, v in knn_result.items()}})
                log.say(f"epoch {epoch + 1}: k-NN top-1 {knn_result['top1']:.2f}% top-5 {knn_result['top5']:.2f}% "
                        f"(k={cfg.knn_k}, T={cfg.knn_t})")
            if stopped:
                break
        if stopped and main:
            print_stop(signal_received, cfg, steps_run, start.offset + it + 1, epochs_done, path)
        if math.isfinite(last_loss):
            log.say(f"final loss {last_loss:.4f}  (ln(out_dim) = {math.log(cfg.out_dim):.4f}: a collapsed run, "
                    "uniform outputs, sits there)")
    return TrainResult(epoch=epochs_done, step=it + 1, loss=last_loss, out_dim=cfg.out_dim,
                       checkpoint=str(path) if path else None, stopped_early=stopped, knn=knn_result,
                       steps_run=steps_run)

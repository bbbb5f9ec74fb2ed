"""The DINOv3 training step: fastssl's fused losses against the authors' loss code, images/s and peak memory.

    python -m benchmarks.dinov3_step [--preset smoke|cpu|target|lease] [--out DIR] [--device DEV]

One timed unit is one iteration of ``fastssl.train.dinov3`` (``_train``'s loop body): the lr / weight-decay
schedule applied to the param groups, the 2 global and the local crops made on the device by ``DinoAugment``,
the teacher's forward (CLS and masked patches through its heads) and its targets (Sinkhorn-Knopp), the
student's forward (the mask token in place of the masked patch embeddings), the losses weighted as
``compute_losses``, backward, the backbone's and each head's gradients clipped on their own, AdamW (the
trainer's param groups: layer-wise lr decay, patch-embedding multiplier, frozen last layers), the teacher's
EMA (``MomentumTeacher``, one launch) and the trainer's one host sync of the loss terms and gradient norms.
The model is the trainer's (``build_dinov3_model``) under its autocast (bf16 on the targets). Both contenders
run exactly that code from the same initial weights on the same inputs: the same uint8 images on the device,
the same augmentation generator state per iteration, the same block masks per iteration (drawn before any
timing by the trainer's generator, seeded per iteration), the same stochastic-depth seed per iteration. Only
the loss code differs:

* ``fastssl``: the trainer's ``Dinov3Loss``: ``fastssl.dinov3`` ``DINOLoss`` / ``iBOTPatchLoss``
  ``teacher_targets`` (fused Sinkhorn-Knopp: logits and row statistics, no ``[rows, K]`` probabilities) and
  their forwards (the Triton kernels on CUDA), ``KoLeoLoss``;
* ``authors-losses``: their code as they write it (``fastssl.reference.dinov3.AuthorsDinov3Loss``):
  Sinkhorn-Knopp in the linear domain in fp32, in place, the iBOT one through ``torch.compile`` as their
  ``SinkhornKnoppTeacher.compile()``; the CLS terms by an fp32 log-softmax of every crop and an einsum; iBOT's
  fp32 elementwise product with the targets and sum; their KoLeo (a B x B matmul, autocast off).

Measured per contender: the median step time over the timed steps after the warm-up (the median over rounds
of each round's median; a round builds the models afresh and runs the contenders in turn, the order rotated
each round), images/s = batch / that median, and on CUDA the peak of allocated memory over the timed steps
(models, optimiser state and the step's tensors) and what was allocated when they began. Before any timing,
on one forward of the teacher and student, both losses' totals and terms, and the gradients of the student's
last parameters (each head's last layer, the backbone's final norm; of the loss without KoLeo, whose gradient
at initialisation is rounding noise, see :func:`check`), are checked against each other to the autocast
dtype's tolerance.
"""

from __future__ import annotations

import gc
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import harness
from fastssl.ema import MomentumTeacher, cosine_momentum_schedule
from fastssl.reference import dinov3 as ref3
from fastssl.train.dinov3 import (
    N_GLOBAL,
    Dinov3Loss,
    apply_optim_schedule,
    build_dinov3_augment,
    build_dinov3_model,
    clip_each_,
    dinov3_param_groups,
    lr_scale,
)
from fastssl.train.dinov3_config import Dinov3Config
from fastssl.train.masking import BlockMasks, MaskingGenerator, block_masks, max_num_patches
from fastssl.train.presets import DINOV3_PRESETS
from fastssl.train.runtime import backward_and_step, step_seed
from fastssl.train.schedules import cosine_schedule

NAME = "dinov3_step"
CONTENDERS = ("fastssl", "authors-losses")
AUTHORS = "authors-losses"
GOALS = dict(vs_authors=1.3, mem_vs_authors=0.8)
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}


class CorrectnessError(AssertionError):
    """The two contenders' losses or gradients differ beyond the tolerance."""


@dataclass(frozen=True)
class Case:
    preset: str  # the trainer's preset the config derives from (fastssl/train/presets.py)
    batch: int  # images per step
    dtype: str  # autocast: "bf16", or "fp32" (none)
    overrides: tuple[tuple[str, Any], ...] = ()  # (field, value) on top of the preset
    image_size: tuple[int, int] = (375, 500)  # (H, W) of the uint8 images; every other one transposed

    def config(self) -> Dinov3Config:
        precision = "bf16" if self.dtype == "bf16" else "fp32"
        return DINOV3_PRESETS[self.preset].replace(batch_size_per_gpu=self.batch, precision=precision,
                                                  **dict(self.overrides))

    @property
    def label(self) -> str:
        cfg = self.config()
        return (f"{cfg.arch} B={self.batch} 2+{cfg.local_crops_number} {cfg.global_crop_size}/{cfg.local_crop_size} "
                f"K={cfg.dino_out_dim} {self.dtype}")


@dataclass(frozen=True)
class Preset:
    cases: Sequence[Case]
    warmup: int  # untimed steps (compilation, autotuning, allocator) before the timed ones, each round
    steps: int  # timed steps, each round
    rounds: int = 1  # fresh models, the contenders in turn (order rotated)
    compile: bool = True  # the authors' iBOT Sinkhorn-Knopp through torch.compile, as theirs
    note: str = ""

    def __post_init__(self):
        # The teacher temperature changes every iteration of its warm-up: torch.compile specialises the authors'
        # Sinkhorn-Knopp on the first value and recompiles it once, on the second, with the float symbolic. Both
        # compilations belong in the warm-up.
        if self.warmup < 2 or self.steps < 1 or self.rounds < 1:
            raise ValueError(f"{NAME}: a preset needs warmup >= 2, steps >= 1 and rounds >= 1")


_VITS16 = "dinov3_vits16_im1k"  # vit_small_patch16_dinov3_qkvb, no storage tokens, drop path 0.1, K = 65,536
_TINY_HEADS = dict(dino_head_hidden_dim=64, dino_head_bottleneck_dim=32, ibot_head_hidden_dim=64,
                   ibot_head_bottleneck_dim=32)
PRESETS = {
    # The test suite's run: vit_pico (2 blocks of 32, 4 x 4 patches) on 16 px global and 8 px local crops, tiny
    # heads and K, bf16 autocast on the CPU (the targets' code path); timings mean nothing.
    "smoke": Preset([Case(_VITS16, 4, "bf16", tuple(dict(
        arch="vit_pico", n_storage_tokens=None, img_size=16, global_crop_size=16, local_crop_size=8,
        local_crops_number=2, dino_out_dim=256, ibot_out_dim=192, **_TINY_HEADS).items()), image_size=(24, 32))],
        warmup=2, steps=2, note="Smoke preset: a tiny model, K and images for the test suite; the numbers mean "
                                "nothing."),
    # A 2-core CPU: DINOv3's ViT-Ti/16 (the 12 blocks and parameter tensors of ViT-S) on 96/48 px crops (6 x 6
    # and 3 x 3 patches), 16 images, 2+8 crops, K = 8,192 for both heads, fp32 (the trainer's CPU precision).
    "cpu": Preset([Case(_VITS16, 16, "fp32", tuple(dict(
        arch="vit_tiny_patch16_dinov3_qkvb", global_crop_size=96, local_crop_size=48, dino_out_dim=8192,
        ibot_out_dim=8192).items()), image_size=(188, 250))], warmup=2, steps=5,
        note="CPU preset: DINOv3's ViT-Ti/16 on 96/48 px crops, K = 8,192, fp32; not the issue's target."),
    # The target: the dinov3_vits16_im1k preset (ViT-S/16, 2 x 224 + 8 x 96 crops, K = 65,536 for both
    # heads) at 64 images per GPU, bf16.
    "target": Preset([Case(_VITS16, 64, "bf16")], warmup=5, steps=30, rounds=2),
    # The lease command's (its stage has 120 s, the models' builds, the check and the authors' torch.compile
    # included): the target, one round of few steps.
    "lease": Preset([Case(_VITS16, 64, "bf16")], warmup=3, steps=10, rounds=1),
}


def default_preset(device: torch.device) -> str:
    return "target" if device.type == "cuda" else "cpu"


def _log(msg: str) -> None:
    print(f"[{NAME}] {msg}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the inputs

@dataclass
class Inputs:
    """What every contender's steps read, made before any timing."""

    images: list[torch.Tensor]  # uint8 [3, H, W] on the device
    augment: torch.nn.Module
    generator: torch.Generator  # the augmentation's, on the device; seeded per iteration
    masks: list[tuple[BlockMasks, torch.Tensor]]  # per iteration: the masks and the collate's count tensor
    lr: list[float]
    wd: list[float]
    last_layer_lr: list[float]
    teacher_temp: list[float]
    momentum: list[float]
    seed: int


def _photo_like(height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 ``[3, H, W]``: smooth random content over a few scales (what a crop of it holds does not change
    the step's work)."""
    x = torch.zeros(1, 3, height, width)
    for cell, amp in ((64, 1.0), (8, 0.5), (2, 0.3)):
        noise = torch.randn(1, 3, -(-height // cell) + 2, -(-width // cell) + 2, generator=gen)
        x += amp * F.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False)
    return (128 + 50 * x[0]).clamp_(0, 255).to(torch.uint8)


def draw_masks(cfg: Dinov3Config, batch: int, iters: int, patch: int, seed: int) -> list[BlockMasks]:
    """The block masks of iterations ``0 .. iters - 1`` on the host, as the trainer draws them (its generator,
    seeded per iteration)."""
    grid = cfg.global_crop_size // patch
    mask_generator = MaskingGenerator((grid, grid), min_num_patches=cfg.mask_min_num_patches,
                                      max_num_patches=max_num_patches(cfg.global_crop_size, patch),
                                      min_aspect=cfg.mask_min_aspect)
    masks = []
    for it in range(iters):  # the trainer's draw of iteration `it`
        mask_seed = step_seed(seed + 1, 0, it)
        masks.append(block_masks(N_GLOBAL * batch, mask_generator, cfg.mask_ratio_min_max,
                                 cfg.mask_sample_probability, random.Random(mask_seed),
                                 np.random.RandomState(mask_seed % 2**32),
                                 random_circular_shift=cfg.mask_random_circular_shift))
    return masks


def masked_counts(case: Case, preset: Preset, patch: int, seed: int = 0) -> list[int]:
    """The masked patches of each iteration a run of ``preset`` (seed ``seed``) draws for ``case``: the iBOT
    rows, whose count the Triton launches specialise on (``benchmarks.workloads`` records them)."""
    return [m.n_masked for m in draw_masks(case.config(), case.batch, preset.warmup + preset.steps, patch, seed)]


def make_inputs(cfg: Dinov3Config, case: Case, preset: Preset, patch: int, device: torch.device,
                seed: int) -> Inputs:
    """The images, the trainer's augmentation and schedules, and the masks of every iteration (``patch``: the
    backbone's patch size)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = case.image_size
    images = [_photo_like(*((h, w) if i % 2 == 0 else (w, h)), gen).to(device) for i in range(case.batch)]
    iters = preset.warmup + preset.steps
    masks = []
    for m in draw_masks(cfg, case.batch, iters, patch, seed):
        m = m.to(device)
        masks.append((m, torch.full((1,), m.n_masked, dtype=torch.long).to(device)))
    # The trainer's schedules (iterations 0.. of a run of the preset's length).
    niter, epochs = cfg.official_epoch_length or 1, cfg.epochs
    base_lr = cfg.lr * lr_scale(cfg.scaling_rule, case.batch)
    lr = cosine_schedule(base_lr, cfg.min_lr, epochs, niter, cfg.warmup_epochs)
    last_lr = lr.copy()
    last_lr[: cfg.freeze_last_layer_epochs * niter] = 0.0
    wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, epochs, niter)
    temp = cosine_schedule(cfg.teacher_temp, cfg.teacher_temp, epochs, niter, cfg.warmup_teacher_temp_epochs,
                           cfg.warmup_teacher_temp)
    momentum = cosine_momentum_schedule(cfg.momentum_teacher, cfg.final_momentum_teacher, epochs, niter)
    return Inputs(images, build_dinov3_augment(cfg).to(device), torch.Generator(device=device), masks,
                  lr[:iters].tolist(), wd[:iters].tolist(), last_lr[:iters].tolist(), temp[:iters].tolist(),
                  momentum.tolist(), seed)


# ----------------------------------------------------------------------------- the contenders' loss code

@dataclass
class LossCode:
    """A contender: its teacher targets (computed before the student's forward, as both trainers) and its loss."""

    name: str
    module: torch.nn.Module
    targets: Callable  # (teacher CLS logits, teacher masked logits, temp, masks, count tensor) -> targets
    loss: Callable  # (student outputs, targets, masks, B) -> (total, {term: value})


def build_loss(name: str, cfg: Dinov3Config, device: torch.device, compile_sinkhorn: bool) -> LossCode:
    if name == "fastssl":
        fused = Dinov3Loss(cfg).to(device)

        def loss(outs, targets, masks: BlockMasks, B: int):
            s_global, s_local, s_masked, g_cls = outs
            return fused(s_global.unflatten(0, (N_GLOBAL, B)), s_local.unflatten(0, (-1, B)), s_masked,
                         g_cls.unflatten(0, (N_GLOBAL, B)), *targets, masks)

        return LossCode(name, fused, lambda t_cls, t_masked, temp, masks, count: fused.teacher_targets(
            t_cls, t_masked, temp), loss)
    if name == AUTHORS:
        if cfg.centering != "sinkhorn_knopp" or cfg.koleo_loss_distributed:
            raise ValueError(f"{NAME}: the authors' step is Sinkhorn-Knopp with the per-process KoLeo")
        theirs = ref3.AuthorsDinov3Loss(student_temp=cfg.student_temp, dino_weight=cfg.dino_loss_weight,
                                        koleo_weight=cfg.koleo_loss_weight, ibot_weight=cfg.ibot_loss_weight,
                                        ignore_diagonal=cfg.global_ignore_diagonal,
                                        compile_sinkhorn=compile_sinkhorn).to(device)

        # Their trainer has no autocast (FSDP2 computes in bf16 parameters): their loss code gets the bf16 outputs
        # and runs as written, its einsums in fp32. Under the trainer's autocast they would run in bf16 instead.
        def targets(t_cls, t_masked, temp, masks: BlockMasks, count):
            with torch.autocast(device.type, enabled=False):
                return theirs.teacher_targets(t_cls, t_masked, temp, count)

        def loss(outs, targets, masks: BlockMasks, B: int):
            s_global, s_local, s_masked, g_cls = outs
            # get_student_output / compute_losses: [crops, B, ...] views, n_masked_patches = mask_indices.shape[0]
            with torch.autocast(device.type, enabled=False):
                return theirs(s_global.unflatten(0, (N_GLOBAL, B)), s_local.unflatten(0, (-1, B)), s_masked,
                              g_cls.unflatten(0, (N_GLOBAL, B)), *targets, masks.masks, masks_weight=masks.weights,
                              n_masked_patches=masks.indices.shape[0])

        return LossCode(name, theirs, targets, loss)
    raise ValueError(f"unknown contender {name!r}")


# ----------------------------------------------------------------------------- the trainer's state and step

@dataclass
class Trainer:
    student: Any
    teacher_net: Any
    teacher: MomentumTeacher
    optimizer: torch.optim.Optimizer


def _models(cfg: Dinov3Config, device: torch.device, seed: int):
    """Student and teacher as the trainer builds them: the teacher without stochastic depth, loaded from the
    student; the same weights for every contender."""
    torch.manual_seed(seed)
    student = build_dinov3_model(cfg).to(device)
    teacher_net = build_dinov3_model(cfg, drop_path_rate=0.0).to(device)
    teacher_net.load_state_dict(student.state_dict())
    return student, teacher_net


def build_trainer(cfg: Dinov3Config, device: torch.device, inputs: Inputs, seed: int) -> Trainer:
    student, teacher_net = _models(cfg, device, seed)
    teacher = MomentumTeacher(student, inputs.momentum, teacher=teacher_net)
    optimizer = torch.optim.AdamW(dinov3_param_groups(student, cfg.layerwise_decay, cfg.patch_embed_lr_mult),
                                  betas=(cfg.adamw_beta1, cfg.adamw_beta2), fused=device.type == "cuda")
    return Trainer(student, teacher_net, teacher, optimizer)


def _crops(inputs: Inputs, it: int):
    inputs.generator.manual_seed(step_seed(inputs.seed, 0, it))
    return inputs.augment(inputs.images, generator=inputs.generator)


def train_step(tr: Trainer, code: LossCode, cfg: Dinov3Config, inputs: Inputs, it: int, device: torch.device,
               amp: torch.dtype | None) -> list[float]:
    """One iteration of the trainer with ``code``'s losses; returns the loss, its terms and the gradient norms
    (the trainer's one host sync per step)."""
    apply_optim_schedule(tr.optimizer, inputs.lr[it], inputs.wd[it], inputs.last_layer_lr[it])
    global_crops, local_crops = _crops(inputs, it)
    masks, count = inputs.masks[it]
    B = len(inputs.images)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        teacher_cls, teacher_masked = tr.teacher_net.teacher_outputs(global_crops, masks.indices)
        targets = code.targets(teacher_cls, teacher_masked, inputs.teacher_temp[it], masks, count)
        outs = tr.student(global_crops, local_crops, masks.masks, masks.indices)
        loss, parts = code.loss(outs, targets, masks, B)
    norms: list[torch.Tensor] = []

    def before_step():
        if cfg.clip_grad > 0:
            norms.extend(clip_each_(tr.student, cfg.clip_grad))

    backward_and_step(loss, tr.optimizer, None, before_step)
    tr.teacher.update(it)
    return torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values()),
                        *(n.float() for n in norms)]).tolist()


# ----------------------------------------------------------------------------- correctness

def _last_parameters(student) -> dict[str, torch.nn.Parameter]:
    """The student's last parameters: each head's last layer and the backbone's final norm."""
    named = dict(student.named_parameters())
    keys = [k for k in named if k.startswith(("dino_head.last_layer.", "ibot_head.last_layer."))]
    keys += [k for k in named if k.startswith("backbone.norm.")]
    return {k: named[k] for k in keys}


def check(student, teacher_net, case: Case, codes: dict[str, LossCode], inputs: Inputs, device: torch.device,
          amp: torch.dtype | None, seed: int) -> dict[str, float]:
    """One forward of the teacher and the student (iteration 0's crops and masks), each contender's targets, loss
    and gradients of the student's last parameters on those outputs, each against the authors' code. Raises
    :class:`CorrectnessError` beyond the autocast dtype's tolerance. Also compiles what compiles.

    The gradients are those of the loss without its KoLeo term (the loss and every term, KoLeo's included, are
    checked): a fresh DINOv3 backbone (layer scale 1e-5) gives every image the same CLS token to about 1e-10
    (cosine), so KoLeo's nearest-neighbour distances are below fp32's resolution and its gradient is rounding
    noise in any implementation, the authors' included (a float64 reference differs from both by O(1)). Its
    gradient is tested on separated inputs (tests/test_koleo.py)."""
    koleo_scale = case.config().koleo_loss_weight * N_GLOBAL  # compute_losses' KoLeo weight and scale
    global_crops, local_crops = _crops(inputs, 0)
    masks, count = inputs.masks[0]
    params = _last_parameters(student)
    torch.manual_seed(step_seed(seed + 2, 0, 0))
    results = {}
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        teacher_cls, teacher_masked = teacher_net.teacher_outputs(global_crops, masks.indices)
        outs = student(global_crops, local_crops, masks.masks, masks.indices)
    for name, code in codes.items():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            targets = code.targets(teacher_cls, teacher_masked, inputs.teacher_temp[0], masks, count)
            loss, parts = code.loss(outs, targets, masks, case.batch)
        grads = torch.autograd.grad(loss - koleo_scale * parts["koleo_loss"], list(params.values()),
                                    retain_graph=True)
        results[name] = (loss.detach(), {k: v.detach() for k, v in parts.items()}, grads)
        del targets, loss, parts
    want_loss, want_parts, want_grads = results[AUTHORS]
    tol = TOLERANCE[case.dtype]
    errors: dict[str, float] = {}
    for name, (loss, parts, grads) in results.items():
        if name == AUTHORS:
            continue
        errs = {"loss": harness.rel_err(loss, want_loss)}
        errs.update((term, harness.rel_err(parts[term], want_parts[term])) for term in want_parts)
        errs.update((f"grad {k}", harness.rel_err(g, w)) for k, g, w in zip(params, grads, want_grads, strict=True))
        worst = max(errs, key=lambda k: errs[k] if errs[k] == errs[k] else float("inf"))
        if not errs[worst] <= tol:  # also catches NaN
            raise CorrectnessError(f"{NAME} {case.label}: {name}'s {worst} differs from the authors' loss code by "
                                   f"{errs[worst]:.3e} (relative) > {tol:.0e}")
        errors[f"{name}_loss_rel_err"] = max(v for k, v in errs.items() if not k.startswith("grad "))
        errors[f"{name}_grad_rel_err"] = max(v for k, v in errs.items() if k.startswith("grad "))
    del outs, results, teacher_cls, teacher_masked
    return errors


# ----------------------------------------------------------------------------- measuring

def measure(code: LossCode, cfg: Dinov3Config, inputs: Inputs, preset: Preset, device: torch.device,
            amp: torch.dtype | None, seed: int) -> dict:
    """A fresh trainer; ``preset.warmup`` untimed steps, then ``preset.steps`` timed one by one (each ends with
    the trainer's host sync), the peak of allocated memory over them."""
    tr = build_trainer(cfg, device, inputs, seed)
    for it in range(preset.warmup):
        torch.manual_seed(step_seed(seed + 2, 0, it))
        train_step(tr, code, cfg, inputs, it, device, amp)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    state = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    times, values = [], []
    for it in range(preset.warmup, preset.warmup + preset.steps):
        torch.manual_seed(step_seed(seed + 2, 0, it))  # stochastic depth: the same draws for every contender
        t0 = time.perf_counter()
        values = train_step(tr, code, cfg, inputs, it, device, amp)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del tr
    _free(device)
    return dict(times_ms=times, peak=peak, state=state, loss=values[0])


def run_case(case: Case, preset: Preset, device: torch.device, contenders: Sequence[str], seed: int) -> list[dict]:
    cfg = case.config()
    amp = DTYPES[case.dtype]
    names = [c for c in CONTENDERS if c in contenders]
    student, teacher_net = _models(cfg, device, seed)
    patch = int(student.backbone.patch_embed.patch_size[0])
    inputs = make_inputs(cfg, case, preset, patch, device, seed)
    # The check needs the authors' code as the reference, whether or not it is timed.
    codes = {name: build_loss(name, cfg, device, preset.compile) for name in dict.fromkeys([*names, AUTHORS])}
    t0 = time.perf_counter()
    errors = check(student, teacher_net, case, codes, inputs, device, amp, seed)
    del student, teacher_net
    _free(device)
    _log(f"check passed in {time.perf_counter() - t0:.1f} s: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))

    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(preset.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            runs[name].append(measure(codes[name], cfg, inputs, preset, device, amp, seed))
            res = runs[name][-1]
            _log(f"round {r + 1}/{preset.rounds} {name}: median {statistics.median(res['times_ms']):.1f} ms a step "
                 f"({time.perf_counter() - t0:.1f} s with the warm-up)")

    masked = inputs.masks[0][0].n_masked
    stats = {}
    for name, rs in runs.items():
        medians = [statistics.median(r["times_ms"]) for r in rs]
        every = [t for r in rs for t in r["times_ms"]]
        peaks = [r["peak"] for r in rs if r["peak"] is not None]
        states = [r["state"] for r in rs if r["state"] is not None]
        median = statistics.median(medians)
        stats[name] = dict(median_ms=median, min_ms=min(every), max_ms=max(every), mean_ms=statistics.fmean(every),
                           round_medians_ms=medians, images_per_s=case.batch / (median * 1e-3),
                           peak_mem_mb=max(peaks) / 2**20 if peaks else None,
                           state_mem_mb=max(states) / 2**20 if states else None, loss=rs[-1]["loss"])
    theirs = stats.get(AUTHORS)
    records = []
    for name, st in stats.items():
        rec = dict(case=case.label, contender=name, arch=cfg.arch, B=case.batch,
                   crops=f"2+{cfg.local_crops_number}", K=cfg.dino_out_dim, dtype=case.dtype,
                   masked_patches=masked, warmup_steps=preset.warmup, steps=preset.steps, rounds=preset.rounds,
                   authors_sinkhorn_compiled=preset.compile, **st)
        if theirs is not None:
            rec["speedup"] = st["images_per_s"] / theirs["images_per_s"]
            if st["peak_mem_mb"] is not None and theirs["peak_mem_mb"]:
                rec["mem_vs_authors"] = st["peak_mem_mb"] / theirs["peak_mem_mb"]
        if name != AUTHORS:
            rec["loss_rel_err"] = errors.get(f"{name}_loss_rel_err")
            rec["grad_rel_err"] = errors.get(f"{name}_grad_rel_err")
            rec["tolerance"] = TOLERANCE[case.dtype]
        records.append(rec)
    del inputs, codes
    _free(device)
    return records


def run(preset: Preset, device: torch.device, info: dict, *, contenders: Sequence[str] | None = None,
        cases: Sequence[Case] | None = None, seed: int = 0) -> list[dict]:
    contenders = contenders or CONTENDERS
    return harness.run_cases(NAME, cases or preset.cases, preset.cases,
                             lambda c, sd: run_case(c, preset, device, contenders, sd), seed)


# ----------------------------------------------------------------------------- reporting

def target_lines(records: Sequence[dict], on_cuda: bool) -> list[str]:
    """Issue 20's targets, one line each, for every case both contenders ran: judged PASS / FAIL on CUDA at the
    issue's shape only (the ``target`` preset's case: ViT-S/16, 64 images, bf16, 2 x 224 + 8 x 96 crops,
    K = 65,536); elsewhere the number without a verdict, and "not measured" where there is none (a CPU run's
    memory)."""
    target = PRESETS["target"].cases[0].label
    lines = []
    for case in dict.fromkeys(r["case"] for r in records):
        rows = {r["contender"]: r for r in records if r["case"] == case}
        if "fastssl" not in rows or AUTHORS not in rows:
            continue
        ours = rows["fastssl"]
        judged = on_cuda and case == target
        lines.append(f"Targets (issue 20), {case}, the training step against the same step with the authors' "
                     "loss code" + ("" if case == target or not on_cuda else " (not the issue's shape: not judged)")
                     + ":")
        for text, value, goal, higher in (
                (f">= {GOALS['vs_authors']}x the images/s", ours.get("speedup"), GOALS["vs_authors"], True),
                (f"<= {GOALS['mem_vs_authors']}x the peak memory", ours.get("mem_vs_authors"),
                 GOALS["mem_vs_authors"], False)):
            line = harness.goal_line(text, value, "x", goal, judged, higher=higher)
            if on_cuda and not judged and value is not None:
                line = f"- {text}: {value:.2f}x not judged (not the issue's shape)"
            lines.append(line)
    return lines


def columns(records: Sequence[dict]) -> list[str]:
    cols = ["case", "contender", "images_per_s", "speedup", "median_ms", "min_ms", "max_ms", "peak_mem_mb",
            "state_mem_mb", "mem_vs_authors", "masked_patches", "loss", "loss_rel_err", "grad_rel_err"]
    return [c for c in cols if any(r.get(c) is not None for r in records)]


def notes(preset_name: str, preset: Preset, records: Sequence[dict], device: torch.device) -> str:
    lines = [
        f"Preset `{preset_name}`: per case and contender, {preset.rounds} round(s) of {preset.warmup} warm-up "
        f"steps then {preset.steps} timed steps, each on a fresh trainer from the same weights.",
        "A step: schedules, DinoAugment on the device, teacher forward and targets, student forward, the losses, "
        "backward, clipping, AdamW, the EMA, the trainer's one host sync (not timed: drawing the block masks, "
        "which the trainer does on the host, and seeding). Same images, crops (generator seeded per "
        "iteration), masks and stochastic-depth draws for both contenders; only the loss code differs.",
        "`median_ms`: the median over rounds of the per-round median step time (wall clock, the step's own sync "
        "at its end); `images_per_s` = B / that; `speedup` = images/s over the authors' loss code's.",
        "`peak_mem_mb`: the peak of allocated memory over the timed steps (models, optimiser state and the "
        "step's tensors); `state_mem_mb`: allocated when they began; `mem_vs_authors` = peak over the authors'.",
        f"`authors-losses`: fastssl.reference.dinov3.AuthorsDinov3Loss, their iBOT Sinkhorn-Knopp "
        f"{'through torch.compile (as theirs)' if preset.compile else 'eager'}, the rest eager as theirs.",
        "Checked before timing, on one forward: fastssl's total loss and its terms (`loss_rel_err`, the worst) and "
        "the gradients of each head's last layer and of the backbone's final norm (`grad_rel_err`; of the loss "
        "less KoLeo, whose gradient is rounding noise at initialisation: every CLS token the same to 1e-10) "
        "against the "
        "authors' loss code, relative tolerance "
        + ", ".join(f"{t:.0e} ({d})" for d, t in TOLERANCE.items()) + ".",
    ]
    if device.type != "cuda":
        lines.append(f"CPU run on {torch.get_num_threads()} threads: fastssl's losses run their PyTorch paths (the "
                     "Triton kernels need a GPU); no memory columns; not the issue's target.")
    if preset.note:
        lines.append(preset.note)
    target = target_lines(records, device.type == "cuda")
    return "\n".join(f"- {line}" for line in lines) + ("\n\n" + "\n".join(target) if target else "")


def plot(records: list[dict], fig) -> None:
    """Images/s and (CUDA) peak memory per contender."""
    names = [r["contender"] for r in records]
    memory = any(r.get("peak_mem_mb") is not None for r in records)
    axes = fig.subplots(1, 2 if memory else 1, squeeze=False)[0]
    fig.set_size_inches(4 * len(axes), 4)
    axes[0].bar(names, [r["images_per_s"] for r in records], color="tab:blue")
    axes[0].set_title("images/s (median step)", fontsize=9)
    if memory:
        axes[1].bar(names, [(r.get("peak_mem_mb") or 0) / 1024 for r in records], color="tab:orange")
        axes[1].set_title("peak allocated memory (GiB)", fontsize=9)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    return harness.benchmark_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()

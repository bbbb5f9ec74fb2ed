"""The DINO training step: fastssl's trainer loop against the authors' way, images/s and peak memory.

    python -m benchmarks.train_step [--preset smoke|cpu|target] [--out DIR] [--device DEV]

Both contenders train the same model (``fastssl.train.dino.build_dino_model``, one backbone call
per crop resolution), from the same initial weights, with the same optimiser (AdamW over the
trainer's ``param_groups``), batch size, autocast (bf16 on CUDA, fp32 on the CPU) and clipping
(3.0 per parameter), reading the same folder of JPEG files:

* ``fastssl``: the trainer's way. Loader workers only read the files' bytes, decoded on the GPU
  (nvJPEG, ``decode_batch``; in the workers where nvJPEG is missing); every crop made on the
  device in one call (``DinoAugment``); the fused ``DinoLoss``; the vectorised per-parameter
  clipping; ``MomentumTeacher.update`` (one launch).
* ``authors``: the DINO authors' main_dino.py. ``torchvision.datasets.ImageFolder`` opening each
  JPEG with PIL and applying their ``DataAugmentationDINO`` in the loader workers, the default
  collate, ``.cuda(non_blocking=True)`` per crop, their per-pair loss loop (``AuthorsDINOLoss``),
  their clipping (one norm read back to the host per parameter) and their EMA loop.

Measured per contender: images/s in steady state (wall clock over the measured steps, a device
sync at both ends, waiting for data included), the peak of allocated GPU memory over those steps,
and, in a separate instrumented pass with a device sync between phases, the split of the step time.
Before any timing the fused loss and the one-launch EMA are checked against the authors' code on
the same crops (made by the authors' pipeline).
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from benchmarks import dino as dino_bench
from benchmarks import ema as ema_bench
from benchmarks import harness, multicrop
from fastssl.ema import MomentumTeacher, cosine_momentum_schedule
from fastssl.losses import DinoLoss
from fastssl.reference import AuthorsDINOLoss
from fastssl.train.cli import parse_args
from fastssl.train.data import ImageFolder, collate, decode_batch, gpu_jpeg_decoding_available
from fastssl.train.dino import build_augment, build_dino_model, clip_gradients_, param_groups

NAME = "train_step"
CONTENDERS = ("fastssl", "authors")
PHASES = ("data", "augment", "forward", "loss", "backward", "optimiser", "ema")
GOALS = dict(vs_authors=1.3, mem_vs_authors=0.8)
EPOCH = 0  # the loss's teacher-temperature epoch (the authors' default schedule is flat: 0.04)
CHECK_MOMENTUM = 0.5  # the EMA check's momentum: large enough that an error shows
PREFETCH = 2  # DataLoader's default prefetch_factor: batches each worker may hold ready


class CorrectnessError(AssertionError):
    """fastssl's loss or EMA update differs from the authors' beyond the tolerance."""


@dataclass(frozen=True)
class Case:
    arch: str
    global_size: int
    local_size: int
    n_local: int
    out_dim: int
    batch: int

    @property
    def label(self) -> str:
        return (f"{self.arch} B={self.batch} 2+{self.n_local} {self.global_size}/{self.local_size} "
                f"K={self.out_dim}")


@dataclass(frozen=True)
class Preset:
    cases: Sequence[Case]
    image_sizes: Sequence[tuple[int, int]]  # (H, W) of the JPEG files, in turn
    files: int  # JPEG files written; the loaders cycle through them
    warmup: int  # steps before the measurement, on top of the loader's queue depth
    steps: int  # measured steps (steady state)
    profile_steps: int  # steps of the instrumented pass
    authors_workers: int
    fastssl_workers: int
    note: str = ""


_IMAGENET_SIZES = ((375, 500), (500, 375), (333, 500), (400, 400))
PRESETS = {
    # The test suite's run: a 2-block ViT on tiny images, no workers; timings mean nothing.
    "smoke": Preset(cases=(Case("vit_pico", 32, 16, 2, 256, 4),), image_sizes=((48, 64), (64, 48)), files=8,
                    warmup=1, steps=2, profile_steps=1, authors_workers=0, fastssl_workers=0,
                    note="Smoke preset: tiny images and model for the test suite; the numbers mean nothing."),
    # A 2-core CPU: ViT-Ti/16 (ViT-S's 12 blocks and parameter tensors, which the authors' clipping and EMA
    # loop over) on 64/32 px crops of quarter-size images. No loader workers: on 2 cores a worker and the
    # trainer's threads would oversubscribe them; data loading is then part of each step, serially.
    "cpu": Preset(cases=(Case("vit_tiny_patch16_224", 64, 32, 6, 8192, 16),), image_sizes=((188, 250), (250, 188)),
                  files=48, warmup=2, steps=6, profile_steps=2, authors_workers=0, fastssl_workers=0,
                  note="CPU preset: ViT-Ti/16 on 64/32 px crops of quarter-size images, no loader workers (2 cores): "
                       "each step loads its batch in the main process."),
    # The problem: ViT-S/16, 64 images per GPU, 2+10 crops, 224/96, out_dim 65536, bf16.
    "target": Preset(cases=(Case("vit_small_patch16_224", 224, 96, 10, 65536, 64),), image_sizes=_IMAGENET_SIZES,
                     files=512, warmup=5, steps=40, profile_steps=8, authors_workers=10, fastssl_workers=4),
}


def default_preset(device: torch.device) -> str:
    return "target" if device.type == "cuda" else "cpu"


def _log(msg: str) -> None:
    print(f"[{NAME}] {msg}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the images

def _photo_like(height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 ``[3, H, W]``: smooth random content over several scales, so JPEG sizes are a photo's.

    Octaves of bicubic-upsampled noise with a shared (luma) part, plus a little grain; at
    375 x 500 and quality 90 the files are about 90 KB (ImageNet's average is about 110 KB).
    """
    x = torch.zeros(1, 3, height, width)
    for cell, amp in ((96, 1.0), (24, 0.5), (6, 0.45), (2, 0.4)):
        h, w = -(-height // cell) + 3, -(-width // cell) + 3
        noise = torch.randn(1, 3, h, w, generator=gen) + 2 * torch.randn(1, 1, h, w, generator=gen)
        x += amp * F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=False)
    x += 0.1 * torch.randn(1, 3, height, width, generator=gen)
    return (128 + 40 * x[0]).clamp_(0, 255).to(torch.uint8)


def write_images(root: Path, preset: Preset, seed: int) -> dict:
    """``preset.files`` JPEGs in ``root/synthetic/`` (an ImageFolder of one class); their count and mean size."""
    from torchvision.io import encode_jpeg, write_file

    folder = root / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for i in range(preset.files):
        height, width = preset.image_sizes[i % len(preset.image_sizes)]
        data = encode_jpeg(_photo_like(height, width, gen), quality=90)
        write_file(str(folder / f"{i:05d}.jpg"), data)
        total += data.numel()
    return {"jpeg_files": preset.files, "jpeg_kb_mean": total / preset.files / 1024}


def sample_order(n_files: int, length: int, seed: int) -> list[int]:
    """``length`` file indices, each pass over the files in a fresh random order (both loaders use it)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < length:
        order += torch.randperm(n_files, generator=gen).tolist()
    return order[:length]


class AuthorsTransform:
    """``multicrop._authors(crops_only=False)`` for a case, built on first use in each worker:
    its closures do not pickle (spawn / forkserver loader workers), this does."""

    def __init__(self, case: Case, cfg: dict):
        self.kwargs = dict(global_size=case.global_size, local_size=case.local_size, n_local=case.n_local,
                           global_scale=tuple(cfg["global_crops_scale"]),
                           local_scale=tuple(cfg["local_crops_scale"]))
        self.fn = None

    def __getstate__(self):
        return {"kwargs": self.kwargs, "fn": None}

    def __call__(self, img):
        if self.fn is None:
            self.fn = multicrop._authors(False, **self.kwargs)
        return self.fn(img)


# ----------------------------------------------------------------------------- the config

def make_config(case: Case) -> dict:
    """The trainer's complete config (the authors' defaults) for the case."""
    argv = ["dino", "--data", "unused", "--arch", case.arch, "--out-dim", str(case.out_dim),
            "--batch-size-per-gpu", str(case.batch), "--local-crops-number", str(case.n_local),
            "--global-crop-size", str(case.global_size), "--local-crop-size", str(case.local_size)]
    return vars(parse_args(argv))


def _loss_modules(cfg: dict, case: Case, device: torch.device):
    args = (cfg["out_dim"], 2 + case.n_local, cfg["warmup_teacher_temp"], cfg["teacher_temp"],
            cfg["warmup_teacher_temp_epochs"], cfg["epochs"])
    kwargs = dict(student_temp=cfg["student_temp"], center_momentum=cfg["center_momentum"])
    return DinoLoss(*args, **kwargs).to(device), AuthorsDINOLoss(*args, **kwargs).to(device)


def _models(cfg: dict, device: torch.device, seed: int):
    """Student and teacher, the teacher a copy of the student without stochastic depth (as both trainers)."""
    torch.manual_seed(seed)
    student = build_dino_model(cfg).to(device)
    teacher = build_dino_model(cfg, drop_path_rate=0.0).to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


# ----------------------------------------------------------------------------- correctness

def check(cfg: dict, case: Case, device: torch.device, amp: torch.dtype | None, root: Path, seed: int) -> dict:
    """fastssl's loss and EMA update against the authors' code, before any timing.

    The same crops (the authors' pipeline on the first images) through one student and teacher;
    ``DinoLoss`` and ``AuthorsDINOLoss`` on the same outputs (loss and updated center); one
    ``MomentumTeacher`` update and the authors' loop from the same teacher and a perturbed student.
    Raises :class:`CorrectnessError` beyond the tolerances of the dino and ema benchmarks.
    """
    from torchvision.datasets import ImageFolder as TorchvisionImageFolder

    dataset = TorchvisionImageFolder(str(root), transform=AuthorsTransform(case, cfg))
    per_image = [dataset[i][0] for i in range(case.batch)]
    crops = [torch.stack(c).to(device) for c in zip(*per_image, strict=True)]
    student, teacher = _models(cfg, device, seed)
    dtype = "bf16" if amp is not None else "fp32"
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        globals_, locals_ = torch.cat(crops[:2]), torch.cat(crops[2:])
        student_out, teacher_out = student(globals_, locals_), teacher(globals_)
        fused, authors = _loss_modules(cfg, case, device)
        errors = {"loss_rel_err": harness.rel_err(fused(student_out, teacher_out, EPOCH),
                                                  authors(student_out, teacher_out, EPOCH)),
                  "center_rel_err": harness.rel_err(fused.center, authors.center)}
    tol = dino_bench.TOLERANCE[dtype]
    for key in ("loss_rel_err", "center_rel_err"):
        if not errors[key] <= tol:  # also catches NaN
            raise CorrectnessError(f"train_step {case.label}: fastssl's DinoLoss {key.removesuffix('_rel_err')} "
                                   f"differs from AuthorsDINOLoss by {errors[key]:.3e} (relative) > {tol:.0e}")

    # EMA: a student unlike the teacher, else the update is the identity and checks nothing.
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    ours, theirs = copy.deepcopy(teacher), copy.deepcopy(teacher)
    MomentumTeacher(student, CHECK_MOMENTUM, teacher=ours).update()
    ema_bench._authors(list(theirs.parameters()), list(student.parameters()), CHECK_MOMENTUM)
    _sync(device)
    flat = [torch.cat([p.detach().flatten() for p in net.parameters()]) for net in (ours, theirs)]
    errors["ema_rel_err"] = harness.rel_err(*flat)
    tol = ema_bench.TOLERANCE["fp32"]  # parameters stay fp32 under autocast
    if not errors["ema_rel_err"] <= tol:
        raise CorrectnessError(f"train_step {case.label}: MomentumTeacher's update differs from the authors' loop "
                               f"by {errors['ema_rel_err']:.3e} (relative) > {tol:.0e}")
    del student, teacher, ours, theirs, flat, crops
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return errors


# ----------------------------------------------------------------------------- the contenders

@dataclass
class Contender:
    """One way of training: where its crops come from, its loss, clipping and EMA."""

    name: str
    loader: DataLoader
    load: Callable  # the loader's next batch -> what forward / augment take, on the device
    augment: Callable | None  # that -> (globals, locals) on the device; None when the workers made the crops
    forward: Callable  # crops -> (teacher output, student output)
    loss: torch.nn.Module
    clip: Callable[[], None]
    ema: Callable[[int], None]
    optimizer: torch.optim.Optimizer
    decode: str  # what decodes the JPEGs, where
    workers: int


def _authors_clip(model: torch.nn.Module, clip: float) -> None:
    """The authors' utils.clip_gradients: per parameter, its gradient norm read back to the host
    (they log them) and a host-side test of the rescale factor: two syncs per parameter."""
    norms = []
    for p in model.parameters():
        if p.grad is None:
            continue
        norm = p.grad.detach().norm(2)
        norms.append(norm.item())
        factor = clip / (norm + 1e-6)
        if factor < 1:
            p.grad.detach().mul_(factor)


def build_fastssl(cfg: dict, case: Case, device: torch.device, root: Path, order: list[int], workers: int,
                  schedule, seed: int) -> Contender:
    raw = gpu_jpeg_decoding_available(device)
    loader = DataLoader(ImageFolder(root, raw_jpeg=raw), batch_size=case.batch, sampler=order, num_workers=workers,
                        collate_fn=collate, pin_memory=device.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    student, teacher_net = _models(cfg, device, seed)
    teacher = MomentumTeacher(student, schedule, teacher=teacher_net)
    augment, gen = build_augment(cfg), torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.AdamW(param_groups(student), lr=cfg["lr"] * case.batch / 256,
                                  weight_decay=cfg["weight_decay"])

    def load(batch):
        images, skipped = decode_batch(batch, device)
        if skipped or batch.skipped:
            raise RuntimeError(f"train_step: {skipped + batch.skipped} images could not be read")
        return images

    def forward(crops):
        globals_, locals_ = crops
        with torch.no_grad():
            teacher_out = teacher(globals_)
        return teacher_out, student(globals_, locals_)

    def clip():
        clip_gradients_(student, cfg["clip_grad"], "per_param")

    return Contender("fastssl", loader, load, lambda images: augment(images, generator=gen), forward,
                     _loss_modules(cfg, case, device)[0], clip, teacher.update, optimizer,
                     "nvJPEG (GPU)" if raw else "torchvision (CPU)", workers)


def build_authors(cfg: dict, case: Case, device: torch.device, root: Path, order: list[int], workers: int,
                  schedule, seed: int) -> Contender:
    from torchvision.datasets import ImageFolder as TorchvisionImageFolder

    dataset = TorchvisionImageFolder(str(root), transform=AuthorsTransform(case, cfg))
    loader = DataLoader(dataset, batch_size=case.batch, sampler=order, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    student, teacher = _models(cfg, device, seed)
    optimizer = torch.optim.AdamW(param_groups(student), lr=cfg["lr"] * case.batch / 256,
                                  weight_decay=cfg["weight_decay"])

    def load(batch):
        images, _ = batch
        return [im.to(device, non_blocking=True) for im in images]

    def forward(images):
        # Their MultiCropWrapper: crops of one resolution concatenated, one backbone call per resolution.
        with torch.no_grad():
            teacher_out = teacher(torch.cat(images[:2]))
        return teacher_out, student(torch.cat(images[:2]), torch.cat(images[2:]))

    def ema(it):
        ema_bench._authors(list(teacher.parameters()), list(student.parameters()), float(schedule[it]))

    return Contender("authors", loader, load, None, forward, _loss_modules(cfg, case, device)[1],
                     lambda: _authors_clip(student, cfg["clip_grad"]), ema, optimizer, "PIL (CPU)", workers)


# ----------------------------------------------------------------------------- the step

class PhaseClock:
    """The instrumented pass's timer: at each mark, a device sync, then the host time since the last mark."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.ms = dict.fromkeys(PHASES, 0.0)
        self.last = 0.0

    def start(self) -> None:
        if self.enabled:
            _sync(self.device)
            self.last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.enabled:
            _sync(self.device)
            now = time.perf_counter()
            self.ms[phase] += (now - self.last) * 1e3
            self.last = now


def train_step(c: Contender, batches, it: int, device: torch.device, amp: torch.dtype | None,
               clock: PhaseClock) -> tuple[float, float]:
    """One iteration, the same code for both contenders; returns the loss and the seconds spent
    waiting for the loader's next batch."""
    clock.start()
    t0 = time.perf_counter()
    batch = next(batches)
    wait = time.perf_counter() - t0
    data = c.load(batch)  # host-to-device, (GPU) decoding
    clock.mark("data")
    if c.augment is not None:
        data = c.augment(data)
        clock.mark("augment")
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        teacher_out, student_out = c.forward(data)
        clock.mark("forward")
        loss = c.loss(student_out, teacher_out, EPOCH)
    value = loss.item()  # both trainers stop on a non-finite loss: a sync per step in both
    if not math.isfinite(value):
        raise FloatingPointError(f"train_step: {c.name}'s loss is {value} at step {it}")
    clock.mark("loss")
    c.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clock.mark("backward")
    c.clip()
    c.optimizer.step()
    clock.mark("optimiser")
    c.ema(it)
    clock.mark("ema")
    return value, wait


def warm_up(c: Contender, batches, preset: Preset, device: torch.device, amp: torch.dtype | None) -> int:
    """The warm-up steps (compilation, autotuning, the loader's start); returns how many ran.

    While the first steps compile, the workers can queue up to ``workers x prefetch`` batches;
    a window opened on that backlog would time the model, not the loader. So after the preset's
    steps, go on until a step waits for its batch (the queue ran dry: the loader's own rate from
    then on), or for ``4 x`` the queue's depth more (the loader keeps up: a full queue is its
    steady state).
    """
    off = PhaseClock(device, enabled=False)
    limit = preset.warmup + 4 * c.workers * PREFETCH
    for it in range(limit):
        t0 = time.perf_counter()
        _, wait = train_step(c, batches, it, device, amp, off)
        if it + 1 >= preset.warmup and wait > 0.2 * (time.perf_counter() - t0):
            return it + 1
    return limit


def measure(c: Contender, preset: Preset, device: torch.device, amp: torch.dtype | None) -> dict:
    """Warm-up, the steady-state window (images/s, peak memory), then the instrumented pass."""
    batch = c.loader.batch_size
    batches = iter(c.loader)
    off = PhaseClock(device, enabled=False)
    it = warmup = warm_up(c, batches, preset, device, amp)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    state = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    ends = [time.perf_counter()]
    for _ in range(preset.steps):
        loss, _ = train_step(c, batches, it, device, amp, off)
        it += 1
        ends.append(time.perf_counter())
    _sync(device)
    ends[-1] = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    window = ends[-1] - ends[0]
    per_step = sorted((b - a) * 1e3 for a, b in zip(ends, ends[1:], strict=False))

    clock = PhaseClock(device, enabled=True)
    for _ in range(preset.profile_steps):
        train_step(c, batches, it, device, amp, clock)
        it += 1
    del batches  # stops the workers
    split = {f"{p}_ms": (ms / preset.profile_steps if p != "augment" or c.augment else None)
             for p, ms in clock.ms.items()}
    return dict(warmup_steps=warmup, steps=preset.steps, images_per_s=preset.steps * batch / window,
                step_ms=window * 1e3 / preset.steps, median_ms=statistics.median(per_step), min_ms=per_step[0],
                max_ms=per_step[-1], peak_mem_mb=None if peak is None else peak / 2**20,
                state_mem_mb=None if state is None else state / 2**20, loss=loss,
                profile_steps=preset.profile_steps, profiled_step_ms=sum(v for v in split.values() if v), **split)


# ----------------------------------------------------------------------------- running

def run_case(case: Case, preset: Preset, device: torch.device, contenders: Sequence[str], seed: int) -> list[dict]:
    cfg = make_config(case)
    amp = torch.bfloat16 if device.type == "cuda" else None
    dtype = "bf16" if amp is not None else "fp32"
    with tempfile.TemporaryDirectory(prefix="fastssl-train-step-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        files = write_images(root, preset, seed)
        _log(f"wrote {files['jpeg_files']} JPEGs ({files['jpeg_kb_mean']:.0f} KB on average) in "
             f"{time.perf_counter() - t0:.1f} s")
        errors = check(cfg, case, device, amp, root, seed)
        _log("check passed: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))

        # Enough batches for the longest warm-up (see warm_up), the window and the instrumented pass.
        total = preset.warmup + 4 * max(preset.authors_workers, preset.fastssl_workers) * PREFETCH + preset.steps \
            + preset.profile_steps
        order = sample_order(preset.files, total * case.batch, seed)
        # Both contenders see the same momentum schedule, that of a run of `total` steps per epoch.
        schedule = cosine_momentum_schedule(cfg["momentum_teacher"], 1.0, cfg["epochs"], total)
        builders = {"fastssl": (build_fastssl, preset.fastssl_workers),
                    "authors": (build_authors, preset.authors_workers)}
        results = {}
        for name in (c for c in CONTENDERS if c in contenders):
            build, workers = builders[name]
            contender = build(cfg, case, device, root, order, workers, schedule, seed)
            t0 = time.perf_counter()
            results[name] = dict(decode=contender.decode, workers=workers, **measure(contender, preset, device, amp))
            _log(f"{name}: {results[name]['images_per_s']:.1f} images/s ({time.perf_counter() - t0:.1f} s)")
            del contender
            gc.collect()  # the next contender's memory is measured alone
            if device.type == "cuda":
                torch.cuda.empty_cache()

    records = []
    theirs = results.get("authors")
    for name, res in results.items():
        rec = dict(case=case.label, contender=name, arch=case.arch, B=case.batch, crops=f"2+{case.n_local}",
                   dtype=dtype, **res, **files)
        if theirs is not None:
            rec["speedup"] = res["images_per_s"] / theirs["images_per_s"]
            if res["peak_mem_mb"] is not None:
                rec["mem_vs_authors"] = res["peak_mem_mb"] / theirs["peak_mem_mb"]
        if name == "fastssl":
            rec.update(errors)
        records.append(rec)
    return records


def run(preset: Preset, device: torch.device, info: dict, *, contenders: Sequence[str] | None = None,
        cases: Sequence[Case] | None = None, seed: int = 0) -> list[dict]:
    contenders = contenders or CONTENDERS
    return harness.run_cases(NAME, cases or preset.cases, preset.cases,
                             lambda c, sd: run_case(c, preset, device, contenders, sd), seed)


# ----------------------------------------------------------------------------- reporting

def target_lines(records: Sequence[dict], on_cuda: bool) -> list[str]:
    rows = {r["contender"]: r for r in records}
    if "fastssl" not in rows or "authors" not in rows:
        return []
    ours = rows["fastssl"]
    lines = [f"Targets (issue), {ours['case']}:"]
    checks = [(f">= {GOALS['vs_authors']}x the authors' images/s", ours.get("speedup"), GOALS["vs_authors"], True),
              (f"<= {GOALS['mem_vs_authors']}x the authors' peak memory", ours.get("mem_vs_authors"),
               GOALS["mem_vs_authors"], False)]
    lines += [harness.goal_line(text, value, "x", goal, on_cuda, higher=higher) for text, value, goal, higher in checks]
    return lines


def notes(preset_name: str, preset: Preset, records: Sequence[dict], device: torch.device) -> str:
    files = records[0] if records else {}
    lines = [
        f"Preset `{preset_name}`: {files.get('jpeg_files')} synthetic photo-like JPEGs "
        f"({', '.join(f'{h}x{w}' for h, w in preset.image_sizes)}, {files.get('jpeg_kb_mean', 0):.0f} KB on "
        "average), read from disk (page cache) by both loaders.",
        "`images_per_s`: steady state, wall clock over the measured steps (device sync at both ends), waiting "
        "for data included. `warmup_steps` (JSON): the preset's, then on until a step waits for its batch "
        "(batches queued during compilation used up) or 4 x workers x prefetch factor more. `median_ms` "
        "(JSON): of the per-step times.",
        "`peak_mem_mb`: the peak of allocated GPU memory over the measured steps (models, optimiser state and "
        "the step's tensors); `state_mem_mb`: allocated when the window opened.",
        "`*_ms` split: a separate instrumented pass with a device sync between phases, mean per step. On a GPU "
        "it is slower than the steady state (the syncs remove the overlap of data loading, host and device "
        "work): read it for the shares, `images_per_s` for the speed. `data` = waiting for the loader + "
        "host-to-device copy + decoding (nvJPEG on a GPU for fastssl); `augment` = DinoAugment on the device "
        "(fastssl only: the authors' crops are made in the loader); `optimiser` includes the clipping.",
        "Checked before timing, on the same crops (authors' pipeline): DinoLoss against AuthorsDINOLoss (loss "
        "and center, `loss_rel_err`, `center_rel_err`) and MomentumTeacher against the authors' EMA loop "
        "(`ema_rel_err`).",
        "Not timed: the per-iteration lr / weight-decay assignment and the frozen last layer of epoch 0 "
        "(the same for both).",
    ]
    if device.type != "cuda":
        lines.append(f"CPU run on {torch.get_num_threads()} threads, fp32: every fastssl op runs its PyTorch path "
                     "(the Triton kernels and nvJPEG need a GPU); no memory column.")
    if preset.note:
        lines.append(preset.note)
    target = target_lines(records, device.type == "cuda")
    return "\n".join(f"- {line}" for line in lines) + ("\n\n" + "\n".join(target) if target else "")


def columns(records: Sequence[dict]) -> list[str]:
    cols = ["contender", "dtype", "decode", "workers", "images_per_s", "speedup", "step_ms", "peak_mem_mb",
            "mem_vs_authors", *(f"{p}_ms" for p in PHASES), "profiled_step_ms"]
    return [c for c in cols if any(r.get(c) is not None for r in records)]


def plot(records: list[dict], fig) -> None:
    """Images/s, peak memory (CUDA) and the step split per contender."""
    names = [r["contender"] for r in records]
    memory = any(r.get("peak_mem_mb") is not None for r in records)
    axes = fig.subplots(1, 3 if memory else 2)
    fig.set_size_inches(4 * len(axes), 4)
    axes[0].bar(names, [r["images_per_s"] for r in records], color="tab:blue")
    axes[0].set_title("images/s (steady state)", fontsize=9)
    if memory:
        axes[1].bar(names, [(r.get("peak_mem_mb") or 0) / 1024 for r in records], color="tab:orange")
        axes[1].set_title("peak allocated GPU memory (GiB)", fontsize=9)
    bottom = [0.0] * len(records)
    for phase in PHASES:
        values = [r.get(f"{phase}_ms") or 0.0 for r in records]
        axes[-1].bar(names, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes[-1].set_title("step split, instrumented pass (ms)", fontsize=9)
    axes[-1].legend(fontsize=7)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    return harness.benchmark_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()

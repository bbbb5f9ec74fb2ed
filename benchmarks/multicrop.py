"""DINO multi-crop: fastssl.MultiCrop against torchvision per image, kornia, and the authors' CPU pipeline.

    python -m benchmarks.multicrop [--preset smoke|cpu|target] [--out DIR] [--device DEV]

B uint8 images of ImageNet size (3 x 375 x 500) to 2 global 224 px and 10 local 96 px crops
(bicubic, antialiased, flipped at random, normalised to float32, crop-major). Contenders, on
the benchmark's device and the same input tensor:

* ``fastssl``: ``fastssl.MultiCrop`` (boxes sampled on the device, one launch per crop size);
* ``fastssl-op``: the crop op alone (``resized_crops``: the tiled CUDA program on a GPU) on boxes
  sampled once, and ``fastssl-op-pixel`` (GPU only) the same with the one-thread-per-pixel program
  of ``csrc/crop_programs.h``, the kernel the tiled one replaced: what the kernel itself costs;
* ``torchvision-loop``: torchvision v2 ``RandomResizedCrop`` + ``RandomHorizontalFlip`` +
  ``ToDtype`` + ``Normalize`` called per image and per crop, the crops stacked crop-major;
* ``kornia``: ``kornia.augmentation`` ``RandomResizedCrop`` (bicubic) + flip + normalise, batched,
  one call per crop (when kornia is installed: the ``bench`` extra);
* ``fastssl-dino``: ``fastssl.DinoAugment``, the full DINO pipeline (crops + colour + blur + solarise),
  and ``fastssl-dino-core`` (CPU only) the same on one thread, the whole batch: on a CPU, uint8
  images take its 8-bit pipeline (per core against the authors' PIL pipeline, issue 22);
* ``authors-cpu`` / ``authors-cpu-crops``: the DINO authors' pipeline on PIL images
  (``DataAugmentationDINO`` of main_dino.py: RandomResizedCrop + flip + ColorJitter + grayscale +
  blur + solarise + ToTensor + Normalize), and its crop-only part, per image on one CPU thread:
  the throughput of one data-loader worker core.

Reported: median time per batch, images/s and crops/s (for the CPU pipelines: per core), and for
``fastssl`` the bandwidth of the bytes the op must move (uint8 source pixels read once, float32
crops written) against the measured copy bandwidth.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import fastssl
from benchmarks import harness

NAME = "multicrop"
GLOBAL, LOCAL, N_GLOBAL, N_LOCAL = 224, 96, 2, 10
GLOBAL_SCALE, LOCAL_SCALE = (0.4, 1.0), (0.05, 0.4)
MEAN, STD = fastssl.augment.IMAGENET_MEAN, fastssl.augment.IMAGENET_STD
CONTENDERS = ("fastssl", "fastssl-op", "fastssl-op-pixel", "torchvision-loop", "kornia", "fastssl-dino",
              "fastssl-dino-core", "authors-cpu", "authors-cpu-crops")
# Timed on one CPU thread: the throughput of one data-loader worker core.
PER_CORE = ("fastssl-dino-core", "authors-cpu", "authors-cpu-crops")
# Rows whose bytes are the op's (source read once, crops written once): their % of the copy bandwidth.
ROOFLINE_ROWS = ("fastssl", "fastssl-op", "fastssl-op-pixel")
GOALS = dict(vs_loop=10.0, roofline_pct=60.0)


@dataclass(frozen=True)
class Case:
    B: int
    H: int = 375
    W: int = 500

    @property
    def crops(self) -> int:
        return self.B * (N_GLOBAL + N_LOCAL)

    @property
    def label(self) -> str:
        return f"B={self.B} {self.H}x{self.W} -> {N_GLOBAL}x{GLOBAL}+{N_LOCAL}x{LOCAL}"


@dataclass(frozen=True)
class Preset:
    cases: Sequence[Case]
    warmup: int | None = None
    reps: int | None = None
    authors_images: int = 16  # images timed through the per-core PIL pipeline
    contenders: Sequence[str] = CONTENDERS
    note: str = ""


PRESETS = {
    "smoke": Preset(cases=(Case(B=2, H=64, W=80),), warmup=0, reps=2, authors_images=1,
                    contenders=("fastssl", "fastssl-op", "torchvision-loop", "authors-cpu-crops"),
                    note="Tiny images for the test suite, three contenders: timings mean nothing."),
    "cpu": Preset(cases=(Case(B=8),), warmup=1, reps=5, authors_images=8),
    "target": Preset(cases=(Case(B=256),), authors_images=32),
}


def default_preset(device: torch.device) -> str:
    return "target" if device.type == "cuda" else "cpu"


def bytes_moved(case: Case) -> int:
    """Bytes the op must move: the uint8 source pixels read once, the float32 crops written once."""
    out = case.B * (N_GLOBAL * GLOBAL**2 + N_LOCAL * LOCAL**2) * 3 * 4
    return case.B * 3 * case.H * case.W + out


# ----------------------------------------------------------------------------- contenders

def _fastssl_op(images: torch.Tensor, mc: fastssl.MultiCrop, gen: torch.Generator, pixel: bool) -> dict:
    """The crop op alone on boxes sampled once: the tiled program, and the pixel program if asked."""
    from fastssl.ops._crops import _pack, _resized_crops

    params = mc.sample_params(images, gen)
    kw = dict(interpolation=mc.interpolation, antialias=mc.antialias, mean=mc.mean, std=mc.std,
              out_dtype=mc.out_dtype, channels_last=mc.channels_last, check_on_host=False)

    def op(program=None):
        packed = _pack(images)
        return (_resized_crops(packed, params.global_boxes, mc.global_size, flips=params.global_flips,
                               crops_per_image=mc.n_global, program=program, **kw),
                _resized_crops(packed, params.local_boxes, mc.local_size, flips=params.local_flips,
                               crops_per_image=mc.n_local, program=program, **kw))

    fns = {"fastssl-op": op}
    if pixel:
        ref = op()
        got = op("pixel")
        err = max((a - b).abs().max().item() for a, b in zip(ref, got, strict=True))
        if err > 1e-3:
            raise AssertionError(f"multicrop: the pixel and tiled programs differ by {err:.3g}")
        fns["fastssl-op-pixel"] = lambda: op("pixel")
    return fns


def _torchvision_loop(images: torch.Tensor):
    import torchvision.transforms.v2 as T

    def pipeline(size, scale):
        return T.Compose([T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC,
                                              antialias=True),
                          T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])

    g, loc = pipeline(GLOBAL, GLOBAL_SCALE), pipeline(LOCAL, LOCAL_SCALE)

    def run():
        globals_ = [torch.stack([g(im) for im in images]) for _ in range(N_GLOBAL)]
        locals_ = [torch.stack([loc(im) for im in images]) for _ in range(N_LOCAL)]
        return torch.cat(globals_), torch.cat(locals_)

    return run


def _kornia(images: torch.Tensor):
    import kornia.augmentation as K

    def pipeline(size, scale):
        return K.AugmentationSequential(
            K.RandomResizedCrop((size, size), scale=scale, resample="BICUBIC", align_corners=False),
            K.RandomHorizontalFlip(), K.Normalize(torch.tensor(MEAN), torch.tensor(STD))).to(images.device)

    g, loc = pipeline(GLOBAL, GLOBAL_SCALE), pipeline(LOCAL, LOCAL_SCALE)

    def run():
        x = images.float().div_(255)
        return torch.cat([g(x) for _ in range(N_GLOBAL)]), torch.cat([loc(x) for _ in range(N_LOCAL)])

    return run


def _authors(crops_only: bool, *, global_size: int = GLOBAL, local_size: int = LOCAL, n_local: int = N_LOCAL,
             global_scale=GLOBAL_SCALE, local_scale=LOCAL_SCALE):
    """The DINO authors' DataAugmentationDINO (main_dino.py), written against torchvision v1 and PIL.

    Returns ``img -> [2 global crops, n_local local crops]``, normalised float32 ``[3, S, S]`` tensors;
    the sizes default to the issue's (the train_step benchmark passes smaller ones).
    """
    from PIL import Image, ImageFilter, ImageOps
    from torchvision import transforms as T

    class RandomPIL:  # utils.GaussianBlur / utils.Solarization: applied with probability p
        def __init__(self, p, fn):
            self.p, self.fn = p, fn

        def __call__(self, img):
            return self.fn(img) if random.random() <= self.p else img

    def blur(p):
        return RandomPIL(p, lambda im: im.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0))))

    normalize = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    if crops_only:
        flip_jitter, blur1, blur2, blur_l, sol = T.RandomHorizontalFlip(), None, None, None, None
    else:
        flip_jitter = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2)])
        blur1, blur2, blur_l, sol = blur(1.0), blur(0.1), blur(0.5), RandomPIL(0.2, ImageOps.solarize)

    def compose(*steps):
        return T.Compose([s for s in steps if s is not None])

    rrc = lambda size, scale: T.RandomResizedCrop(size, scale=scale, interpolation=Image.BICUBIC)
    g1 = compose(rrc(global_size, global_scale), flip_jitter, blur1, normalize)
    g2 = compose(rrc(global_size, global_scale), flip_jitter, blur2, sol, normalize)
    loc = compose(rrc(local_size, local_scale), flip_jitter, blur_l, normalize)
    return lambda img: [g1(img), g2(img)] + [loc(img) for _ in range(n_local)]


# ----------------------------------------------------------------------------- running

def _log(msg: str) -> None:
    print(f"[{NAME}] {msg}", file=sys.stderr, flush=True)


def check(images: torch.Tensor, mc: fastssl.MultiCrop) -> float:
    """Largest difference of fastssl's crops from torchvision's resized_crop on the same boxes (a few crops)."""
    import torchvision.transforms.v2.functional as TF

    _, loc, p = mc(images, return_params=True)
    m, s = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    err = 0.0
    for n in range(min(4, loc.shape[0])):
        i, top, left, h, w = p.local_boxes[n].long().tolist()
        ref = TF.resized_crop(images[i].cpu().float(), top, left, h, w, [LOCAL, LOCAL],
                              interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        ref = TF.horizontal_flip(ref) if p.local_flips[n] else ref
        err = max(err, (loc[n].cpu() - (ref / 255 - m) / s).abs().max().item())
    if err > 1e-3:
        raise AssertionError(f"multicrop: fastssl's crops differ from torchvision's by {err:.3g}")
    return err


def run_case(case: Case, preset: Preset, device: torch.device, contenders: Sequence[str], info: dict,
             seed: int) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(0, 256, (case.B, 3, case.H, case.W), generator=gen, device=device, dtype=torch.uint8)
    mc = fastssl.MultiCrop(GLOBAL, LOCAL, N_GLOBAL, N_LOCAL, GLOBAL_SCALE, LOCAL_SCALE)
    dino = fastssl.DinoAugment(GLOBAL, LOCAL, N_LOCAL, GLOBAL_SCALE, LOCAL_SCALE)
    max_err = check(images, mc)
    fns = {}
    if "fastssl" in contenders:
        fns["fastssl"] = lambda: mc(images, gen)
    if "fastssl-op" in contenders or "fastssl-op-pixel" in contenders:
        fns.update(_fastssl_op(images, mc, gen, pixel="fastssl-op-pixel" in contenders and device.type == "cuda"))
        if "fastssl-op" not in contenders:
            fns.pop("fastssl-op")
    if "torchvision-loop" in contenders:
        fns["torchvision-loop"] = _torchvision_loop(images)
    if "kornia" in contenders:
        try:
            fns["kornia"] = _kornia(images)
            fns["kornia"]()
        except Exception as exc:  # not installed, or an API it lacks
            _log(f"no kornia row: {type(exc).__name__}: {exc}")
            fns.pop("kornia", None)
    if "fastssl-dino" in contenders:
        fns["fastssl-dino"] = lambda: dino(images, gen)
    stats = harness.time_contenders(fns, device, warmup=preset.warmup, reps=preset.reps)

    # Per core: the authors' pipeline (PIL images, the first few images of the batch) and, on a CPU,
    # DinoAugment (the whole batch), each on one thread.
    n_auth = min(preset.authors_images, case.B)
    per_core = {}
    if "fastssl-dino-core" in contenders and device.type == "cpu":
        per_core["fastssl-dino-core"] = lambda: dino(images, gen)
    if any(c.startswith("authors") for c in contenders):
        from PIL import Image
        pils = [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in images[:n_auth]]
        for name in ("authors-cpu", "authors-cpu-crops"):
            if name in contenders:
                pipeline = _authors(crops_only=name.endswith("crops"))
                per_core[name] = lambda fn=pipeline: [fn(im) for im in pils]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, fn in per_core.items():
            st = harness.time_fn(fn, "cpu", warmup=preset.warmup, reps=preset.reps)
            st["peak_mem_bytes"] = None
            stats[name] = st
    finally:
        torch.set_num_threads(threads)

    records = []
    loop_ms = stats["torchvision-loop"]["median_ms"] if "torchvision-loop" in stats else None
    for name, st in stats.items():
        per_core = name in PER_CORE
        n_images = n_auth if name.startswith("authors") else case.B
        ms = st["median_ms"]
        rec = dict(case=case.label, contender=name, B=case.B, median_ms=ms, min_ms=st["min_ms"],
                   max_ms=st["max_ms"], reps=st["reps"], images=n_images,
                   images_per_s=n_images / (ms * 1e-3), crops_per_s=n_images * (N_GLOBAL + N_LOCAL) / (ms * 1e-3),
                   threads=1 if per_core else (torch.get_num_threads() if device.type == "cpu" else None),
                   peak_mem_mb=None if st.get("peak_mem_bytes") is None else st["peak_mem_bytes"] / 2**20)
        if loop_ms is not None and not per_core:
            rec["speedup_vs_loop"] = loop_ms / ms
        if name in ROOFLINE_ROWS:
            rec["bytes_moved"] = bytes_moved(case)
            rec["roofline_pct"] = harness.roofline_pct(rec["bytes_moved"], ms, info["copy_bandwidth_gbs"])
            rec["max_abs_err"] = max_err if name == "fastssl" else None
        records.append(rec)
    return records


def target_lines(records: Sequence[dict], on_cuda: bool) -> list[str]:
    rows = {r["contender"]: r for r in records}
    if "fastssl" not in rows:
        return []
    ours = rows["fastssl"]
    lines = [f"Targets (issue), {ours['case']}:"]
    checks = [(f">= {GOALS['vs_loop']:.0f}x the throughput of the per-image torchvision loop",
               ours.get("speedup_vs_loop"), "x", GOALS["vs_loop"]),
              (f">= {GOALS['roofline_pct']:.0f}% of measured copy bandwidth", ours.get("roofline_pct"), "%",
               GOALS["roofline_pct"])]
    lines += [harness.goal_line(text, value, unit, goal, on_cuda) for text, value, unit, goal in checks]
    return lines


def cpu_target_lines(records: Sequence[dict], on_cpu: bool) -> list[str]:
    """Issue 22: DinoAugment on a CPU, per core, at least the authors' PIL pipeline per core. Judged on a
    CPU run only."""
    rows = {r["contender"]: r for r in records}
    if "fastssl-dino-core" not in rows or "authors-cpu" not in rows:
        return []
    ours, theirs = rows["fastssl-dino-core"]["images_per_s"], rows["authors-cpu"]["images_per_s"]
    return [f"CPU target (issue 22), {rows['fastssl-dino-core']['case']}:",
            harness.cpu_goal_line(f"DinoAugment per core ({ours:.1f} images/s) >= 1x the authors' PIL pipeline "
                                  f"per core ({theirs:.1f} images/s)", ours / theirs, "x", 1.0, on_cpu)]


def notes(preset_name: str, preset: Preset, records: Sequence[dict], device: torch.device) -> str:
    lines = [f"Preset `{preset_name}`: uint8 images to {N_GLOBAL}x{GLOBAL} + {N_LOCAL}x{LOCAL} bicubic "
             "antialiased crops, flipped, normalised float32, crop-major.",
             "`images_per_s`/`crops_per_s`: per batch call; for `authors-*` per core (one thread, PIL, the first "
             f"{preset.authors_images} images of the batch) and for `fastssl-dino-core` per core (one thread, the "
             "batch: on a CPU uint8 images take DinoAugment's 8-bit pipeline).",
             "`fastssl-dino` and `authors-cpu` run the full DINO pipeline (colour jitter, grayscale, blur, "
             "solarisation); the others crops only (`authors-cpu-crops` is the authors' crop-only part).",
             "`fastssl-op`: the crop op alone on boxes sampled once (on a GPU the tiled program); "
             "`fastssl-op-pixel` (GPU only): the same op with the one-thread-per-pixel program it replaced.",
             "Bytes (fastssl, fastssl-op*): uint8 source read once + float32 crops written once, against the measured "
             "copy bandwidth; `max_abs_err`: fastssl's crops against torchvision's resized_crop on the same boxes."]
    if device.type != "cuda":
        lines.append(f"CPU run on {torch.get_num_threads()} threads: `fastssl` is the C++ op "
                     "(at::parallel_for over crops), `torchvision-loop` the same cores.")
    if preset.note:
        lines.append(preset.note)
    target = target_lines(records, device.type == "cuda") + cpu_target_lines(records, device.type == "cpu")
    return "\n".join(f"- {line}" for line in lines) + ("\n\n" + "\n".join(target) if target else "")


def run(preset: Preset, device: torch.device, info: dict, *, contenders: Sequence[str] | None = None,
        cases: Sequence[Case] | None = None, seed: int = 0) -> list[dict]:
    contenders = contenders or preset.contenders
    return harness.run_cases(NAME, cases or preset.cases, preset.cases,
                             lambda c, sd: run_case(c, preset, device, contenders, info, sd), seed)


def columns(records: Sequence[dict]) -> list[str]:
    cols = ["case", "contender", "median_ms", "images_per_s", "crops_per_s", "threads", "speedup_vs_loop",
            "roofline_pct", "peak_mem_mb", "max_abs_err"]
    return [c for c in cols if any(r.get(c) is not None for r in records)]


def main(argv: list[str] | None = None) -> dict[str, Path]:
    return harness.benchmark_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()

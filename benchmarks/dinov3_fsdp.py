"""The DINOv3 trainer with and without FSDP2 on one GPU: images/s and peak memory (issue 21's target).

    python -m benchmarks.dinov3_fsdp [--preset smoke|target|lease] [--out DIR] [--device DEV]

Each contender is ``fastssl-train dinov3`` itself, run in this process on the same synthetic JPEG folder
(or the digits on the smoke preset) from the same seed, stopped after a few steps:

* ``fsdp``: ``--fsdp`` (FSDP2 on one process: every block, head and the root sharded over a group of one,
  parameters gathered in bf16, the teacher alike);
* ``plain``: the same run without it (one process, no wrapper).

Measured from the run's own ``log.jsonl``: the median ``images_per_s`` over the logged intervals after
the first (which holds the start-up), and the largest ``gpu_mem_gb`` (the peak of allocated memory, reset
before each contender). A run that does not fit (out of memory) is recorded as such. The target (issue
21): the authors' ViT-L/16 recipe (``dinov3_vitl16_im1k``) at 64 images, bf16, reported beside the run
without FSDP2 where that fits; no ratio is judged.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.train_step import write_images

NAME = "dinov3_fsdp"
CONTENDERS = ("fsdp", "plain")


@dataclass(frozen=True)
class Case:
    preset: str  # the trainer's preset
    batch: int
    precision: str

    @property
    def label(self) -> str:
        return f"{self.preset} B={self.batch} {self.precision}"


@dataclass(frozen=True)
class Preset:
    cases: Sequence[Case]
    steps: int  # trained steps per contender
    log_freq: int
    image_sizes: Sequence[tuple[int, int]] = ((375, 500), (500, 375))
    files: int = 128  # 0: the preset's own data (the digits)
    workers: int = 4
    note: str = ""


PRESETS = {
    "smoke": Preset(cases=(Case("dinov3_digits", 8, "fp32"),), steps=4, log_freq=1, files=0, workers=0,
                    note="Smoke preset: the digits preset's tiny ViT for the test suite; the numbers mean nothing."),
    "target": Preset(cases=(Case("dinov3_vitl16_im1k", 64, "bf16"),), steps=30, log_freq=5),
    "lease": Preset(cases=(Case("dinov3_vitl16_im1k", 64, "bf16"),), steps=12, log_freq=3, files=96),
}


def default_preset(device: torch.device) -> str:
    return "target" if device.type == "cuda" else "smoke"


def _train(case: Case, preset: Preset, data: str, out: Path, fsdp: bool, device: torch.device, seed: int) -> dict:
    from fastssl.train.cli import parse_args
    from fastssl.train.dinov3 import train_dinov3

    argv = ["dinov3", "--preset", case.preset, "--data", data, "--output-dir", str(out), "--seed", str(seed),
            "--batch-size-per-gpu", str(case.batch), "--precision", case.precision, "--stop-after-steps",
            str(preset.steps), "--log-freq", str(preset.log_freq), "--num-workers", str(preset.workers),
            "--device", device.type, "--knn-freq", "0", *(["--fsdp"] if fsdp else [])]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        train_dinov3(parse_args(argv))
    except torch.OutOfMemoryError as e:
        return {"fits": False, "error": str(e).splitlines()[0], "wall_s": time.perf_counter() - t0}
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "images_per_s" in r and "step" in r]
    rates = [r["images_per_s"] for r in steps[1:]] or [r["images_per_s"] for r in steps]
    return {"fits": True, "images_per_s": statistics.median(rates) if rates else None,
            "peak_mem_gb": max((r.get("gpu_mem_gb", 0.0) for r in steps), default=None) if device.type == "cuda"
            else None, "logged_intervals": len(steps), "wall_s": time.perf_counter() - t0}


def run(preset: Preset, device: torch.device, info: dict, *, contenders: Sequence[str] | None, cases: Sequence[Case],
        seed: int) -> list[dict]:
    records = []
    with tempfile.TemporaryDirectory(prefix="fastssl-fsdp-") as tmp:
        root = Path(tmp)
        data = "digits"
        if preset.files:
            info.update(write_images(root / "data", preset, seed))
            data = str(root / "data")
        for case in cases:
            for name in contenders or CONTENDERS:
                result = _train(case, preset, data, root / f"{name}-{case.batch}", name == "fsdp", device, seed)
                print(f"[{NAME}] {case.label} {name}: {result}", file=sys.stderr, flush=True)
                records.append(dict(case=case.label, contender=name, **result))
    return records


def columns(records: Sequence[dict]) -> list[str]:
    return ["case", "contender", "fits", "images_per_s", "peak_mem_gb", "logged_intervals", "wall_s"]


def target_lines(records: Sequence[dict], on_cuda: bool) -> list[str]:
    rows = {r["contender"]: r for r in records}
    if not on_cuda or "fsdp" not in rows:
        return ["Target (issue 21): ViT-L/16 DINOv3 under FSDP2 on one GPU at 64 images: not measured (CPU run)"]
    fsdp, plain = rows["fsdp"], rows.get("plain")
    lines = [f"Target (issue 21), {fsdp['case']}: FSDP2 on one GPU "
             + (f"{fsdp['images_per_s']:.1f} images/s, peak {fsdp['peak_mem_gb']:.1f} GB" if fsdp["fits"]
                else f"did not fit ({fsdp['error']})")]
    if plain is not None:
        lines.append("- beside it, without FSDP2: " + (f"{plain['images_per_s']:.1f} images/s, peak "
                                                         f"{plain['peak_mem_gb']:.1f} GB" if plain["fits"]
                                                         else f"did not fit ({plain['error']})"))
    return lines


def notes(preset_name: str, preset: Preset, records: Sequence[dict], device: torch.device) -> str:
    text = [f"- Preset `{preset_name}`: {preset.steps} steps per contender, logged every {preset.log_freq}; "
            "images/s is the median over the logged intervals after the first, memory the largest logged peak.",
            "- Both contenders are `fastssl-train dinov3` on the same data and seed; `fsdp` adds `--fsdp`."]
    if preset.note:
        text.append(f"- {preset.note}")
    return "\n".join(text + [""] + target_lines(records, device.type == "cuda"))


def plot(records: Sequence[dict], fig) -> None:
    """images/s per contender (a run that did not fit: 0)."""
    ax = fig.add_subplot(1, 1, 1)
    ax.bar([f"{r['contender']}\n{r['case']}" for r in records], [r.get("images_per_s") or 0.0 for r in records])
    ax.set_ylabel("images/s")


def main(argv: list[str] | None = None) -> dict[str, Path]:
    return harness.benchmark_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()

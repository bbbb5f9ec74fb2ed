"""The lease command: the truth about every target, from one short GPU window.

    python -m benchmarks.lease [--budget SECONDS] [--out DIR] [--dry-run]
    bash benchmarks/gpu_session.sh lease [--budget SECONDS]      # what a GPU session runs

A lent GPU comes for 15 minutes in all, its start included, 10 minutes a command, 8 files
back. This command ends by itself within ``--budget`` (default 300 s), leaving the window
room for a fix and a second run, and is worth running even when cut short: it runs its
stages in order of value, each under a budget of its own, and writes what it has the moment
a stage ends.

Stages, in order (budget / the least time it needs to start, seconds, at --budget 300):

====================  =========  ============================================================
install                45 / 10   ``pip install -e .`` without building the extension (seconds)
extension             240 / -    in the background from here on: ``fastssl._C`` compiled just
                                 in time for this GPU's architecture only (ninja, all cores)
precompile             60 / 10   every Triton variant the lease launches (benchmarks.workloads,
                                 recorded, nothing run), compiled in parallel on all cores
info                   15 / 5    ``python -m fastssl.info``, nvidia-smi
kernel-checks          60 / 15   each Triton op at fixed sizes against float64
                                 (benchmarks.kernel_checks): the wrong numbers a GPU shows
gpu-tests             120 / 30   the tests only a GPU runs (``pytest -m gpu``): the CUDA crop
                                 programs against their CPU emulation, the EMA captured in a
                                 CUDA graph, the trainers on CUDA in bf16 with nvJPEG
bench-dino             60 / 20   the headline benchmarks at the issues' target shapes (their
bench-dinov3           75 / 25   ``lease`` presets: fwd+bwd, 2 input sets), each ending with
bench-gram             60 / 20   its target lines judged PASS / FAIL
bench-koleo            30 / 10
bench-ema              30 / 10
bench-paws             60 / 20
bench-multicrop        45 / 15
bench-train_step       75 / 30
bench-dinov3_step     120 / 60   issue 20's DINOv3 training step (ViT-S/16, 64 images, bf16)
bench-dinov3_fsdp     150 / 90   issue 21's DINOv3 ViT-L/16 trainer at 64 images, bf16, with and without --fsdp
                                 against the same step with the authors' loss code, few steps
sweep-dino            120 / 60   wider sweeps, with whatever is left
sweep-paws            120 / 60
====================  =========  ============================================================

A stage that no longer fits is skipped and said so; one that runs past its budget is killed
(its process group) and said so. Files under ``--out`` (``$OUT`` on the GPU machine, at most
8 come back): ``lease.log`` (every stage's command and output), ``lease.json`` (all results,
with versions, commit and GPU), ``lease.md`` (the summary: stages, every target line, failed
checks) and ``plots.tar.gz`` (the benchmarks' plots). Commit them under
``benchmarks/results/<gpu>/``.

``--dry-run`` walks every stage on the CPU with the same budgeting (kernels under Triton's
interpreter, the benchmarks' ``smoke`` presets, no install and no compile); CI runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclasses.dataclass
class Stage:
    name: str
    budget: float            # at most this many seconds
    minimum: float           # skipped when less than this is left
    argv: list[str]          # the command on a GPU
    dry_argv: list[str] | None = None  # the command of a dry run (None: the same)
    needs_extension: bool = False
    bench: str | None = None  # a benchmark module whose results and target lines to collect
    preset: str | None = None
    background: bool = False
    env: dict = dataclasses.field(default_factory=dict)


def _bench(name: str, budget: float, minimum: float, preset: str = "lease", needs_extension: bool = False,
           dry_preset: str = "smoke", stage: str | None = None, extra: tuple = ()) -> Stage:
    argv = [PY, "-m", f"benchmarks.{name}", "--preset", preset, *extra]
    dry = [PY, "-m", f"benchmarks.{name}", "--preset", dry_preset, "--device", "cpu"]
    return Stage(stage or f"bench-{name}", budget, minimum, argv, dry, needs_extension, bench=name, preset=preset)


def stages() -> list[Stage]:
    install = [PY, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."]
    return [
        # The extension is left to the next stage, which builds it for this GPU alone, in the background.
        Stage("install", 45, 10, install, dry_argv=[PY, "-c", "import fastssl.kernels; print('installed')"],
              env=dict(FASTSSL_NO_EXTENSION="1")),
        Stage("extension", 240, 0, [PY, "-c", "from fastssl import _ext; print(_ext.load_extension())"],
              background=True),
        Stage("precompile", 60, 10, [PY, "-m", "benchmarks.lease", "precompile"],
              dry_argv=[PY, "-m", "benchmarks.lease", "precompile", "--record-only"]),
        Stage("info", 15, 5, [PY, "-m", "fastssl.info"]),
        Stage("kernel-checks", 60, 15, [PY, "-m", "benchmarks.kernel_checks", "--json", "{work}/checks.json"],
              dry_argv=[PY, "-m", "benchmarks.kernel_checks", "--device", "cpu", "--json", "{work}/checks.json"]),
        Stage("gpu-tests", 120, 30, [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
              needs_extension=True),
        _bench("dino", 60, 20),
        _bench("dinov3", 75, 25),
        _bench("gram", 60, 20),
        _bench("koleo", 30, 10),
        _bench("ema", 30, 10),
        _bench("paws", 60, 20),
        _bench("multicrop", 45, 15, needs_extension=True),
        _bench("train_step", 75, 30, needs_extension=True),
        # Issue 20's step (after the op headlines: model builds and the authors' torch.compile take most of it).
        _bench("dinov3_step", 120, 60, needs_extension=True),
        # Issue 21's: the DINOv3 ViT-L/16 trainer with and without --fsdp on one GPU (two model builds).
        _bench("dinov3_fsdp", 150, 90, needs_extension=True),
        _bench("dino", 120, 60, preset="full", stage="sweep-dino", extra=("--filter", "K=65536")),
        _bench("paws", 120, 60, preset="full", stage="sweep-paws", extra=("--filter", "bf16")),
    ]


def _presets(bench: str) -> tuple[str, ...]:
    """A benchmark's presets, imported only once the package is installed."""
    return tuple(importlib.import_module(f"benchmarks.{bench}").PRESETS)


# ----------------------------------------------------------------------------- precompile

_DTYPE_NAMES = ("fp32", "fp16", "bf16", "fp64", "i64", "i32", "i16", "i8", "u8", "i1")


def _warm(launches: list[dict]) -> list[str]:
    """Compile each recorded launch for this GPU through the JIT's own path (``warmup``: the same
    specialisation and on-disk cache as a run) on stand-in arguments of the same classes."""
    import torch

    dtypes = dict(zip(_DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                     torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool), strict=True))
    errors = []
    for launch in launches:
        fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        args = dict(launch["constexprs"], **launch["options"])
        for name, kind in launch["signature"].items():
            kind, _, hint = kind.partition(":")
            if kind.startswith("*"):
                base = torch.empty(64, dtype=dtypes[kind[1:]], device="cuda")
                args[name] = base if hint == "16" else base[1:]  # an address off 16 bytes
            elif kind == "fp32":
                args[name] = 0.5
            elif kind == "i1":
                args[name] = True
            else:  # the value class the JIT specialises on: 1, divisible by 16, neither; 64-bit
                args[name] = (2**33 if kind == "i64" else 0) + (1 if hint == "1" else 32 if hint == "16" else 17)
        try:
            fn.warmup(grid=(1,), **args)
        except Exception as exc:  # a variant a GPU cannot compile: the one thing this stage must show
            errors.append(f"{launch['kernel']} {launch['constexprs']}: {type(exc).__name__}: {str(exc)[:300]}")
    return errors


def precompile(record_only: bool, workers: int) -> int:
    """Record the lease's launches on this device, then compile them on ``workers`` processes."""
    import torch

    from benchmarks import workloads

    device = torch.device("cpu" if record_only else "cuda")
    t0 = time.perf_counter()
    launches = workloads.record(device)
    print(f"recorded {len(launches)} variants (cap {workloads.VARIANT_CAP}) in {time.perf_counter() - t0:.1f} s")
    if len(launches) > workloads.VARIANT_CAP:
        print(f"FAILED more variants than the cap: {len(launches)} > {workloads.VARIANT_CAP}")
        return 1
    if record_only:
        print("record only: nothing compiled")
        return 0
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        errors = [e for part in pool.map(_warm, [launches[i::workers] for i in range(workers)]) for e in part]
    for e in errors:
        print(f"FAILED {e}")
    print(f"compiled {len(launches)} variants on {workers} processes in {time.perf_counter() - t0:.1f} s, "
          f"{len(errors)} failed")
    return 1 if errors else 0


# ----------------------------------------------------------------------------- running the stages

class Lease:
    def __init__(self, out: Path, budget: float, dry_run: bool):
        self.out, self.budget, self.dry_run = out, budget, dry_run
        self.start = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="fastssl-lease-"))
        self.log = open(self.out / "lease.log", "a", buffering=1)
        self.results: dict = dict(meta=self._meta(), stages=[], benchmarks={}, checks=[])
        self.background: dict[str, tuple] = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if dry_run:
            self.env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")

    # -- clock
    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f} s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    # -- records
    def _meta(self) -> dict:
        def run(*cmd):
            try:
                return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                return ""

        return dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                    commit=run("git", "rev-parse", "--short", "HEAD"),
                    dirty=bool(run("git", "status", "--porcelain", "--untracked-files=no")),
                    gpu=run("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"),
                    python=sys.version.split()[0], dry_run=self.dry_run, budget_s=self.budget)

    def write(self) -> None:
        """lease.json and lease.md as they stand: called after every stage."""
        (self.out / "lease.json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        (self.out / "lease.md").write_text(self.summary())
        pngs = sorted(self.work.rglob("*.png"))
        if pngs:
            with tarfile.open(self.out / "plots.tar.gz", "w:gz") as tar:
                for png in pngs:
                    tar.add(png, arcname=png.name)

    def summary(self) -> str:
        meta = self.results["meta"]
        lines = [f"# fastssl lease{' (dry run, CPU)' if self.dry_run else ''}", "",
                 f"- GPU: {meta.get('gpu') or 'none'}; versions: {meta.get('versions', '?')}",
                 f"- commit {meta['commit']}{' (dirty)' if meta['dirty'] else ''}, {meta['date']}, "
                 f"budget {self.budget:.0f} s", "", "| stage | status | seconds | note |", "|---|---|---:|---|"]
        for st in self.results["stages"]:
            lines.append(f"| {st['name']} | {st['status']} | {st.get('seconds', 0):.1f} | {st.get('note', '')} |")
        targets = [t for b in self.results["benchmarks"].values() for t in b.get("target_lines", [])]
        lines += ["", "## Target lines", ""] + (targets or ["(none measured)"])
        compile_failures = self.results.get("precompile_failures", [])
        if compile_failures:
            lines += ["", f"## Variants that did not compile: {len(compile_failures)}", ""]
            lines += [f"- {f}" for f in compile_failures]
        checks = self.results["checks"]
        failed = [c for c in checks if not c["ok"]]
        lines += ["", f"## Kernel checks: {len(checks) - len(failed)} passed, {len(failed)} failed", ""]
        lines += [f"- FAIL {c['op']} {c['case']}: {c['what']} {c['rel_err']} (tol {c['tol']})" for c in failed]
        return "\n".join(lines) + "\n"

    # -- stages
    def run_stage(self, stage: Stage) -> None:
        left = self.left()
        record = dict(name=stage.name, status="pending")
        self.results["stages"].append(record)
        if left < max(stage.minimum, 1):
            record.update(status="skipped", note=f"{left:.0f} s left, it needs {stage.minimum:.0f} s")
            self.say(f"{stage.name}: skipped ({record['note']})")
            self.write()
            return
        if stage.needs_extension and not self.wait_extension(record):
            self.write()
            return
        argv = [a.replace("{work}", str(self.work)) for a in
                (stage.dry_argv if self.dry_run and stage.dry_argv else stage.argv)]
        if stage.bench and not self.dry_run and stage.preset not in _presets(stage.bench):
            argv[argv.index(stage.preset)] = "target"  # no lease preset: its targets, as it times them
        if stage.bench:
            bench_out = self.work / stage.name
            argv = [*argv, "--out", str(bench_out)]
        timeout = min(stage.budget, self.left() - 2)
        self.say(f"{stage.name}: {shlex.join(argv)} (at most {timeout:.0f} s)")
        log_path = self.work / f"{stage.name}.out"
        proc = subprocess.Popen(argv, cwd=REPO, env={**self.env, **stage.env}, stdout=open(log_path, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        if stage.background:
            self.background[stage.name] = (proc, time.monotonic(), stage, record, log_path)
            record.update(status="running")
            self.write()
            return
        rc, seconds = self._wait(proc, timeout)
        self._finish(stage, record, rc, seconds, log_path)

    def _wait(self, proc: subprocess.Popen, timeout: float) -> tuple[int | None, float]:
        t0 = time.monotonic()
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        return rc, time.monotonic() - t0

    def _finish(self, stage: Stage, record: dict, rc: int | None, seconds: float, log_path: Path) -> None:
        output = log_path.read_text(errors="replace")
        self.log.write(output if len(output) < 200_000 else output[:100_000] + "\n[...]\n" + output[-100_000:])
        tail = [line for line in output.strip().splitlines() if line.strip()][-1:] or [""]
        status = "killed" if rc is None else "ok" if rc == 0 else f"failed (exit {rc})"
        record.update(status=status, seconds=round(seconds, 1), note=tail[0][:160].replace("|", "/"))
        if rc is None:
            record["note"] = f"killed at its budget of {stage.budget:.0f} s; " + record["note"]
        if stage.name == "info":
            self.results["meta"]["versions"] = " ".join(line.strip() for line in output.splitlines()[:6])
        if stage.name == "kernel-checks" and (self.work / "checks.json").exists():
            self.results["checks"] = json.loads((self.work / "checks.json").read_text())
        if stage.name == "precompile":
            self.results["precompile_failures"] = [line[7:] for line in output.splitlines()
                                                   if line.startswith("FAILED ")]
        if stage.bench:
            self._collect_bench(stage, record)
        self.say(f"{stage.name}: {status} in {seconds:.1f} s")
        self.write()

    def _collect_bench(self, stage: Stage, record: dict) -> None:
        files = sorted((self.work / stage.name).glob("*.json"))
        if not files:
            return
        data = json.loads(files[-1].read_text())
        module = importlib.import_module(f"benchmarks.{stage.bench}")
        on_cuda = data["meta"].get("device", "").startswith("cuda")
        lines = module.target_lines(data["records"], on_cuda)
        self.results["benchmarks"][stage.name] = dict(preset=data["meta"].get("preset"), records=data["records"],
                                                      target_lines=lines, meta=data["meta"])
        verdicts = [line.rsplit(" ", 1)[-1] for line in lines if line.startswith("- ")]
        record["note"] = (f"preset {data['meta'].get('preset')}, {len(data['records'])} rows, target lines: "
                          f"{verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL"
                          + ("" if on_cuda else " (CPU: not judged)"))

    def wait_extension(self, record: dict) -> bool:
        """Join the background build; False (the stage then skipped) if it failed or is still running
        when no time is left."""
        if "extension" not in self.background:
            return True
        proc, started, stage, ext_record, log_path = self.background["extension"]
        if proc.poll() is None:
            self.say("waiting for the extension's build")
        rc, _ = self._wait(proc, min(stage.budget - (time.monotonic() - started), self.left() - 2))
        del self.background["extension"]
        self._finish(stage, ext_record, rc, time.monotonic() - started, log_path)
        if rc != 0:
            record.update(status="skipped", note="the extension did not build (see the extension stage)")
            self.say(f"{record['name']}: skipped, no extension")
            return False
        return True

    def run_all(self) -> int:
        self.say(f"lease: budget {self.budget:.0f} s{' (dry run)' if self.dry_run else ''}, results in {self.out}")
        self.write()
        for stage in stages():
            self.run_stage(stage)
        for name in list(self.background):  # a build still running at the end
            proc, started, stage, record, log_path = self.background.pop(name)
            rc, _ = self._wait(proc, max(self.left(), 0.1))
            self._finish(stage, record, rc, time.monotonic() - started, log_path)
        self.say(f"lease: done, {self.left():.0f} s of the budget left")
        self.write()
        failed = [s for s in self.results["stages"] if s["status"] not in ("ok", "skipped")]
        bad_checks = [c for c in self.results["checks"] if not c["ok"]]
        return 1 if failed or bad_checks else 0


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["precompile"]:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.lease precompile")
        parser.add_argument("--record-only", action="store_true", help="record and count, compile nothing")
        parser.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)))
        args = parser.parse_args(argv[1:])
        return precompile(args.record_only, args.workers)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lease", description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds the whole command may take")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/fastssl-lease")),
                        help="where lease.log, lease.json, lease.md and plots.tar.gz go (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="walk every stage on the CPU (smoke presets)")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget}")
    return Lease(args.out, args.budget, args.dry_run).run_all()


if __name__ == "__main__":
    sys.exit(main())

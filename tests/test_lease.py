"""The lease command's own clock: each stage under its budget, skipped when it no longer fits,
killed when it hangs, its results written the moment it ends."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

try:
    import benchmarks  # noqa: F401
except ImportError:  # plain `pytest` does not put the repository root on sys.path, `python -m pytest` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import lease  # noqa: E402

PY = sys.executable


def _stage(name, code, budget, minimum=0.0, **kw):
    return lease.Stage(name, budget, minimum, [PY, "-c", code], **kw)


def test_stages_keep_to_their_budgets(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(lease, "stages", lambda: [
        _stage("quick", "print('done quickly')", 10),
        # Written before the next stage starts: the next one reads the first one's record.
        _stage("reads-results", f"import json; d = json.load(open({str(out / 'lease.json')!r})); "
                                "assert d['stages'][0]['status'] == 'ok'; print('saw it')", 10),
        _stage("hangs", "import time; print('hanging', flush=True); time.sleep(60)", 1.5),
        _stage("too-big", "print('never')", 100, minimum=50),
        _stage("fails", "raise SystemExit(3)", 10),
        # In the background, as the extension's build: the stages that need it wait for it.
        _stage("extension", "import time; time.sleep(0.5); print('built')", 30, background=True),
        _stage("needs-background", "print('after the build')", 10, needs_extension=True),
    ])
    t0 = time.monotonic()
    rc = lease.Lease(out, budget=20.0, dry_run=False).run_all()
    elapsed = time.monotonic() - t0
    assert rc == 1  # a stage failed and one was killed
    assert elapsed < 20 + 5, f"the lease took {elapsed:.1f} s of a 20 s budget"
    data = json.loads((out / "lease.json").read_text())
    status = {s["name"]: s for s in data["stages"]}
    assert status["quick"]["status"] == "ok" and status["reads-results"]["status"] == "ok"
    assert status["hangs"]["status"] == "killed" and status["hangs"]["seconds"] < 5
    assert "killed at its budget of 2 s" in status["hangs"]["note"]
    assert status["too-big"]["status"] == "skipped" and "it needs 50 s" in status["too-big"]["note"]
    assert status["fails"]["status"] == "failed (exit 3)"
    assert status["extension"]["status"] == "ok" and status["needs-background"]["status"] == "ok"
    md = (out / "lease.md").read_text()
    assert "| hangs | killed |" in md and "| too-big | skipped |" in md
    log = (out / "lease.log").read_text()
    assert "done quickly" in log and "hanging" in log and "after the build" in log


def test_a_stage_that_needs_a_failed_build_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "stages", lambda: [
        _stage("extension", "raise SystemExit('no compiler')", 30, background=True),
        _stage("crops", "print('ran')", 10, needs_extension=True),
    ])
    rc = lease.Lease(tmp_path, budget=20.0, dry_run=False).run_all()
    status = {s["name"]: s for s in json.loads((tmp_path / "lease.json").read_text())["stages"]}
    assert rc == 1 and status["extension"]["status"] == "failed (exit 1)"
    assert status["crops"]["status"] == "skipped" and "did not build" in status["crops"]["note"]


@pytest.mark.parametrize("argv,message", [(["--budget", "0"], "--budget must be > 0"),
                                          (["--budget", "x"], "invalid float value")])
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        lease.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_every_stage_has_a_budget_and_the_headline_benchmarks_follow_the_checks():
    names = [s.name for s in lease.stages()]
    assert names[:6] == ["install", "extension", "precompile", "info", "kernel-checks", "gpu-tests"]
    assert {f"bench-{b}" for b in ("dino", "dinov3", "ema", "paws", "multicrop", "train_step")} <= set(names)
    # Issue 20's DINOv3 step after the op headlines (its model builds and torch.compile take most of its
    # budget), on its lease preset, with the extension (DinoAugment on the device), before the sweeps.
    step = next(s for s in lease.stages() if s.name == "bench-dinov3_step")
    assert names.index("bench-train_step") < names.index("bench-dinov3_step") < names.index("sweep-dino")
    assert names.index("bench-dinov3_step") < names.index("bench-dinov3_fsdp") < names.index("sweep-dino")
    assert step.preset == "lease" and step.needs_extension and step.budget <= 120
    assert all(s.budget > 0 and s.minimum <= s.budget for s in lease.stages())
    assert all(s.budget <= 600 for s in lease.stages())  # a device command runs 10 minutes at most

"""The trainer's typed configuration (fastssl/train/config.py and the config classes): the command line, the
presets and the saved config derived from it, every bad value refused by its option's name with exit code 2
before any file is written, errors without a traceback, and the static type check that catches a wrong name."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
from test_train import TINY, write_folder
from test_train_paws import TINY as PAWS_TINY

from fastssl.train.cli import main, parse_args, parse_command, preset_values
from fastssl.train.config import Options, RunConfig, differences, option, positive
from fastssl.train.dino_config import DinoConfig
from fastssl.train.errors import ConfigError
from fastssl.train.eval_config import AttentionConfig, KnnCommandConfig
from fastssl.train.methods import METHODS, Method
from fastssl.train.paws_config import PawsConfig

ROOT = Path(__file__).resolve().parents[1]
CLASSES: list[type[Options]] = [DinoConfig, PawsConfig, KnnCommandConfig, AttentionConfig]


def valid(cls: type[Options]) -> Options:
    """The class's defaults, plus what a command line must give."""
    required = {DinoConfig: dict(data="x"), PawsConfig: dict(data="x"),
                KnnCommandConfig: dict(checkpoint="c.pth", data="digits"),
                AttentionConfig: dict(checkpoint="c.pth", image="dog.jpg")}[cls]
    return cls(**required)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_option_is_declared_once_with_help_and_round_trips(cls):
    cfg = valid(cls)
    cfg.validate()  # the defaults (the authors') are valid
    flags = [cls.flag(f.name) for f in dataclasses.fields(cls)]
    assert len(set(flags)) == len(flags)
    for f in dataclasses.fields(cls):
        assert f.metadata["help"] and f.metadata["group"], f.name
    # config.json / a checkpoint's config: plain JSON, read back to the same config.
    plain = json.loads(json.dumps(cfg.to_dict()))
    assert plain["command"] == cls.command
    assert cls.from_dict(plain) == cfg
    # A typo in a dict given in code is an error; an unknown name in a saved config (another version) is not.
    with pytest.raises(ConfigError, match="unknown option.*: lrr"):
        cls.from_dict({**plain, "lrr": 1.0})
    assert cls.from_dict({**plain, "lrr": 1.0}, strict=False) == cfg


def test_the_command_line_is_the_config():
    """Each field is an option of its command with the field's default; nothing else is."""
    for name, method in METHODS.items():
        cfg = parse_args([name, "--data", "x"])
        assert type(cfg) is method.config
        assert cfg == method.config(data="x")
    cfg = parse_args(["dino", "--data", "x", "--lr", "0.002", "--global-crops-scale", "0.3", "1", "--compile",
                      "--norm-last-layer", "false"])
    assert (cfg.lr, cfg.global_crops_scale, cfg.compile, cfg.norm_last_layer) == (0.002, (0.3, 1.0), True, False)
    parsed = parse_command(["knn", "--checkpoint", "c.pth", "--data", "digits", "--image-size", "16"])
    assert parsed.config == KnnCommandConfig(checkpoint="c.pth", data="digits", global_crop_size=16)
    assert parsed.given == {"checkpoint", "data", "global_crop_size"}
    with pytest.raises(SystemExit):  # argparse: no abbreviations of option names
        parse_args(["dino", "--data", "x", "--epoch", "5"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_presets_are_valid_configs_and_options_override_them(method):
    m = METHODS[method]
    for name, preset in m.presets.items():
        assert type(preset) is m.config
        cfg = parse_args([method, "--data", "x", "--preset", name])  # validated
        for key, value in preset_values(preset).items():
            if key != "data":
                assert getattr(cfg, key) == value, (name, key)
        assert cfg.preset == name
        other = parse_args([method, "--data", "x", "--preset", name, "--epochs", "77"])
        assert other.epochs == 77 and other.replace(epochs=cfg.epochs) == cfg


def test_mismatch_check_names_the_differences_and_ignores_resumable_options():
    cfg = DinoConfig(data="x", out_dim=64)
    saved = cfg.to_dict()
    assert differences(saved, cfg.replace(output_dir="elsewhere", num_workers=3, knn_k=5, preset="demo")) == []
    assert differences(saved, cfg.replace(out_dim=32, lr=0.1)) == ["lr: checkpoint 0.0005, now 0.1",
                                                                    "out_dim: checkpoint 64, now 32"]
    # An option a checkpoint of an older version lacks compares as its default.
    older = {k: v for k, v in saved.items() if k != "solarize_p"}
    assert differences(older, cfg) == []
    assert differences(older, cfg.replace(solarize_p=0.5)) == ["solarize_p: checkpoint 0.2, now 0.5"]


# Each value the issue reproduced (and a few more), the option that must be named, and what is wrong.
BAD_DINO = [
    (["--lr", "-1"], "--lr must be > 0, got -1"),
    (["--clip-grad", "-1"], "--clip-grad must be >= 0, got -1"),
    (["--local-crops-scale", "0", "0"], "--local-crops-scale must be two fractions 0 < min <= max <= 1, got 0 0"),
    (["--global-crops-scale", "0.9", "0.2"], "--global-crops-scale must be two fractions 0 < min <= max <= 1, got "
                                             "0.9 0.2"),
    (["--min-lr", "1"], "--min-lr must be at most the peak learning rate, --lr x 8 images / 256 = 0.0003125, got 1"),
    (["--head-layers", "0"], "--head-layers must be >= 1, got 0"),
    (["--batch-size-per-gpu", "0"], "--batch-size-per-gpu must be >= 1, got 0"),
    (["--log-freq", "0"], "--log-freq must be >= 1, got 0"),
    (["--drop-path-rate", "1.5"], "--drop-path-rate must be in [0, 1), got 1.5"),
    (["--teacher-temp", "0"], "--teacher-temp must be > 0, got 0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--out-dim", "0"], "--out-dim must be >= 1, got 0"),
    (["--arch", "vit_nonesuch"], "--arch must be a timm model name or one of vit_digits, vit_pico"),
    (["--data", ""], "--data must not be empty, got ''"),
    (["--warmup-epochs", "3"], "--warmup-epochs must be at most --epochs 2, got 3"),
    (["--knn-freq", "1"], "--knn-freq needs --knn-data and --knn-val-data (or --data digits), got 1"),
    (["--momentum-teacher", "1.5"], "--momentum-teacher must be in [0, 1], got 1.5"),
    (["--stop-after-steps", "0"], "--stop-after-steps must be >= 1, got 0"),
    (["--arch", "resnet18"], "--img-size applies to ViTs only, not to --arch resnet18, got 16"),
]
BAD_PAWS = [
    (["--lr", "0"], "--lr must be > 0, got 0"),
    (["--final-lr", "5"], "--final-lr must be at most --lr 3.2, got 5"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1), got 1"),
    (["--color-jitter-strength", "3"], "--color-jitter-strength must be in [0, 2.5], got 3"),
    (["--labelled-list", "names.txt"], "give either --labelled-list or --labels-per-class, not both"),
    (["--classes-per-batch", "9"], "--classes-per-batch must be at most the 2 labelled classes, got 9"),
    (["--momentum", "0", "--nesterov"], "--nesterov needs --momentum > 0, got true"),
]


def _refused(tmp_path, monkeypatch, capsys, argv: list[str], message: str) -> None:
    """``main(argv)`` exits with 2 and one line naming the option, and writes nothing anywhere."""
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastssl-train {argv[0]}: error: {message}"), err
    assert "Traceback" not in err and err.count("\n") == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no file, no folder


@pytest.mark.parametrize("bad,message", BAD_DINO, ids=[" ".join(b) for b, _ in BAD_DINO])
def test_a_bad_dino_option_is_refused_by_name_before_any_file(tmp_path, monkeypatch, capsys, bad, message):
    data = write_folder(tmp_path / "data")
    _refused(tmp_path, monkeypatch, capsys, ["dino", "--data", str(data), "--output-dir", str(tmp_path / "out"),
                                             *TINY, *bad], message)


@pytest.mark.parametrize("bad,message", BAD_PAWS, ids=[" ".join(b) for b, _ in BAD_PAWS])
def test_a_bad_paws_option_is_refused_by_name_before_any_file(tmp_path, monkeypatch, capsys, bad, message):
    data = write_folder(tmp_path / "data")
    _refused(tmp_path, monkeypatch, capsys, ["paws", "--data", str(data), "--output-dir", str(tmp_path / "out"),
                                             *PAWS_TINY, *bad], message)


def test_bad_evaluation_options_are_refused_by_name(tmp_path, monkeypatch, capsys):
    _refused(tmp_path, monkeypatch, capsys, ["knn", "--checkpoint", "c.pth", "--data", "folder"],
             "--val-data (the labelled images to classify) is required with a folder --data")
    _refused(tmp_path, monkeypatch, capsys, ["knn", "--checkpoint", "c.pth", "--data", "digits", "--knn-k", "0"],
             "--knn-k must be >= 1, got 0")
    _refused(tmp_path, monkeypatch, capsys, ["attention", "--checkpoint", "c.pth", "--image", "dog.jpg",
                                             "--threshold", "0"], "--threshold must be > 0, got 0")


def test_data_and_checkpoint_errors_are_one_message_with_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["dino", "--data", str(tmp_path / "nope"), "--output-dir", str(out), *TINY]) == 1
    err = capsys.readouterr().err
    assert err == f"fastssl-train dino: error: data folder {str(tmp_path / 'nope')!r} does not exist\n"
    assert not out.exists()
    data = write_folder(tmp_path / "data")
    assert main(["dino", "--data", str(data), "--output-dir", str(out), *TINY, "--stop-after-steps", "1"]) == 0
    capsys.readouterr()
    assert main(["dino", "--data", str(data), "--output-dir", str(out), *TINY, "--out-dim", "32"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fastssl-train dino: error: {out / 'checkpoint.pth'} was written by a run with another "
                          "configuration") and "out_dim: checkpoint 64, now 32" in err and "Traceback" not in err
    assert main(["knn", "--checkpoint", str(tmp_path / "none.pth"), "--data", "digits"]) == 1
    assert capsys.readouterr().err.startswith("fastssl-train knn: error: checkpoint ")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["dino", "--data", str(data), "--output-dir", str(afile), *TINY]) == 2
    assert capsys.readouterr().err == f"fastssl-train dino: error: --output-dir {afile} is not a folder\n"
    assert afile.read_text() == "mine"
    # A run that fails before writing anything leaves no folder behind.
    assert main(["dino", "--data", str(data), "--output-dir", str(tmp_path / "new"), *TINY, "--resume",
                 str(tmp_path / "none.pth")]) == 1
    assert capsys.readouterr().err.startswith(f"fastssl-train dino: error: --resume {tmp_path / 'none.pth'}: no such")
    assert not (tmp_path / "new").exists()


def test_no_traceback_unless_debug(tmp_path):
    """As a person runs it: one line and exit code 2; --debug or FASTSSL_DEBUG=1 shows the traceback."""
    cmd = [sys.executable, "-m", "fastssl.train", "dino", "--data", "x", "--output-dir", str(tmp_path / "o"),
           "--lr", "-1"]
    env = {k: v for k, v in os.environ.items() if k != "FASTSSL_DEBUG"}
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 2 and plain.stderr == "fastssl-train dino: error: --lr must be > 0, got -1\n"
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError: --lr must be > 0" in debug.stderr
    via_env = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, FASTSSL_DEBUG="1"), timeout=300)
    assert via_env.returncode == 1 and "Traceback" in via_env.stderr
    assert not (tmp_path / "o").exists()


def test_type_check_finds_a_wrong_name(tmp_path):
    """`make lint` runs mypy over fastssl/train (pyproject.toml): a config option read under a wrong name, or a
    preset naming one that does not exist, fails it before anything runs."""
    if shutil.which("mypy") is None and subprocess.run([sys.executable, "-m", "mypy", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.skip("mypy is not installed (it is in the test extra: pip install -e '.[test]')")
    dino = (ROOT / "fastssl/train/dino.py").read_text()
    presets = (ROOT / "fastssl/train/presets.py").read_text()
    assert "cfg.lr * batch" in dino and "teacher_temp=0.07" in presets
    (tmp_path / "dino.py").write_text(dino.replace("cfg.lr * batch", "cfg.lrr * batch"))
    (tmp_path / "presets.py").write_text(presets.replace("teacher_temp=0.07", "teacher_tmp=0.07", 1))
    run = subprocess.run([sys.executable, "-m", "mypy", "--shadow-file", "fastssl/train/dino.py",
                          str(tmp_path / "dino.py"), "--shadow-file", "fastssl/train/presets.py",
                          str(tmp_path / "presets.py")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr
    assert '"DinoConfig" has no attribute "lrr"' in run.stdout
    assert 'Unexpected keyword argument "teacher_tmp" for "DinoConfig"' in run.stdout


def test_no_import_circle_and_nothing_imports_the_cli():
    """Every import between fastssl/train's modules (those inside functions too) forms no circle, and only the
    entry points import cli.py: defaults come from the config classes."""
    import ast

    package = ROOT / "fastssl" / "train"
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastssl.train."):
                deps.add(node.module.removeprefix("fastssl.train."))
        graph[path.stem] = {d.split(".")[0] for d in deps if (package / f"{d.split('.')[0]}.py").exists()}
    assert {m for m, deps in graph.items() if "cli" in deps} <= {"__init__", "__main__"}

    def visit(module: str, stack: list[str]) -> None:
        assert module not in stack, "import circle: " + " -> ".join([*stack, module])
        for dep in graph[module]:
            visit(dep, [*stack, module])

    for module in graph:
        visit(module, [])


@dataclasses.dataclass(frozen=True)
class ToyConfig(RunConfig):
    """A method that does not exist: what adding one takes."""

    command: ClassVar[str] = "toy"
    strength: float = option(1.0, "how strong the toy is", group="toy", checks=[positive])


TOY_RUNS: list[ToyConfig] = []


def train_toy(cfg: ToyConfig) -> None:
    TOY_RUNS.append(cfg)


def test_a_new_method_is_a_config_its_presets_and_a_trainer(monkeypatch, capsys):
    monkeypatch.setitem(METHODS, "toy", Method("train a toy", ToyConfig, {"strong": ToyConfig(strength=5.0)},
                                               "test_config:train_toy"))
    assert main(["toy", "--data", "x", "--preset", "strong", "--seed", "3"]) == 0
    assert TOY_RUNS[-1] == ToyConfig(data="x", preset="strong", strength=5.0, seed=3)
    assert main(["toy", "--data", "x", "--strength", "-1"]) == 2
    assert capsys.readouterr().err == "fastssl-train toy: error: --strength must be > 0, got -1\n"
    with pytest.raises(SystemExit):
        main(["toy", "--help"])
    assert "how strong the toy is (default: 1)" in " ".join(capsys.readouterr().out.split())

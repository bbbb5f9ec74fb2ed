"""``fastssl-train`` (or ``python -m fastssl.train``): DINO and PAWS training, k-NN evaluation, attention maps.

    fastssl-train dino --data /path/to/imagenet/train --preset dino_vits16 --output-dir runs/vits16
    fastssl-train paws --data /path/to/imagenet/train --labelled-list imagenet_subsets/10percent.txt \\
        --val-data /path/to/imagenet/val --preset paws_resnet50
    torchrun --nproc_per_node=8 -m fastssl.train dino --data ... --preset dino_vits16
    fastssl-train knn --checkpoint runs/vits16/checkpoint.pth --data .../train --val-data .../val
    fastssl-train attention --checkpoint runs/vits16/checkpoint.pth --image dog.jpg
    fastssl-train export --checkpoint runs/vits16/checkpoint.pth --output vits16.safetensors
    fastssl-train demo                  # `make demo`: DINO on scikit-learn's digits, then k-NN

Every option is a field of a config class (``dino_config.py``, ``paws_config.py``, ``eval_config.py``),
whose default is the authors' (DINO: main_dino.py; PAWS: configs/paws/imgnt_train.yaml); ``--preset``
loads one of their recipes (``presets.py``) and any option given explicitly overrides it. This file
turns those fields into argparse options and an error a person can fix into one message and an exit code
(2 for a bad option); ``--debug`` or ``FASTSSL_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .config import Options, RunConfig, shown, split_optional
from .errors import UserError
from .eval_config import AttentionConfig, ExportConfig, KnnCommandConfig
from .methods import METHODS

__all__ = ["Parsed", "build_parser", "main", "parse_args", "parse_command", "preset_values"]

COMMANDS: dict[str, type[Options]] = {"knn": KnnCommandConfig, "attention": AttentionConfig, "export": ExportConfig}
DEMO_PRESETS = ("demo", "demo_gpu")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_options(parser: argparse.ArgumentParser, cls: type[Options], *, defaults: Options | None = None,
                presets: typing.Iterable[str] = (), shown_defaults: Mapping[str, str] | None = None) -> None:
    """One argparse option per field of ``cls``, in its groups. Nothing gets an argparse default (what
    was not given stays out of the namespace: a preset fills it, then the class); the help shows the
    default of ``defaults`` (a preset) or of the class, or the text of ``shown_defaults``."""
    defaults = defaults if defaults is not None else cls()
    hints = cls.hints()
    fields = dataclasses.fields(cls)
    names = [f.metadata["group"] for f in fields]
    order = [g for g in cls.group_order if g in names] + [g for g in dict.fromkeys(names) if g not in cls.group_order]
    groups = {name: parser.add_argument_group(name) for name in order}
    for f in fields:
        kind, _ = split_optional(hints[f.name])
        default = (shown_defaults or {}).get(f.name) or shown(getattr(defaults, f.name))
        text = f.metadata["help"] + (f" (default: {default})" if default not in ("None", "''") else "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if f.metadata.get("required"):
            kwargs["required"] = True
        if f.name == "preset":
            kwargs["choices"] = sorted(presets)
        elif kind is bool:
            kwargs.update(type=_bool, nargs="?", const=True, metavar="BOOL")
        elif typing.get_origin(kind) is Literal:
            kwargs["choices"] = typing.get_args(kind)
        elif typing.get_origin(kind) is tuple:
            items = typing.get_args(kind)
            kwargs.update(type=items[0], nargs=len(items), metavar=("MIN", "MAX") if len(items) == 2 else None)
        else:
            kwargs["type"] = kind
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        groups[f.metadata["group"]].add_argument(cls.flag(f.name), **kwargs)


def _subparser(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description or help, allow_abbrev=False)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also: FASTSSL_DEBUG=1)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastssl-train", description=(__doc__ or "").split("\n")[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, method in METHODS.items():
        add_options(_subparser(sub, name, method.help), method.config, presets=method.presets)

    demo = METHODS["dino"]
    p = _subparser(sub, "demo", "`make demo`: DINO on scikit-learn's digits, then k-NN against random init",
                   "DINO trained from scratch on scikit-learn's digits, then k-NN of its teacher against the same "
                   "network at random initialisation. Trains in a new folder runs/demo-<n> (--output-dir: a new or "
                   "empty folder, or a demo run's folder to resume); nothing is deleted. Defaults: the demo preset "
                   "(demo_gpu on a GPU); any DINO option overrides them.")
    add_options(p, demo.config, defaults=demo.presets["demo"], presets=DEMO_PRESETS,
                shown_defaults={"output_dir": "a new folder runs/demo-<n>"})

    p = _subparser(sub, "knn", "k-NN evaluation of a checkpoint's teacher (eval_knn.py)")
    add_options(p, KnnCommandConfig)
    p = _subparser(sub, "attention", "the last layer's CLS self-attention maps of a ViT checkpoint, as PNGs")
    add_options(p, AttentionConfig)
    p = _subparser(sub, "export", "a checkpoint's backbone as a safetensors file timm loads (+ its timm arguments)")
    add_options(p, ExportConfig)
    return parser


def preset_values(preset: Options) -> dict[str, Any]:
    """What a preset sets apart from its class's defaults."""
    base = type(preset)()
    return {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)
            if getattr(preset, f.name) != getattr(base, f.name)}


@dataclass(frozen=True)
class Parsed:
    command: str
    config: Options
    given: frozenset[str]  # the options given on the command line (not from a preset or a default)


def parse_command(argv: list[str] | None = None) -> Parsed:
    """The command and its validated config: the class defaults, then a ``--preset``'s values, then the
    options given. A bad value raises :class:`~fastssl.train.errors.ConfigError`; argparse's own errors
    (an unknown option, a value of the wrong type) exit with its usage message."""
    ns = build_parser().parse_args(argv)
    given: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(ns).items()
                             if k not in ("command", "debug")}
    command: str = ns.command
    cfg: Options
    if command in METHODS or command == "demo":
        method = METHODS["dino" if command == "demo" else command]
        preset = given.get("preset")
        if command == "demo" and preset is None:
            preset = _demo_preset(given.get("device", "auto"))
        values = preset_values(method.presets[preset]) if preset else {}
        values.update(given)
        if preset:
            values["preset"] = preset
        cfg = method.config(**values)
    else:
        cfg = COMMANDS[command](**given)
    cfg.validate()
    return Parsed(command, cfg, frozenset(given))


def _demo_preset(device: str) -> str:
    import torch

    return "demo_gpu" if torch.cuda.is_available() and device != "cpu" else "demo"


def parse_args(argv: list[str] | None = None) -> Options:
    """The validated config of a command line (see :func:`parse_command`)."""
    return parse_command(argv).config


def run(parsed: Parsed) -> int:
    cfg = parsed.config
    if parsed.command == "demo":
        from .demo import run_demo

        assert isinstance(cfg, RunConfig)
        return run_demo(cfg, output_dir_given="output_dir" in parsed.given)
    if parsed.command in METHODS:
        METHODS[parsed.command].train_function()(cfg)
    elif isinstance(cfg, KnnCommandConfig):
        from .evaluate import knn_command

        knn_command(cfg)
    elif isinstance(cfg, AttentionConfig):
        from .attention import attention_command

        attention_command(cfg)
    elif isinstance(cfg, ExportConfig):
        from .export import export_command

        export_command(cfg)
    return 0


def _debug(argv: list[str], env: Mapping[str, str]) -> bool:
    return "--debug" in argv or env.get("FASTSSL_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Run one command; an error a person can fix ends it with one message on stderr and its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        return run(parse_command(argv))
    except UserError as e:
        if _debug(argv, os.environ):
            raise
        report(command, e)
        return e.exit_code
    except KeyboardInterrupt:
        if _debug(argv, os.environ):
            raise
        print(f"fastssl-train {command}: interrupted", file=sys.stderr)
        return 130


def report(command: str, error: BaseException) -> None:
    """``fastssl-train dino: error: ...`` on stderr; under torchrun with the rank (an error may be one rank's)."""
    prefix = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    sys.stdout.flush()
    print(f"{prefix}fastssl-train {command}: error: {error}", file=sys.stderr, flush=True)

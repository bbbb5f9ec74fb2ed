"""The trainer's configuration: one frozen dataclass per command, every option declared once.

An option is a dataclass field made by :func:`option`: its type (the annotation), its default (the
authors'), its help text, its group in ``--help``, the checks of its value, and whether a resumed run may
change it. From the class derive the command line (``cli.py`` builds argparse from the fields), the
presets (``presets.py``: instances of the class), ``config.json`` and the checkpoint's config
(:meth:`Options.to_dict`) and the mismatch check on resume (:func:`differences`). Trainers read attributes
(``cfg.lr``), so the static type check of ``make lint`` (mypy) finds a wrong name before anything runs.

:class:`RunConfig` holds what every training method shares (data, output folder, seed, precision, logging,
epochs and batch, the deliberate overrides of a resume); a method's config derives from it
(``dino_config.py``, ``paws_config.py``) and adds its hyper-parameters.

A bad value is a :class:`~fastssl.train.errors.ConfigError` naming the option as typed on the command
line: ``--lr must be > 0, got -1``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

from .errors import ConfigError

__all__ = ["KnnOptions", "Options", "RunConfig", "at_least", "differences", "fraction_pair", "in_range",
           "known_arch", "not_empty", "option", "positive", "positive_pair", "shown", "split_optional", "vit_only"]

C = TypeVar("C", bound="Options")

# A check of one value: None when it is fine, else what is wrong ("must be > 0").
Check = Callable[[Any], "str | None"]


def option(default: Any, help: str, *, group: str, checks: Iterable[Check] = (), flag: str | None = None,
           resumable: bool = False, required: bool = False, metavar: str | None = None) -> Any:
    """A config field. ``checks`` run on its value (not on None); ``flag`` is its command-line name
    (default ``--name-with-dashes``); ``resumable``: a resumed run may give another value (where
    things go, how they are logged or evaluated: nothing that changes the training); ``required``: the
    command line must give it (argparse says so)."""
    return field(default=default, metadata={"help": help, "group": group, "checks": tuple(checks), "flag": flag,
                                            "resumable": resumable, "required": required, "metavar": metavar})


# ----------------------------------------------------------------------------- checks of one value

def shown(value: Any) -> str:
    """A value as it is typed on the command line: ``-1`` (not ``-1.0``), ``0.9 0.2``, ``''``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return " ".join(shown(v) for v in value)
    if isinstance(value, str):
        return repr(value) if not value or " " in value else value
    return str(value)


def positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def at_least(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {shown(lo)}"


def in_range(lo: float, hi: float, *, hi_open: bool = False) -> Check:
    """``lo <= v <= hi`` (``< hi`` with ``hi_open``)."""
    def check(v: float) -> str | None:
        ok = lo <= v < hi if hi_open else lo <= v <= hi
        return None if ok else f"must be in [{shown(lo)}, {shown(hi)}{')' if hi_open else ']'}"
    return check


def fraction_pair(v: tuple[float, float]) -> str | None:
    """An area range of crops: two fractions of the image, in order."""
    return None if 0 < v[0] <= v[1] <= 1 else "must be two fractions 0 < min <= max <= 1"


def positive_pair(v: tuple[float, float]) -> str | None:
    return None if 0 < v[0] <= v[1] else "must be two values 0 < min <= max"


def not_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def vit_only(cfg: Options, arch: str, **values: int | None) -> None:
    """Options that shape a ViT's tokens (``--img-size``, ``--patch-size``) are refused for another backbone."""
    from .models import is_vit_name

    for name, value in values.items():
        if value is not None and not is_vit_name(arch):
            raise cfg.fail(name, f"applies to ViTs only, not to --arch {arch}")


def known_arch(name: str) -> str | None:
    """A timm model name or one of :data:`~fastssl.train.models.ARCH_ALIASES` (timm is imported here)."""
    from .models import unknown_arch_message

    return unknown_arch_message(name)


# ----------------------------------------------------------------------------- types of the fields

def split_optional(hint: Any) -> tuple[Any, bool]:
    """``(type, optional)`` of ``T`` or ``T | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _type_problem(value: Any, hint: Any) -> str | None:
    """What is wrong with ``value`` as a ``hint`` (the types a config uses), None if nothing."""
    kind, optional = split_optional(hint)
    if value is None:
        return None if optional else "must be given"
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        return None if value in choices else "must be one of " + ", ".join(map(str, choices))
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        if not isinstance(value, tuple) or len(value) != len(items):
            return f"must be {len(items)} values"
        return next((p for p in (_type_problem(v, t) for v, t in zip(value, items, strict=True)) if p), None)
    if kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if kind is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        return None if math.isfinite(value) else "must be a finite number"
    if kind is str:
        return None if isinstance(value, str) else "must be a string"
    raise TypeError(f"config fields of type {hint!r} are not supported")


# ----------------------------------------------------------------------------- the base class

@dataclass(frozen=True)
class Options:
    """Machinery of every command's options: checks, the flag names, plain dicts in and out."""

    command: ClassVar[str] = ""
    # --help lists the groups in this order (groups not named here follow, in field order).
    group_order: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def hints(cls) -> dict[str, Any]:
        """Each field's type, the annotations resolved."""
        return typing.get_type_hints(cls)

    @classmethod
    def flag(cls, name: str) -> str:
        """The command-line name of field ``name``: ``--batch-size-per-gpu``."""
        f = cls.__dataclass_fields__[name]
        return f.metadata.get("flag") or "--" + name.replace("_", "-")

    @classmethod
    def resumable_fields(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable"))

    def fail(self, name: str, what: str) -> ConfigError:
        """The error of field ``name``: ``--lr must be > 0, got -1`` from ``fail("lr", "must be > 0")``."""
        return ConfigError(f"{self.flag(name)} {what}, got {shown(getattr(self, name))}")

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first bad value: each field's type and checks, then
        :meth:`check` (the rules between options)."""
        hints = self.hints()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            problem = _type_problem(value, hints[f.name])
            if problem is None and value is not None:
                problem = next((p for p in (check(value) for check in f.metadata.get("checks", ())) if p), None)
            if problem is not None:
                if value is None:
                    raise ConfigError(f"{self.flag(f.name)} is required")
                raise self.fail(f.name, problem)
        self.check()

    def check(self) -> None:
        """Rules between options; a subclass adds its own (and calls this)."""

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-able plain values (tuples as lists), with the command: what
        ``config.json`` and a checkpoint's ``config`` hold."""
        out: dict[str, Any] = {"command": self.command}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any], *, strict: bool = True) -> C:
        """A config from plain values (``config.json``, a checkpoint's config, a dict in code): lists
        become tuples, missing options take their defaults. ``strict``: an unknown name is an error (a
        typo); else it is ignored (an option of an older or newer version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in names and k != "command")
        if strict and unknown:
            raise ConfigError(f"unknown option(s) for {cls.command or cls.__name__}: {', '.join(unknown)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
        return cls(**kwargs)

    @classmethod
    def coerce(cls: type[C], cfg: Options | Mapping[str, Any]) -> C:
        """``cfg`` as this class: a config as it is, a mapping (a dict in code) read strictly and validated."""
        if isinstance(cfg, cls):
            return cfg
        if isinstance(cfg, Options):
            raise ConfigError(f"expected a {cls.__name__}, got a {type(cfg).__name__}")
        out = cls.from_dict(cfg)
        out.validate()
        return out


def differences(saved: Mapping[str, Any], current: Options, *, allowed: Iterable[str] = ()) -> list[str]:
    """``name: checkpoint X, now Y`` for every option a checkpoint's config sets otherwise than
    ``current``, except the resumable ones and ``allowed``. An option the saved config lacks (it was
    added since) compares as its default; a name that is no option now is ignored."""
    skip = current.resumable_fields() | set(allowed)
    defaults = type(current)().to_dict()
    now = current.to_dict()
    out = []
    for name in sorted(now):
        if name == "command" or name in skip:
            continue
        before = saved.get(name, defaults[name])
        before = list(before) if isinstance(before, tuple) else before
        if before != now[name]:
            out.append(f"{name}: checkpoint {before!r}, now {now[name]!r}")
    return out


# ----------------------------------------------------------------------------- what every training run has

RUN = "run"
OPTIM = "optimisation"


@dataclass(frozen=True)
class RunConfig(Options):
    """The options every training method shares. A method's config derives from this one."""

    preset: str | None = option(None, "a named recipe (fastssl/train/presets.py); options given on the command "
                                "line override its values", group=RUN, resumable=True)
    data: str | None = option(None, "training images: an ImageFolder-style folder root/<class>/<image> (labels "
                              "unused for training), or 'digits' for scikit-learn's handwritten digits",
                              group=RUN, checks=[not_empty])
    output_dir: str = option("runs/train", "the run folder: checkpoints, config.json and log.jsonl; a run resumes "
                             "from its checkpoint.pth", group=RUN, checks=[not_empty], resumable=True)
    resume: str | None = option(None, "checkpoint to resume from (default: OUTPUT_DIR/checkpoint.pth if any)",
                                group=RUN, checks=[not_empty], resumable=True)
    seed: int = option(0, "random seed (torch, Python and numpy; each process adds its rank)", group=RUN,
                       checks=[at_least(0)])
    device: Literal["auto", "cuda", "cpu"] = option("auto", "auto: the GPU when there is one", group=RUN,
                                                    resumable=True)
    dist_backend: str | None = option(None, "torch.distributed backend under torchrun (default: nccl on GPUs, "
                                      "gloo on CPU)", group=RUN, checks=[not_empty], resumable=True)
    num_workers: int = option(10, "data loading workers per process", group=RUN, checks=[at_least(0)],
                              resumable=True)
    gpu_decode: bool = option(True, "decode JPEGs on the GPU (torchvision's nvJPEG) when possible, else in the "
                              "workers", group=RUN)
    digits_size: int = option(32, "side of the digits images (upscaled from 8x8) with --data digits", group=RUN,
                              checks=[at_least(8)])
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "mixed precision: bf16 autocast, or fp16 with a grad scaler; auto = bf16 on GPUs, fp32 on CPU "
        "(the saved config says which)", group=RUN)
    compile: bool = option(False, "torch.compile the backbones", group=RUN)
    saveckp_freq: int = option(20, "also keep checkpoint<epoch>.pth every this many epochs (0: never)", group=RUN,
                               checks=[at_least(0)], resumable=True)
    stop_after_steps: int | None = option(None, "save a checkpoint and exit after this many iterations of this "
                                          "invocation (to fit a time slot; rerunning the command goes on)",
                                          group=RUN, checks=[at_least(1)], resumable=True)
    log_freq: int = option(10, "iterations between log.jsonl lines", group=RUN, checks=[at_least(1)],
                           resumable=True)
    tensorboard: bool = option(False, "also write TensorBoard scalars (needs the tensorboard package)", group=RUN,
                               resumable=True)
    progress: bool = option(True, "show a progress bar per epoch", group=RUN, resumable=True)
    extend_epochs: bool = option(False, "resume with a larger --epochs than the checkpoint's (a finished run "
                                 "trains on): the per-iteration schedules are recomputed over the new length, "
                                 "so they jump to the new schedule's values where the run resumes", group=RUN,
                                 resumable=True)
    change_world_size: bool = option(False, "resume on another number of processes (and, to keep the global "
                                     "batch, another --batch-size-per-gpu): weights, optimiser and loss states, "
                                     "the epoch and the position in it (in images) are kept; the lr is scaled by "
                                     "the new global batch and the schedules recomputed per iteration; ranks "
                                     "keep their RNG states where the checkpoint has them", group=RUN,
                                     resumable=True)

    epochs: int = option(100, "training epochs", group=OPTIM, checks=[at_least(1)])
    batch_size_per_gpu: int = option(64, "images per process and step", group=OPTIM, checks=[at_least(1)])

    def check(self) -> None:
        super().check()
        if self.data is None:
            raise ConfigError(f"{self.flag('data')} is required (an ImageFolder root, or 'digits')")
        if self.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError(f"{self.flag('tensorboard')} needs the tensorboard package: pip install "
                                  "tensorboard")


# ----------------------------------------------------------------------------- k-NN evaluation (DINO, knn)

KNN = "k-NN evaluation"


@dataclass(frozen=True)
class KnnOptions(Options):
    """The authors' eval_knn.py parameters: during DINO training and in ``fastssl-train knn``."""

    knn_k: int = option(20, "neighbours that vote", group=KNN, checks=[at_least(1)], resumable=True)
    knn_t: float = option(0.07, "temperature of the exp(sim / T) vote weights", group=KNN, checks=[positive],
                          resumable=True)
    knn_batch_size: int = option(128, "images per forward pass", group=KNN, checks=[at_least(1)], resumable=True)
    eval_crop_fraction: float = option(0.875, "central crop (fraction of the short side) resized to the crop "
                                       "size: 224/256 as the authors", group=KNN,
                                       checks=[in_range(0.0, 1.0), positive], resumable=True)

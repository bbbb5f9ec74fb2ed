r"""The momentum (EMA) teacher of DINO-style training, updated in one fused launch.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
https://arxiv.org/abs/2104.14294. After every optimiser step, for every parameter:

    teacher = m * teacher + (1 - m) * student

with m following a per-iteration cosine from 0.996 to 1. The authors loop over
the parameters in Python (about three kernels per tensor). Here the math is fp32,
rounded once to the teacher's dtype, and on CUDA every tensor of a (teacher dtype,
student dtype) group is updated by one Triton launch (``fastssl.kernels.ema``):
two reads and one write of the parameters, the floor of the update. On the CPU
every tensor is updated by one call of a C++ loop (``csrc/ema.cpp``, one pass
over memory, the authors' two roundings), as fast as ``torch._foreach_lerp_``.

Layers, from the bottom: the multi-tensor kernel and its device tables
(``fastssl.kernels.ema``) and the C++ loop; ``_Plan``, one validated tensor set
with its dtype groups (and tables), cached; the PyTorch path (the C++ loop on
the CPU, else ``torch._foreach_*``: the authors' numbers bit for bit in fp32 either
way); the functional :func:`ema_update_`; and :class:`MomentumTeacher`, which owns
the teacher, its schedule and its plan.
"""

from __future__ import annotations

import collections
import copy
import itertools
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from . import _ext
from ._backend import BACKENDS, interpreter_enabled, resolve_backend

try:  # FSDP2's sharded parameters
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed
    DTensor = None

__all__ = ["MomentumTeacher", "cosine_momentum_schedule", "ema_update_"]

BUFFER_MODES = ("leave", "copy", "average")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- collecting tensors

def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            module = module._orig_mod
        else:
            return module


def _collect(obj, role: str, buffers: str):
    """``(names, tensors to average, names of buffers to copy, buffers to copy)``.

    ``obj`` is a module or a sequence of tensors; ``names`` is None for a sequence
    (its tensors are then named by index).
    """
    if isinstance(obj, nn.Module):
        module = _unwrap(obj)
        names, tensors, copy_names, copies = [], [], [], []
        for name, p in module.named_parameters():
            names.append(name)
            tensors.append(p)
        if buffers != "leave":
            for name, buf in module.named_buffers():
                # Counters (BatchNorm's num_batches_tracked) are copied even under "average".
                if buffers == "average" and buf.is_floating_point():
                    names.append(name)
                    tensors.append(buf)
                else:
                    copy_names.append(name)
                    copies.append(buf)
        return names, tensors, copy_names, copies
    if isinstance(obj, torch.Tensor) or not isinstance(obj, Iterable):
        raise TypeError(f"ema_update_: {role} must be an nn.Module or a sequence of tensors, "
                        f"got {type(obj).__name__}")
    tensors = list(obj)
    if not all(map(isinstance, tensors, itertools.repeat(torch.Tensor))):  # C-level loop: called every step
        i = next(i for i, t in enumerate(tensors) if not isinstance(t, torch.Tensor))
        raise TypeError(f"ema_update_: {role}[{i}] is a {type(tensors[i]).__name__}, not a torch.Tensor")
    if buffers != "leave":
        raise ValueError(f"ema_update_: buffers={buffers!r} needs modules (it names their buffers) but "
                         f"{role} is a sequence of tensors; put the buffers in the sequences instead")
    return None, tensors, [], []


def _label(names, i: int) -> str:
    return repr(names[i]) if names is not None else f"[{i}]"


def _check_names(t_list, s_list, t_names, s_names, what: str) -> list | None:
    """Equal counts and, for two modules, equal names; returns the names to report by."""
    if len(t_list) != len(s_list):
        raise ValueError(f"ema_update_: the teacher has {len(t_list)} {what}s but the student has "
                         f"{len(s_list)}")
    if t_names is not None and s_names is not None and t_names != s_names:
        i = next(i for i, (a, b) in enumerate(zip(t_names, s_names, strict=True)) if a != b)
        raise ValueError(f"ema_update_: {what} {i} is {t_names[i]!r} in the teacher but {s_names[i]!r} in "
                         "the student (the modules differ)")
    return t_names if t_names is not None else s_names


def _check_shapes_devices(t_list, s_list, names, what: str) -> None:
    device = t_list[0].device if t_list else None
    for i, (t, s) in enumerate(zip(t_list, s_list, strict=True)):
        if t.shape != s.shape:
            raise ValueError(f"ema_update_: {what} {_label(names, i)} has shape {tuple(t.shape)} in the "
                             f"teacher but {tuple(s.shape)} in the student")
        for role, x in (("teacher", t), ("student", s)):
            if x.device != device:
                raise ValueError(f"ema_update_: {what} {_label(names, i)} of the {role} is on {x.device} but "
                                 f"the first teacher {what} is on {device}; all must be on one device")


def _has_shards(t_list, s_list) -> bool:
    # On every update of every tensor set: the few distinct types, collected by a C-level loop (isinstance
    # against DTensor costs ~0.1 us a tensor, 26 us for a ViT's 2 x 152).
    return DTensor is not None and any(issubclass(kind, DTensor)
                                       for kind in set(map(type, itertools.chain(t_list, s_list))))


def _local_shards(t_list, s_list, names, what: str) -> tuple[list, list]:
    """Sharded tensors (DTensors: FSDP2's parameters) replaced by this rank's shards, which the update
    averages in place: each rank updates its own shards, nothing is gathered. A pair must be sharded
    alike (the same mesh and placements; global shapes are checked with the others)."""
    for i, (t, s) in enumerate(zip(t_list, s_list, strict=True)):
        t_sharded, s_sharded = isinstance(t, DTensor), isinstance(s, DTensor)
        if t_sharded != s_sharded:
            one, other = ("teacher", "student") if t_sharded else ("student", "teacher")
            raise ValueError(f"ema_update_: {what} {_label(names, i)} is sharded (a DTensor) in the {one} but not "
                             f"in the {other}: shard both models alike (fully_shard on the same modules)")
        if t_sharded and (t.device_mesh != s.device_mesh or t.placements != s.placements):
            raise ValueError(f"ema_update_: {what} {_label(names, i)} is sharded as {t.placements} on "
                             f"{t.device_mesh} in the teacher but as {s.placements} on {s.device_mesh} in the "
                             "student: shard both models alike")
    return _to_local(t_list), _to_local(s_list)


def _to_local(xs) -> list:
    return [x.to_local() if isinstance(x, DTensor) else x for x in xs]


def _dense(t: torch.Tensor) -> bool:
    """True when the elements fill ``numel`` consecutive slots, in any dimension order."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# ----------------------------------------------------------------------------- the plan of a tensor set

class _Plan:
    """One tensor set, validated once: its dtype groups and, for Triton, their device tables.

    Holds no tensors (only addresses, in the tables): ``run`` gets the tensors each time. (The C++
    loop of the CPU needs no plan: :func:`_cpu_loop`.)
    """

    def __init__(self, t_list, s_list, names, backend: str):
        _check_shapes_devices(t_list, s_list, names, "tensor")
        if not torch.is_inference_mode_enabled():  # refused before anything is written
            bad = next((i for i, t in enumerate(t_list) if t.is_inference()), None)
            if bad is not None:
                raise RuntimeError(f"ema_update_: teacher tensor {_label(names, bad)} is an inference tensor: "
                                   "update it inside torch.inference_mode()")
        groups: dict = {}
        for i, (t, s) in enumerate(zip(t_list, s_list, strict=True)):
            for role, x in (("teacher", t), ("student", s)):
                if not x.is_floating_point():
                    raise ValueError(f"ema_update_: tensor {_label(names, i)} of the {role} has dtype "
                                     f"{x.dtype}; only floating-point tensors can be averaged")
            if t.numel():
                groups.setdefault((t.dtype, s.dtype), []).append(i)
        _check_overlap(t_list, names)
        self.captured = False  # a CUDA graph launched its tables: they must outlive the graph
        if backend == "triton":
            self.groups = [(idx, _tables(idx, t_list, s_list, names)) for idx in groups.values()]
        else:
            self.groups = [(idx, None) for idx in groups.values()]

    def run(self, t_list, s_list, momentum) -> None:
        """Update; ``momentum`` is a checked float or 0-dim tensor on the tensors' device."""
        launched = False
        for idx, launch in self.groups:
            if launch is None:
                _ema_torch([t_list[i] for i in idx], [s_list[i] for i in idx], momentum)
            else:
                launch(momentum)
                launched = True
        if launched:
            # The kernel writes through raw addresses: bump the version counters as an in-place op does.
            torch.autograd.graph.increment_version(t_list)
            if t_list[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                self.captured = True


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[first, last + 1)`` that ``t``'s elements can touch."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _elements_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact test through every element's bytes: for views that are not dense (rare in a parameter
    set), whose extents can interleave without sharing an element (``x[:, 0]`` and ``x[:, 1]``)."""
    intervals = []
    for t in (a, b):
        offset = torch.zeros((), dtype=torch.int64)
        for size, stride in zip(t.shape, t.stride(), strict=True):
            offset = offset.unsqueeze(-1) + torch.arange(size) * stride
        start = offset.flatten() * t.element_size() + t.data_ptr()
        intervals.append(torch.stack([start, start + t.element_size()], dim=1))
    iv = torch.cat(intervals)
    iv = iv[iv[:, 0].argsort()]
    return bool((iv[1:, 0] < torch.cummax(iv[:-1, 1], dim=0).values).any())


def _check_overlap(t_list, names) -> None:
    # A teacher element reachable twice (an aliased tensor passed twice) would be updated twice by
    # the PyTorch path and raced on by the kernel. A sweep over the tensors' byte extents; two
    # extents that meet share memory when both tensors are dense, else only if an element does.
    spans = sorted((*_extent(t), i) for i, t in enumerate(t_list) if t.numel() and t.device.type != "meta")
    open_spans: list[tuple[int, int]] = []  # (end, index) of the extents still reaching forward
    for start, end, i in spans:
        open_spans = [(e, j) for e, j in open_spans if e > start]
        for _, j in open_spans:
            a, b = t_list[j], t_list[i]
            if (_dense(a) and _dense(b)) or _elements_overlap(a, b):
                j, i2 = sorted((i, j))
                raise ValueError(f"ema_update_: teacher tensors {_label(names, j)} and {_label(names, i2)} share "
                                 "memory; pass each tensor once")
        open_spans.append((end, i))


def _tables(idx, t_list, s_list, names):
    from fastssl.kernels.ema import MultiTensorEma

    for i in idx:
        t, s = t_list[i], s_list[i]
        for role, x in (("teacher", t), ("student", s)):
            if x.dtype not in _TRITON_DTYPES:
                raise ValueError(f"ema_update_: tensor {_label(names, i)} of the {role} has dtype {x.dtype}; "
                                 "the Triton kernel takes float32, bfloat16 and float16 (else use "
                                 "backend='torch')")
            if not _dense(x):
                raise ValueError(f"ema_update_: tensor {_label(names, i)} of the {role} is not dense (shape "
                                 f"{tuple(x.shape)}, strides {x.stride()}); the Triton kernel walks each "
                                 "tensor as one block of memory: make it contiguous, or use backend='torch'")
        if any(a != b for a, b, n in zip(t.stride(), s.stride(), t.shape, strict=True) if n != 1):
            raise ValueError(f"ema_update_: tensor {_label(names, i)} has strides {t.stride()} in the "
                             f"teacher but {s.stride()} in the student; the Triton kernel needs one memory "
                             "layout for both (make both contiguous, or use backend='torch')")
    device = t_list[idx[0]].device
    if device.type != "cpu" and interpreter_enabled():
        raise RuntimeError(f"ema_update_: the kernel reads tensors through raw addresses, so under Triton's "
                           f"interpreter (TRITON_INTERPRET=1) it runs on CPU tensors only, not {device.type} "
                           "ones; unset TRITON_INTERPRET or use backend='torch'")
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("ema_update_: the first update of a tensor set builds its device tables, which "
                           "cannot happen during CUDA graph capture; run one update before capturing "
                           "(the warm-up)")
    return MultiTensorEma([t_list[i] for i in idx], [s_list[i] for i in idx])


def _ema_torch(teacher, student, momentum) -> None:
    """The PyTorch path for one dtype group: the authors' ``t.mul_(m).add_((1 - m) * s)`` on fp32
    copies (on the tensors themselves when they are fp32), rounded once into the teacher."""
    acc = torch.promote_types(torch.promote_types(teacher[0].dtype, student[0].dtype), torch.float32)
    if isinstance(momentum, torch.Tensor):
        # As the loop's mul_(m) and (1 - m) * s take a 0-dim m: 1 - m in m's own dtype.
        m, w = momentum.to(acc), (1 - momentum).to(acc)
    else:
        m, w = momentum, 1.0 - momentum
    t_acc = [t.to(acc) for t in teacher]  # the teacher itself when it is in acc
    s_acc = [s.to(acc) for s in student]
    if student[0].dtype == acc:
        s_acc = torch._foreach_mul(s_acc, w)
    else:  # already a copy: scale it in place
        torch._foreach_mul_(s_acc, w)
    torch._foreach_mul_(t_acc, m)
    torch._foreach_add_(t_acc, s_acc)
    if teacher[0].dtype != acc:
        torch._foreach_copy_(teacher, t_acc)


_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 8


_data_ptr, _stride = torch.Tensor.data_ptr, torch.Tensor.stride
_dtype, _shape = operator.attrgetter("dtype"), operator.attrgetter("shape")


def _signature(t_list, s_list) -> tuple:
    """Addresses, dtypes, shapes and strides of a tensor set: everything its plan was validated on."""
    return tuple(tuple(map(f, x)) for x in (t_list, s_list) for f in (_data_ptr, _dtype, _shape, _stride))


def _cached_plan(t_list, s_list, names, backend: str) -> _Plan:
    """The plan of this tensor set, built (and validated) the first time its signature is seen."""
    key = (backend, t_list[0].device, _signature(t_list, s_list))
    plan = _CACHE.get(key)
    if plan is not None:
        _CACHE.move_to_end(key)
        return plan
    plan = _CACHE[key] = _Plan(t_list, s_list, names, backend)
    # Drop the least recently used plans, but never one whose tables a CUDA graph launches.
    stale = [k for k, p in _CACHE.items() if not p.captured]
    for k in stale[:max(0, len(_CACHE) - _CACHE_SIZE)]:
        del _CACHE[k]
    return plan


# ----------------------------------------------------------------------------- momentum

def _check_momentum(momentum, device: torch.device | None, op: str = "ema_update_"):
    """A float in [0, 1], or a 0-dim floating tensor on ``device`` (range-checked on CPU only: no sync)."""
    if isinstance(momentum, torch.Tensor):
        if momentum.dim() != 0 or not momentum.is_floating_point():
            raise ValueError(f"{op}: a tensor momentum must be a 0-dim floating-point tensor, got shape "
                             f"{tuple(momentum.shape)} and dtype {momentum.dtype}")
        if device is not None and momentum.device != device:
            raise ValueError(f"{op}: the momentum tensor is on {momentum.device} but the parameters are on "
                             f"{device}; put it on {device} (the kernel reads it there) or pass a float")
        if momentum.device.type == "cpu" and not 0.0 <= momentum.item() <= 1.0:
            raise ValueError(f"{op}: momentum must lie in [0, 1], got {momentum.item()}")
        return momentum.detach()
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"{op}: momentum must be a float or a 0-dim tensor, got {type(momentum).__name__}")
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{op}: momentum must lie in [0, 1], got {momentum}")
    return momentum


# ----------------------------------------------------------------------------- functional API

@torch.no_grad()
def ema_update_(teacher: nn.Module | Sequence[torch.Tensor], student: nn.Module | Sequence[torch.Tensor],
                momentum: float | torch.Tensor, *, buffers: str = "leave", backend: str = "auto") -> None:
    """In place, ``teacher = momentum * teacher + (1 - momentum) * student`` for every parameter.

    Args:
        teacher: an ``nn.Module`` or a sequence of tensors, updated in place.
        student: the same for the student. Modules are paired by parameter name, in
            ``named_parameters()`` order (the authors' ``zip``); DDP, DataParallel and
            ``torch.compile`` wrappers are looked through. Sharded models (FSDP2's
            ``fully_shard``: DTensor parameters) must be sharded alike: each rank
            updates its own shards in place, nothing is gathered.
        momentum: a float in [0, 1], or a 0-dim floating tensor on the parameters'
            device, read by the kernel: no host sync, and a CUDA graph that captured
            the update follows the values later written into it. A tensor on a GPU
            is not range-checked (that would sync).
        buffers: modules only. ``"leave"`` (the authors): the teacher keeps its own
            buffers; ``"copy"``: copy the student's; ``"average"``: average the
            floating-point ones like parameters and copy the others (BatchNorm's
            ``num_batches_tracked``).
        backend: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"torch"`` or ``"triton"``.

    Math is fp32 (fp64 if a tensor is fp64, PyTorch path only), rounded once to
    the teacher's dtype; teacher and student dtypes may differ. The PyTorch path
    gives the authors' loop bit for bit in fp32 (with a tensor momentum, ``1 - m``
    in its own dtype, as the loop computes it), and so does the kernel on a GPU
    (compiled with no fused multiply-add, as the loop rounds both products). On
    the CPU the PyTorch path is one call of the C++ loop of ``csrc/ema.cpp`` when
    the extension is loaded (installed, or built by the crop op; the EMA never
    starts a build), else ``torch._foreach_*``; the same bits either way. The
    kernel walks each tensor as one block of memory: non-dense tensors, or a
    teacher and student with different strides, are refused (``backend="torch"``
    takes them).

    A tensor set is validated once: its plan (and device tables) is cached, keyed
    by the addresses, dtypes, shapes and strides of its tensors (the C++ loop of
    the CPU keeps no plan: it checks what it relies on, aliasing included, on
    every call). Run one update before capturing it in a CUDA graph; float and tensor
    momenta share one compiled kernel, so the warm-up may use either. Raises
    ``ValueError`` naming the first mismatch (counts, names, shapes, devices,
    dtypes, shared memory) or a momentum outside [0, 1].
    """
    if buffers not in BUFFER_MODES:
        raise ValueError(f"ema_update_: buffers must be one of {BUFFER_MODES}, got {buffers!r}")
    if backend not in BACKENDS:
        raise ValueError(f"ema_update_: backend must be one of {BACKENDS}, got {backend!r}")
    t_names, t_list, t_copy_names, t_copy = _collect(teacher, "teacher", buffers)
    s_names, s_list, s_copy_names, s_copy = _collect(student, "student", buffers)
    names = _check_names(t_list, s_list, t_names, s_names, "tensor")
    copy_names = _check_names(t_copy, s_copy, t_copy_names, s_copy_names, "buffer")
    _check_shapes_devices(t_copy, s_copy, copy_names, "buffer")
    momentum = _check_momentum(momentum, t_list[0].device if t_list else None)
    if _has_shards(t_list, s_list):
        _check_shapes_devices(t_list, s_list, names, "tensor")  # the global shapes
        t_list, s_list = _local_shards(t_list, s_list, names, "tensor")
    if t_list:
        resolved = resolve_backend(backend, t_list[0].device, "ema_update_")
        if not _cpu_loop(t_list, s_list, momentum, resolved):
            _cached_plan(t_list, s_list, names, resolved).run(t_list, s_list, momentum)
    for t, s in zip(t_copy, s_copy, strict=True):
        t.copy_(s)


def _cpu_loop(t_list, s_list, momentum, backend: str) -> bool:
    """The PyTorch path on the CPU: one call of the C++ loop of ``csrc/ema.cpp`` (when the extension
    is loaded: never built for this), which checks everything it relies on (devices, shapes,
    dtypes, layouts, aliasing) on every call before it writes anything, so no plan is kept; it
    bumps the teacher's version counters as an in-place op does. False where it does not run or
    refuses the tensors: the validated path then updates them (``torch._foreach_*``, the same
    bits) or raises the error that names the tensor."""
    if backend != "torch" or not t_list[0].is_cpu or not _ext.load_installed_extension():
        return False
    tensor = isinstance(momentum, torch.Tensor)
    try:
        torch.ops.fastssl.ema_update_(t_list, s_list, 0.0 if tensor else momentum, momentum if tensor else None)
    except (RuntimeError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------- schedule

def cosine_momentum_schedule(base: float, final: float, epochs: int, niter_per_ep: int) -> np.ndarray:
    """The authors' per-iteration cosine from ``base`` to ``final`` (DINO: 0.996 to 1).

    Returns ``epochs * niter_per_ep`` values (float64),
    ``final + (base - final) * (1 + cos(pi * i / N)) / 2`` for iteration ``i < N``.
    """
    epochs, niter_per_ep = operator.index(epochs), operator.index(niter_per_ep)
    if epochs < 1 or niter_per_ep < 1:
        raise ValueError(f"cosine_momentum_schedule: epochs and niter_per_ep must be positive, got {epochs} "
                         f"and {niter_per_ep}")
    for name, value in (("base", base), ("final", final)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"cosine_momentum_schedule: {name} must lie in [0, 1], got {value}")
    n = epochs * niter_per_ep
    return final + 0.5 * (base - final) * (1.0 + np.cos(math.pi * np.arange(n) / n))


# ----------------------------------------------------------------------------- module

class MomentumTeacher(nn.Module):
    """The EMA teacher of a student, built and updated for you.

    ``MomentumTeacher(student, cosine_momentum_schedule(0.996, 1.0, epochs, niter_per_ep))``
    copies the student (``requires_grad=False``) into ``self.teacher``; calling the
    object runs the teacher. After each optimiser step ``update(it)`` applies
    ``teacher = m * teacher + (1 - m) * student`` with ``m = schedule[it]`` (see
    :func:`ema_update_`) and returns ``m``.

    Args:
        student: the student module (DDP / compiled wrappers are looked through).
        momentum_schedule: a float (constant), a sequence of per-iteration values
            in [0, 1], or a callable ``step -> momentum``.
        teacher: an existing teacher to update instead of a copy of the student
            (the authors build it separately and load the student's weights). Under
            FSDP2, copy the student before sharding it and shard the copy alike.
        dtype: a floating dtype to convert the teacher to (e.g. ``torch.bfloat16``);
            math stays fp32.
        buffers: ``"leave"``, ``"copy"`` or ``"average"``, as in :func:`ema_update_`.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Like an optimiser, it takes the two parameter lists once, at construction, and
    keeps the validated plan (addresses, sizes, dtypes, device tables); each update
    only checks that addresses, dtypes, shapes and strides are unchanged (``.to()``,
    ``.half()`` change them: the plan is rebuilt). After replacing submodules of either model, call
    :meth:`refresh`. ``state_dict`` holds the teacher's under ``teacher.``; the
    teacher's own ``state_dict`` is ``self.teacher.state_dict()``.
    """

    def __init__(self, student: nn.Module,
                 momentum_schedule: float | Sequence[float] | Callable[[int], float], *,
                 teacher: nn.Module | None = None, dtype: torch.dtype | None = None,
                 buffers: str = "leave", backend: str = "auto"):
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"MomentumTeacher: student must be an nn.Module, got {type(student).__name__}")
        if buffers not in BUFFER_MODES:
            raise ValueError(f"MomentumTeacher: buffers must be one of {BUFFER_MODES}, got {buffers!r}")
        if backend not in BACKENDS:
            raise ValueError(f"MomentumTeacher: backend must be one of {BACKENDS}, got {backend!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"MomentumTeacher: dtype must be a floating-point dtype, got {dtype}")
        student = _unwrap(student)
        teacher = copy.deepcopy(student) if teacher is None else _unwrap(teacher)
        if dtype is not None:
            teacher.to(dtype)
        for p in teacher.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.teacher = teacher
        self._student = (student,)  # a tuple: not registered, so the student stays out of state_dict
        self.buffers_mode, self.backend = buffers, backend
        self._schedule, self._fn, self._constant = self._parse_schedule(momentum_schedule)
        self.refresh()

    @staticmethod
    def _parse_schedule(schedule):
        if callable(schedule):
            return None, schedule, None
        if isinstance(schedule, numbers.Real) and not isinstance(schedule, bool):
            return None, None, _check_momentum(float(schedule), None, "MomentumTeacher")
        values = np.asarray(schedule, dtype=np.float64)
        if values.ndim != 1 or values.size == 0:
            raise ValueError("MomentumTeacher: momentum_schedule must be a float, a callable or a non-empty "
                             f"1-D sequence, got shape {values.shape}")
        bad = np.flatnonzero(~((values >= 0.0) & (values <= 1.0)))
        if bad.size:
            raise ValueError(f"MomentumTeacher: momentum_schedule[{bad[0]}] = {values[bad[0]]} is outside "
                             "[0, 1]")
        return [float(v) for v in values], None, None

    def refresh(self) -> None:
        """Take the parameter (and buffer) lists of both models again and re-validate them."""
        t_names, self._t, t_copy_names, self._t_copy = _collect(self.teacher, "teacher", self.buffers_mode)
        s_names, self._s, s_copy_names, self._s_copy = _collect(self._student[0], "student",
                                                                self.buffers_mode)
        self._names = _check_names(self._t, self._s, t_names, s_names, "tensor")
        _check_shapes_devices(self._t, self._s, self._names, "tensor")
        self._sharded = _has_shards(self._t, self._s)
        if self._sharded:
            _local_shards(self._t, self._s, self._names, "tensor")  # sharded alike
        copy_names = _check_names(self._t_copy, self._s_copy, t_copy_names, s_copy_names, "buffer")
        _check_shapes_devices(self._t_copy, self._s_copy, copy_names, "buffer")
        self._plan, self._signature = None, None

    def momentum_at(self, step: int | None) -> float:
        """The scheduled momentum of iteration ``step`` (an error past the schedule)."""
        if self._constant is not None:
            return self._constant
        if step is None:
            raise ValueError("MomentumTeacher: pass the iteration (update(step)) for the momentum schedule")
        step = operator.index(step)
        if self._fn is not None:
            return _check_momentum(self._fn(step), None, "MomentumTeacher")
        if not 0 <= step < len(self._schedule):
            raise ValueError(f"MomentumTeacher: step {step} is outside the momentum schedule, which covers "
                             f"steps 0..{len(self._schedule) - 1}")
        return self._schedule[step]

    @torch.no_grad()
    def update(self, step: int | None = None, *, momentum: float | torch.Tensor | None = None):
        """One EMA step with the scheduled momentum of ``step``, or with ``momentum=`` (a float,
        or a 0-dim tensor on the device, e.g. for CUDA graphs). Returns the momentum used."""
        if momentum is None:
            momentum = self.momentum_at(step)
        elif step is not None:
            raise ValueError("MomentumTeacher.update: pass step or momentum=, not both")
        device = self._t[0].device if self._t else None
        momentum = _check_momentum(momentum, device, "MomentumTeacher.update")
        # The shards afresh each time (cheap without autograd): FSDP2 may give a parameter new storage.
        t_list, s_list = (_to_local(self._t), _to_local(self._s)) if self._sharded else (self._t, self._s)
        if t_list:
            backend = resolve_backend(self.backend, device, "MomentumTeacher")
            if not _cpu_loop(t_list, s_list, momentum, backend):
                signature = _signature(t_list, s_list)
                if signature != self._signature:  # first update, or parameters moved (.to(), .half())
                    self._plan, self._signature = _Plan(t_list, s_list, self._names, backend), signature
                self._plan.run(t_list, s_list, momentum)
        for t, s in zip(self._t_copy, self._s_copy, strict=True):
            t.copy_(s)
        return momentum

    def forward(self, *args, **kwargs):
        return self.teacher(*args, **kwargs)

    def extra_repr(self) -> str:
        kind = "constant" if self._constant is not None else "callable" if self._fn is not None \
            else f"{len(self._schedule)} steps"
        return f"schedule={kind}, buffers={self.buffers_mode!r}, backend={self.backend!r}"

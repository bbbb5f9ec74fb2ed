"""The fused EMA teacher update against the authors' loop (DINO main_dino.py).

The PyTorch path must give the loop's numbers bit for bit (fp32 math, one rounding into
the teacher's dtype), on the CPU through the C++ loop of csrc/ema.cpp and through
``torch._foreach_*`` alike; the kernel within one ulp of the teacher's dtype (the
interpreter rounds fp32 -> bf16 toward zero).
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEVICE, INTERPRETED, gpu_only
from torch import nn

import fastssl
import fastssl.kernels.ema as ema_kernels
from fastssl import MomentumTeacher, _ext, ema_update_
from fastssl.ema import cosine_momentum_schedule

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# Around the kernel's block of 4096 elements and twice it, plus 0-dim, one-element, tiny and 2-D
# odd tensors.
ODD_SHAPES = [(), (1,), (5, 3), (4095,), (4096,), (4097,), (8191,), (8193,), (3, 4099)]


def authors_update(teacher, student, m):
    """``param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)`` per tensor, on fp32 copies
    (fp64 where either side is fp64), rounded once to the teacher's dtype. Returns new tensors;
    ``m`` a float or 0-dim tensor."""
    out = []
    for t, s in zip(teacher, student, strict=True):
        acc_dtype = torch.promote_types(torch.promote_types(t.dtype, s.dtype), torch.float32)
        acc = t.detach().to(acc_dtype).clone()
        acc.mul_(m).add_((1 - m) * s.detach().to(acc_dtype))
        out.append(acc.to(t.dtype))
    return out


def assert_updated(actual, expected, backend, what="teacher"):
    """Bitwise for the PyTorch path, within one ulp of the teacher's dtype for the kernel."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert (a.dtype, a.shape) == (e.dtype, e.shape), f"{what}[{i}]: {a.dtype}, {e.dtype} expected"
        if backend == "torch":
            assert torch.equal(a, e), f"{what}[{i}]: not bitwise equal to the authors' loop"
            continue
        fi = torch.finfo(e.dtype)
        a64, e64 = a.detach().double().cpu(), e.detach().double().cpu()
        ulp = torch.exp2(torch.floor(torch.log2(e64.abs().clamp_min(fi.tiny)))) * fi.eps
        bad = (a64 - e64).abs() > ulp
        assert not bad.any(), (f"{what}[{i}] {tuple(a.shape)} {a.dtype}: {int(bad.sum())} elements more than "
                               f"one ulp off, e.g. {a64[bad][0].item()} vs {e64[bad][0].item()}")


def _pair(shapes, t_dtype=F32, s_dtype=F32, device=DEVICE):
    teacher = [torch.randn(s, device=device).to(t_dtype) for s in shapes]
    student = [torch.randn(s, device=device).to(s_dtype) for s in shapes]
    return teacher, student


def _momentum():
    return 0.05 + 0.9 * torch.rand(()).item()  # large enough updates to show in bf16


class _CountLaunches:
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture(autouse=True, scope="module")
def _extension():
    """The C++ loop the PyTorch path runs on CPU tensors (built here if fastssl._C is not installed)."""
    _ext.load_extension()


# ----------------------------------------------------------------------------- numerics

@functools.cache
def _vit(name: str, depth: int | None) -> nn.Module:
    timm = pytest.importorskip("timm")
    kwargs = {} if depth is None else dict(depth=depth)
    return timm.create_model(name, pretrained=False, **kwargs).to(DEVICE)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224"])
def test_vit_parameter_sets_match_authors_loop(backend, name):
    # Every shape of ViT-S is in one block; its 12 blocks take ~10 s through the interpreter.
    depth = 1 if name.startswith("vit_small") and backend == "triton" and INTERPRETED else None
    student = copy.deepcopy(_vit(name, depth))
    teacher = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        for p in student.parameters():  # an optimiser step
            p.add_(torch.randn_like(p), alpha=0.01)
    expected = authors_update(list(teacher.parameters()), list(student.parameters()), 0.996)
    ema_update_(teacher, student, 0.996, backend=backend)
    assert_updated(list(teacher.parameters()), expected, backend)


@pytest.mark.parametrize("t_dtype,s_dtype", [(F32, F32), (BF16, F32), (F32, BF16), (BF16, BF16), (F16, F16),
                                             (F16, F32)], ids=str)
def test_odd_sizes_and_dtype_pairs(backend, t_dtype, s_dtype):
    teacher, student = _pair(ODD_SHAPES, t_dtype, s_dtype)
    m = _momentum()
    expected = authors_update(teacher, student, m)
    ema_update_(teacher, student, m, backend=backend)
    assert_updated(teacher, expected, backend)


@pytest.mark.parametrize("path", ["loop", "foreach"])
@pytest.mark.parametrize("t_dtype,s_dtype", [(F32, F32), (BF16, F32), (F32, BF16), (BF16, BF16), (F16, F16),
                                             (F16, BF16), (torch.float64, F32), (F32, torch.float64)], ids=str)
def test_cpu_loop_and_foreach_give_the_authors_bits(monkeypatch, path, t_dtype, s_dtype):
    # The two PyTorch paths on the CPU: the C++ loop (one call; built with -ffp-contract=off, so its
    # AVX-512 / AVX2 builds fuse no multiply-add) and torch._foreach_* (where the extension is not
    # loaded). Both must give the loop's bits, for dense, channels-last, strided and transposed pairs,
    # over more than two of the loop's chunks (2^18 elements, taken by the threads in turn) with
    # chunk boundaries inside tensors.
    if path == "loop":
        monkeypatch.setattr(fastssl.ema, "_ema_torch", lambda *a: pytest.fail("the foreach path ran"))
    else:
        monkeypatch.setattr(_ext, "load_installed_extension", lambda: False)
    teacher, student = _pair(ODD_SHAPES + [(70001,), (300007,), (3, 87383)], t_dtype, s_dtype, device="cpu")
    cl = torch.randn(3, 5, 4, 6).to(t_dtype)
    teacher += [cl.to(memory_format=torch.channels_last), torch.randn(6, 10).to(t_dtype)[:, ::2],
                torch.randn(5, 7).to(t_dtype)]
    student += [torch.randn(3, 5, 4, 6).to(s_dtype).to(memory_format=torch.channels_last),
                torch.randn(6, 5).to(s_dtype), torch.randn(7, 5).to(s_dtype).t()]
    for m in (0.996, _momentum(), torch.tensor(_momentum())):
        expected = authors_update(teacher, student, m)
        versions = [t._version for t in teacher]
        ema_update_(teacher, student, m, backend="torch")
        assert_updated(teacher, expected, "torch")
        assert all(t._version > v for t, v in zip(teacher, versions, strict=True))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("t_dtype,s_dtype", [(F32, F32), (BF16, BF16), (F16, F32)], ids=str)
def test_cpu_loop_with_any_thread_count(monkeypatch, threads, t_dtype, s_dtype):
    # The loop's chunks on one thread (no worker started) and on more threads than this machine's cores
    # (some take no chunk): the authors' bits either way.
    monkeypatch.setattr(fastssl.ema, "_ema_torch", lambda *a: pytest.fail("the foreach path ran"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        teacher, student = _pair([(5,), (300007,), (3, 87383), (262144,)], t_dtype, s_dtype, device="cpu")
        expected = authors_update(teacher, student, 0.996)
        ema_update_(teacher, student, 0.996, backend="torch")
        assert_updated(teacher, expected, "torch")
    finally:
        torch.set_num_threads(before)


def test_cpu_loop_runs_one_call_for_every_tensor(monkeypatch):
    calls = []
    op = torch.ops.fastssl.ema_update_

    class Spy:
        def __call__(self, *args):
            calls.append(len(args[0]))
            return op(*args)

    monkeypatch.setattr(torch.ops.fastssl, "ema_update_", Spy())
    teacher, student = _pair([(3, 4), (9,), ()], BF16, F32)
    teacher.append(torch.randn(5, device=DEVICE))
    student.append(torch.randn(5, device=DEVICE).to(F16))
    ema_update_(teacher, student, 0.9, backend="torch")
    assert calls == ([4] if DEVICE.type == "cpu" else [])


def test_inference_tensors_are_refused_before_anything_is_written():
    # As for any in-place op: not outside inference mode, where the C++ loop refuses them before it
    # writes (the foreach path then raises torch's error); inside it the update runs.
    with torch.inference_mode():
        teacher, student = _pair([(5,), (3, 4)])
    before = [t.clone() for t in teacher]
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        ema_update_(teacher, student, 0.9, backend="torch")
    assert all(torch.equal(t, b) for t, b in zip(teacher, before, strict=True))
    with torch.inference_mode():
        expected = authors_update(teacher, student, 0.9)
        ema_update_(teacher, student, 0.9, backend="torch")
    assert_updated(teacher, expected, "torch")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the C++ loop is the CPU's (CUDA runs the Triton kernel)")
def test_cpu_loop_opcheck():
    teacher, student = _pair([(3, 4), (7,)], BF16, F32)
    for m, m_tensor in ((0.9, None), (0.0, torch.tensor(0.7))):
        torch.library.opcheck(torch.ops.fastssl.ema_update_.default, (teacher, student, m, m_tensor))


def test_cuda_graph_capture_never_compiles_a_new_variant():
    # Issue 16: a float warm-up then a capture with a device momentum compiled a second kernel
    # variant (another constexpr, another pointer type) inside the capture. Every launch of a tensor
    # set must compile the same variant, whatever the momentum: a float, an fp32 or fp64 tensor, a
    # tensor at an address that is not 16-byte aligned (recorded as Triton's JIT keys launches).
    from fastssl.kernels._launch import record_launches

    teacher, student = _pair([(4097,), (3, 5)])
    odd = torch.zeros(8, device=DEVICE)[1]  # 4 bytes past an aligned address
    momenta = (0.9, torch.tensor(0.8, device=DEVICE), odd.fill_(0.7),
               torch.tensor(0.6, dtype=torch.float64, device=DEVICE))
    with record_launches() as launches:
        for m in momenta:
            ema_update_(teacher, student, m, backend="triton")
    variants = {json.dumps([launch["signature"], launch["constexprs"], launch["options"]], sort_keys=True)
                for launch in launches}
    assert len(launches) == len(momenta) and len(variants) == 1, variants
    for m in momenta:  # and each is the authors' update (1 - m computed in the momentum's own dtype)
        expected = authors_update(teacher, student, m)
        ema_update_(teacher, student, m, backend="triton")
        assert_updated(teacher, expected, "triton", f"teacher at momentum {m!r}")


def test_more_than_1000_tensors_one_launch_per_dtype_pair(backend, monkeypatch):
    # Tiny tensors (0-dim to 5 elements, some empty) in two dtype pairs, interleaved.
    shapes = [() if i % 7 == 0 else (i % 6,) for i in range(1200)]
    teacher, student = _pair(shapes)
    for i in range(1, len(shapes), 2):
        teacher[i] = teacher[i].to(BF16)
    counter = _CountLaunches(ema_kernels._ema_kernel)
    monkeypatch.setattr(ema_kernels, "_ema_kernel", counter)
    m = _momentum()
    expected = authors_update(teacher, student, m)
    ema_update_(teacher, student, m, backend=backend)
    assert_updated(teacher, expected, backend)
    assert counter.launches == (2 if backend == "triton" else 0)


def test_tensor_momentum_is_read_on_every_call(backend):
    teacher, student = _pair([(3, 7), (4097,), ()])
    m = torch.tensor(_momentum(), device=DEVICE)
    for _ in range(2):  # same plan, new value: nothing is baked in
        expected = authors_update(teacher, student, m)
        ema_update_(teacher, student, m, backend=backend)
        assert_updated(teacher, expected, backend)
        m.fill_(_momentum())


def test_momentum_zero_and_one(backend):
    teacher, student = _pair([(33,), (5, 5)], BF16, F32)
    before = [t.clone() for t in teacher]
    ema_update_(teacher, student, 1.0, backend=backend)
    assert all(torch.equal(t, b) for t, b in zip(teacher, before, strict=True))
    ema_update_(teacher, student, 0, backend=backend)
    assert_updated(teacher, [s.to(BF16) for s in student], backend)


def test_plans_are_cached_per_tensor_set(backend, monkeypatch):
    # Keyed by addresses, dtypes, shapes and strides: alternating sets stay correct, and a set
    # seen before (its tensors alive) reuses its plan.
    built = []

    class CountingPlan(fastssl.ema._Plan):
        def __init__(self, *args):
            built.append(args[-1])
            super().__init__(*args)

    monkeypatch.setattr(fastssl.ema, "_Plan", CountingPlan)
    monkeypatch.setattr(fastssl.ema, "_CACHE", collections.OrderedDict())
    sets = [_pair([(10,), (4097,)]), _pair([(4097,), (10,), (2, 2)], BF16, F32), _pair([(9000,)])]
    for teacher, student in sets + sets[:2]:
        m = _momentum()
        expected = authors_update(teacher, student, m)
        ema_update_(teacher, student, m, backend=backend)
        assert_updated(teacher, expected, backend)
    # The C++ loop of the CPU keeps no plan (it checks its tensors on every call).
    assert built == ([] if backend == "torch" and DEVICE.type == "cpu" else [backend] * 3)
    if backend == "torch" and DEVICE.type == "cpu":  # the foreach path (no extension) keeps them
        monkeypatch.setattr(_ext, "load_installed_extension", lambda: False)
        for teacher, student in sets + sets[:2]:
            ema_update_(teacher, student, _momentum(), backend=backend)
        assert built == ["torch"] * 3


def test_dense_layouts_and_non_contiguous_tensors(backend):
    # Channels-last in both models: dense with the same strides, updated in place.
    teacher, student = _pair([(2, 3, 5, 7), (4, 2, 3, 3)])
    teacher = [t.to(memory_format=torch.channels_last) for t in teacher]
    student = [s.to(memory_format=torch.channels_last) for s in student]
    m = _momentum()
    expected = authors_update(teacher, student, m)
    ema_update_(teacher, student, m, backend=backend)
    assert_updated(teacher, expected, backend)

    # A transposed student, a strided (not dense) teacher: the PyTorch path takes them,
    # the kernel refuses them with the reason.
    t_rows, s_rows = torch.randn(6, 5, device=DEVICE), torch.randn(5, 6, device=DEVICE).t()
    wide = torch.randn(6, 10, device=DEVICE)
    cases = [([t_rows], [s_rows], "strides"),
             ([wide[:, ::2]], [torch.randn(6, 5, device=DEVICE)], "not dense")]
    for teacher, student, message in cases:
        if backend == "torch":
            expected = authors_update(teacher, student, m)
            ema_update_(teacher, student, m, backend=backend)
            assert_updated(teacher, expected, backend)
        else:
            with pytest.raises(ValueError, match=message):
                ema_update_(teacher, student, m, backend=backend)


def test_modules_wrappers_and_version_counters(backend):
    student = nn.Sequential(nn.Linear(7, 13), nn.LayerNorm(13), nn.Linear(13, 3)).to(DEVICE)
    teacher = copy.deepcopy(student)
    versions = [p._version for p in teacher.parameters()]
    m = _momentum()
    expected = authors_update(list(teacher.parameters()), list(student.parameters()), m)
    # DataParallel and torch.compile wrappers are looked through (compile is lazy: nothing is built).
    ema_update_(torch.compile(teacher), nn.DataParallel(student), m, backend=backend)
    assert_updated(list(teacher.parameters()), expected, backend)
    # The kernel writes through raw addresses but still bumps autograd's version counters.
    assert all(p._version > v for p, v in zip(teacher.parameters(), versions, strict=True))


@pytest.mark.parametrize("mode", ["leave", "copy", "average"])
def test_buffer_modes(backend, mode):
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(DEVICE)
    student(torch.randn(2, 3, 8, 8, device=DEVICE))  # training mode: running statistics move
    teacher = copy.deepcopy(student)
    student(torch.randn(2, 3, 8, 8, device=DEVICE))
    t_bn, s_bn = teacher[1], student[1]
    before = {n: b.clone() for n, b in t_bn.named_buffers()}
    m = _momentum()
    expected = authors_update([t_bn.running_mean, t_bn.running_var], [s_bn.running_mean, s_bn.running_var], m)
    ema_update_(teacher, student, m, buffers=mode, backend=backend)
    if mode == "leave":
        assert all(torch.equal(b, before[n]) for n, b in t_bn.named_buffers())
    elif mode == "copy":
        assert all(torch.equal(b, s) for b, s in zip(t_bn.buffers(), s_bn.buffers(), strict=True))
    else:
        assert_updated([t_bn.running_mean, t_bn.running_var], expected, backend)
        assert t_bn.num_batches_tracked.item() == s_bn.num_batches_tracked.item() == 2


# ----------------------------------------------------------------------------- MomentumTeacher

def authors_cosine(base, final, epochs, niter_per_ep):
    """The authors' cosine_scheduler (utils.py) without warm-up, written out."""
    iters = np.arange(epochs * niter_per_ep)
    return final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))


def test_cosine_momentum_schedule():
    schedule = cosine_momentum_schedule(0.996, 1.0, 7, 13)
    np.testing.assert_array_equal(schedule, authors_cosine(0.996, 1.0, 7, 13))
    assert len(schedule) == 91 and schedule[0] == 0.996
    assert np.all(np.diff(schedule) > 0) and schedule[-1] < 1.0


def _small_student():
    return nn.Sequential(nn.Linear(9, 31), nn.GELU(), nn.LayerNorm(31), nn.Linear(31, 5)).to(DEVICE)


def _step(student):
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)


def test_momentum_teacher_follows_schedule(backend):
    student = _small_student()
    schedule = cosine_momentum_schedule(0.9, 1.0, 2, 3)
    mt = MomentumTeacher(student, schedule, backend=backend)
    assert all(not p.requires_grad for p in mt.teacher.parameters())
    assert all(torch.equal(t, s) for t, s in zip(mt.teacher.parameters(), student.parameters(), strict=True))
    expected = [p.detach().clone() for p in student.parameters()]
    for it in range(len(schedule)):
        _step(student)
        assert mt.update(it) == schedule[it]
        expected = authors_update(expected, list(student.parameters()), schedule[it])
        assert_updated(list(mt.teacher.parameters()), expected, backend)
    x = torch.randn(4, 9, device=DEVICE)
    assert torch.equal(mt(x), mt.teacher(x))


def test_momentum_teacher_bf16_teacher_and_tensor_momentum(backend):
    student = _small_student()
    mt = MomentumTeacher(student, 0.5, dtype=BF16, backend=backend)
    assert all(p.dtype == BF16 for p in mt.teacher.parameters())
    _step(student)
    expected = authors_update(list(mt.teacher.parameters()), list(student.parameters()), 0.5)
    assert mt.update() == 0.5
    assert_updated(list(mt.teacher.parameters()), expected, backend)
    m = torch.tensor(0.25, device=DEVICE)
    expected = authors_update(list(mt.teacher.parameters()), list(student.parameters()), m)
    mt.update(momentum=m)
    assert_updated(list(mt.teacher.parameters()), expected, backend)


def test_momentum_teacher_replans_when_parameters_move(backend):
    student = _small_student()
    mt = MomentumTeacher(student, 0.75, backend=backend)
    mt.update()
    student.to(F16)  # new storage for every parameter: the cached plan is stale and rebuilt
    mt.to(F16)
    _step(student)
    expected = authors_update(list(mt.teacher.parameters()), list(student.parameters()), 0.75)
    mt.update()
    assert_updated(list(mt.teacher.parameters()), expected, backend)


def test_momentum_teacher_state_round_trip(backend):
    student = _small_student()
    schedule = cosine_momentum_schedule(0.99, 1.0, 1, 10)
    mt = MomentumTeacher(student, schedule, backend=backend)
    for it in range(3):
        _step(student)
        mt.update(it)
    state = mt.state_dict()
    assert set(state) == {f"teacher.{k}" for k in mt.teacher.state_dict()}

    other = _small_student()
    restored = MomentumTeacher(other, schedule, backend=backend)
    restored.load_state_dict(state)  # copies in place: the plan stays valid
    other.load_state_dict(student.state_dict())
    for t, r in zip(mt.teacher.parameters(), restored.teacher.parameters(), strict=True):
        assert torch.equal(t, r)
    _step(student)
    other.load_state_dict(student.state_dict())
    mt.update(3)
    restored.update(3)
    for t, r in zip(mt.teacher.parameters(), restored.teacher.parameters(), strict=True):
        assert torch.equal(t, r)


# ----------------------------------------------------------------------------- bad input

def _bad_case(name):
    t, s = _pair([(4,), (2, 3)])
    cases = {
        "counts": (t, s[:1], 0.9, "the teacher has 2 tensors but the student has 1"),
        "shapes": (t, [s[0], torch.randn(3, 2, device=DEVICE)], 0.9,
                   r"tensor \[1\] has shape \(2, 3\) in the teacher but \(3, 2\) in the student"),
        "devices": (t, [s[0], torch.empty(2, 3, device="meta")], 0.9,
                    r"tensor \[1\] of the student is on meta"),
        "dtype": (t, [s[0], torch.ones(2, 3, dtype=torch.int64, device=DEVICE)], 0.9,
                  r"tensor \[1\] of the student has dtype torch.int64; only floating-point"),
        "aliased": ([t[0], t[0]], [s[0], s[0].clone()], 0.9, r"teacher tensors \[0\] and \[1\] share memory"),
        "momentum>1": (t, s, 1.5, r"momentum must lie in \[0, 1\], got 1.5"),
        "momentum<0": (t, s, -0.1, r"momentum must lie in \[0, 1\], got -0.1"),
        "momentum nan": (t, s, math.nan, r"momentum must lie in \[0, 1\], got nan"),
        "momentum shape": (t, s, torch.full((1,), 0.9, device=DEVICE), r"0-dim .* got shape \(1,\)"),
        "momentum device": (t, s, torch.tensor(0.9, device="meta"), "momentum tensor is on meta"),
    }
    return cases[name]


@pytest.mark.parametrize("case", ["counts", "shapes", "devices", "dtype", "aliased", "momentum>1",
                                  "momentum<0", "momentum nan", "momentum shape", "momentum device"])
def test_bad_inputs(backend, case):
    teacher, student, momentum, message = _bad_case(case)
    before = [t.clone() for t in teacher if t.device.type != "meta"]
    with pytest.raises(ValueError, match=message):
        ema_update_(teacher, student, momentum, backend=backend)
    assert all(torch.equal(t, b) for t, b in zip(teacher, before, strict=True))  # nothing was written


def test_bad_modules_and_options(backend):
    student = _small_student()
    renamed = nn.Sequential(nn.Linear(9, 31), nn.GELU(), nn.Identity(), nn.LayerNorm(31), nn.Linear(31, 5))
    with pytest.raises(ValueError, match="tensor 2 is '3.weight' in the teacher but '2.weight' in the stud"):
        ema_update_(renamed.to(DEVICE), student, 0.9, backend=backend)
    narrower = nn.Sequential(nn.Linear(9, 30), nn.GELU(), nn.LayerNorm(31), nn.Linear(31, 5)).to(DEVICE)
    with pytest.raises(ValueError, match=r"tensor '0.weight' has shape \(30, 9\) in the teacher but \(31, "):
        ema_update_(narrower, student, 0.9, backend=backend)
    if DEVICE.type == "cpu":  # a CPU tensor momentum is range-checked (no sync needed)
        with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\], got 2.0"):
            ema_update_(copy.deepcopy(student), student, torch.tensor(2.0), backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        ema_update_(student, copy.deepcopy(student), 0.9, backend="cuda")
    with pytest.raises(ValueError, match="buffers must be one of"):
        ema_update_(student, copy.deepcopy(student), 0.9, buffers="ema")
    with pytest.raises(ValueError, match="needs modules"):
        ema_update_(list(student.parameters()), list(student.parameters()), 0.9, buffers="copy")
    with pytest.raises(TypeError, match="nn.Module or a sequence of tensors"):
        ema_update_(torch.zeros(3), torch.zeros(3), 0.9)


def test_momentum_teacher_bad_input():
    student = _small_student()
    with pytest.raises(ValueError, match=r"momentum_schedule\[2\] = 1.5 is outside \[0, 1\]"):
        MomentumTeacher(student, [0.9, 0.95, 1.5])
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\]"):
        MomentumTeacher(student, -1.0)
    mt = MomentumTeacher(student, [0.9, 0.95])
    with pytest.raises(ValueError, match=r"step 2 is outside the momentum schedule, which covers steps 0..1"):
        mt.update(2)
    with pytest.raises(ValueError, match="pass the iteration"):
        mt.update()
    with pytest.raises(ValueError, match="not both"):
        mt.update(0, momentum=0.5)
    with pytest.raises(ValueError, match="dtype must be a floating-point dtype"):
        MomentumTeacher(student, 0.9, dtype=torch.int32)
    with pytest.raises(ValueError, match="epochs and niter_per_ep must be positive"):
        cosine_momentum_schedule(0.996, 1.0, 0, 10)
    with pytest.raises(ValueError, match=r"final must lie in \[0, 1\]"):
        cosine_momentum_schedule(0.996, 1.5, 1, 10)


def test_public_api():
    assert fastssl.ema_update_ is ema_update_ and fastssl.MomentumTeacher is MomentumTeacher
    assert {"ema_update_", "MomentumTeacher"} <= set(fastssl.__all__)


# ----------------------------------------------------------------------------- CUDA graphs

@gpu_only("CUDA graphs need a CUDA device")
def test_cuda_graph_capture_with_device_momentum(backend):
    if backend == "triton" and INTERPRETED:
        pytest.skip("CUDA graphs need compiled kernels (TRITON_INTERPRET is set)")
    dev = torch.device("cuda")
    teacher = [torch.randn(s, device=dev) for s in ODD_SHAPES] + [torch.randn(77, device=dev).to(BF16)]
    student = [torch.randn(t.shape, device=dev) for t in teacher]
    m = torch.tensor(0.9, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: builds and caches the plan
        ema_update_(teacher, student, m, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema_update_(teacher, student, m, backend=backend)
    for value in (0.5, 0.99):
        m.fill_(value)
        expected = authors_update(teacher, student, value)
        graph.replay()
        torch.cuda.synchronize()
        assert_updated(teacher, expected, "triton")  # one ulp: a device momentum, 1 - m on the device


# ----------------------------------------------------------------------------- benchmark

def _benchmarks():
    try:
        from benchmarks import ema
    except ImportError:  # plain `pytest` does not put the repository root on sys.path
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from benchmarks import ema
    return ema


def test_benchmark_smoke(tmp_path):
    pytest.importorskip("timm")
    bench = _benchmarks()
    paths = bench.main(["--preset", "smoke", "--out", str(tmp_path), "--device", "cpu"])
    records = json.loads(paths["json"].read_text())["records"]
    assert {r["contender"] for r in records} == set(bench.CONTENDERS) - set(bench.CUDA_ONLY)
    assert {r["dtype"] for r in records} == {"fp32", "bf16"}
    for r in records:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["roofline_pct"] > 0
        assert r["rel_err"] <= bench.TOLERANCE[r["dtype"]]
        assert r["bytes_moved"] == pytest.approx(3 * r["params_m"] * 1e6 * (4 if r["dtype"] == "fp32" else 2))


def test_benchmark_check_catches_a_wrong_update(monkeypatch):
    bench = _benchmarks()
    teacher, student = _pair([(5, 3), (100,)])
    monkeypatch.setattr(bench, "_authors", lambda teacher, student, m: None)
    with pytest.raises(bench.CorrectnessError, match="authors differs from the float64 update"):
        bench.check(["fastssl", "authors"], bench.Case("ViT-Ti/16", "fp32"), teacher, student)


def test_interleaved_views_are_not_aliases():
    # Strided views of one buffer whose extents interleave but share no element are valid (the
    # PyTorch path updates them); views that do share elements are refused.
    x, y = torch.randn(8, 3, device=DEVICE), torch.randn(8, 3, device=DEVICE)
    expected = 0.5 * x[:, :2] + 0.5 * y[:, :2]
    ema_update_([x[:, 0], x[:, 1]], [y[:, 0], y[:, 1]], 0.5, backend="torch")
    torch.testing.assert_close(x[:, :2], expected)
    with pytest.raises(ValueError, match=r"teacher tensors \[0\] and \[1\] share memory"):
        ema_update_([x[:, 0:2], x[:, 1:3]], [y[:, 0:2], y[:, 1:3]], 0.5, backend="torch")
    flat = torch.randn(10, device=DEVICE)
    with pytest.raises(ValueError, match=r"teacher tensors \[0\] and \[1\] share memory"):
        ema_update_([flat[0:6], flat[4:10]], [torch.randn(6, device=DEVICE)] * 2, 0.5, backend="torch")

r"""Triton kernel for the EMA teacher update over many tensors in one launch, and its launcher.

For every element of every teacher tensor T_j and the matching student tensor S_j,
with momentum m (a float, or a scalar the kernel reads from device memory; one compiled
variant for both):

    T_j  <-  round_to_teacher_dtype( m * T_j + (1 - m) * S_j )      math in fp32

(to nearest even on GPUs; Triton's interpreter truncates fp32 -> bf16, an ulp at most).

Design: a multi-tensor apply. One launch covers every tensor of a (teacher dtype,
student dtype) group through two small device tables, built once per tensor set:

* ``table``: int64 ``[n_tensors, 4]``, per tensor its teacher address, student
  address, numel and the index of its first block;
* ``block_tensor``: int32 ``[n_blocks]``, the tensor each program works on.

Program ``pid`` updates elements ``[(pid - first_block) * BLOCK, ... + BLOCK)`` of
tensor ``block_tensor[pid]``: a tiny tensor (a bias, a 0-dim scale) costs one
program, a large one many, and every byte is read and written once, the floor of
the update (2 reads and 1 write of the parameters). The addresses become typed
pointers in the kernel (an ``int64 -> pointer`` cast), which works on GPUs and in
Triton's interpreter alike (there the addresses are those of CPU tensors). Full
blocks take an unmasked path and, when every address of the group is aligned
(the allocator's default), an alignment hint lets their loads and stores
vectorise; the last, partial block of each tensor takes a masked path.

Why not a flat teacher (one buffer, one elementwise kernel)? The student is not
flat, so its addresses are needed anyway; the table keeps any teacher layout
(built by the user, loaded from a checkpoint, a module's own parameters) and
costs each program 36 bytes of (cached) table reads for its 4096 elements.

Each tensor is walked as ``numel`` consecutive elements from its address: the
caller passes tensors that are dense, with the same strides in teacher and
student (contiguous ones, or e.g. both channels-last).
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import triton
import triton.language as tl

from ._launch import launch, launch_options

# One compiled variant serves both kinds of momentum: LOAD_M is a run-time flag, M_PTR always an
# fp32 pointer (a dummy for a float momentum), and neither is specialised (value, alignment), so a
# CUDA graph captured with a device momentum never compiles mid-capture whatever the warm-up used.
_NOT_SPECIALISED = ("M_PTR", "LOAD_M")


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _ema_kernel(T_REF, S_REF, TABLE, BLOCK_TENSOR, M_PTR, m, w, LOAD_M,
                T_ALIGN: tl.constexpr, S_ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    # T_REF / S_REF only carry the teacher / student element types.
    pid = tl.program_id(0)
    row = TABLE + tl.load(BLOCK_TENSOR + pid) * 4
    t_ptr = tl.load(row).to(T_REF.dtype)
    s_ptr = tl.load(row + 1).to(S_REF.dtype)
    n = tl.load(row + 2)
    start = (pid - tl.load(row + 3)) * BLOCK
    if T_ALIGN > 0:  # every address of the group is a multiple of these byte counts
        t_ptr = tl.multiple_of(t_ptr, T_ALIGN)
        s_ptr = tl.multiple_of(s_ptr, S_ALIGN)
    if LOAD_M == 1:  # uniform across programs: a branch, not a variant
        m = tl.load(M_PTR)
        w = 1.0 - m
    elif LOAD_M == 2:  # both given: 1 - m computed in the momentum's own dtype
        m = tl.load(M_PTR)
        w = tl.load(M_PTR + 1)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        # A full block: no mask, so the accesses vectorise.
        t = tl.load(t_ptr + offs).to(tl.float32)
        s = tl.load(s_ptr + offs).to(tl.float32)
        tl.store(t_ptr + offs, (t * m + s * w).to(T_REF.dtype.element_ty))
    else:
        mask = offs < n
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(t_ptr + offs, (t * m + s * w).to(T_REF.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launcher

_BLOCK = 4096
_NUM_WARPS = 8


def ema_config(teacher_dtype: torch.dtype, student_dtype: torch.dtype) -> dict:
    """Block, warps and alignment hints of a dtype pair.

    16 elements a thread, whatever the dtypes: twice that for 16-bit pairs doubles the
    registers (~120 on sm_90, half the resident warps) for no more bytes in flight per SM.
    Both sides get the same elements per vector access (16 bytes of the wider dtype, so
    8 bytes of a 16-bit one paired with fp32): one register layout for teacher and student,
    where 16 bytes on each side make the compiler shuffle the student through shared memory.
    """
    vec = 16 // max(teacher_dtype.itemsize, student_dtype.itemsize)
    # No FMA: m * t and (1 - m) * s rounded apart, as the authors' mul_ then add_, or an fp32
    # teacher is off by many ulps where the two terms nearly cancel.
    return dict(BLOCK=_BLOCK, T_ALIGN=vec * teacher_dtype.itemsize, S_ALIGN=vec * student_dtype.itemsize,
                num_warps=_NUM_WARPS, num_stages=1, enable_fp_fusion=False)


class MultiTensorEma:
    """The device tables of one (teacher dtype, student dtype) group, built once.

    ``teacher`` and ``student`` are equally long lists of tensors of one dtype each,
    all on one device, pairwise of equal numel, dense with matching strides, and
    with no two teacher tensors overlapping: the caller checks all of this. The
    object holds addresses, not tensors: calling it is only valid while those
    tensors are alive and unmoved. ``__call__(momentum)`` launches one kernel.
    """

    def __init__(self, teacher: list[torch.Tensor], student: list[torch.Tensor]):
        self.teacher_dtype, self.student_dtype = teacher[0].dtype, student[0].dtype
        self.device = teacher[0].device
        self.config = cfg = ema_config(self.teacher_dtype, self.student_dtype)
        numels = [t.numel() for t in teacher]
        blocks = [triton.cdiv(n, cfg["BLOCK"]) for n in numels]
        first = [0, *itertools.accumulate(blocks)][:-1]
        rows = [(t.data_ptr(), s.data_ptr(), n, f)
                for t, s, n, f in zip(teacher, student, numels, first, strict=True)]
        self.n_blocks = sum(blocks)
        # Views at odd offsets (rare for parameters) lose the alignment hint, not correctness.
        self.aligned = all(a % cfg["T_ALIGN"] == 0 and b % cfg["S_ALIGN"] == 0 for a, b, n, _ in rows if n)
        self.table = torch.tensor(rows, dtype=torch.int64).to(self.device)
        self.block_tensor = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32),
                                                    torch.tensor(blocks, dtype=torch.int64)).to(self.device)
        # One-element tensors that give the kernel its pointee types; m_unused stands in for the
        # momentum tensor when the momentum is a float (never read then).
        self.t_ref = torch.empty(1, dtype=self.teacher_dtype, device=self.device)
        self.s_ref = torch.empty(1, dtype=self.student_dtype, device=self.device)
        self.m_unused = torch.zeros((), dtype=torch.float32, device=self.device)

    def __call__(self, momentum: float | torch.Tensor) -> None:
        """One launch. ``momentum``: a float, or a 0-dim floating tensor on the device that the
        kernel reads (no host sync; a captured CUDA graph follows its later values)."""
        if self.n_blocks == 0:
            return
        if isinstance(momentum, torch.Tensor) and momentum.dtype == torch.float32:
            m_ptr, m, w, load_m = momentum, 0.0, 0.0, 1
        elif isinstance(momentum, torch.Tensor):
            # m and 1 - m in the momentum's dtype, as fp32, as the authors' mul_(m) and (1 - m) * s
            # take them (a few more kernels, captured with the update).
            m_ptr, m, w, load_m = torch.stack((momentum.float(), (1 - momentum).float())), 0.0, 0.0, 2
        else:
            # 1 - m in double, rounded once: what ``(1 - m) * student`` does in PyTorch.
            m_ptr, m, w, load_m = self.m_unused, float(momentum), 1.0 - float(momentum), 0
        cfg = self.config
        t_align, s_align = (cfg["T_ALIGN"], cfg["S_ALIGN"]) if self.aligned else (0, 0)
        ctx = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            launch(_ema_kernel, (self.n_blocks,),
                   T_REF=self.t_ref, S_REF=self.s_ref, TABLE=self.table, BLOCK_TENSOR=self.block_tensor, M_PTR=m_ptr,
                   m=m, w=w, LOAD_M=load_m, T_ALIGN=t_align, S_ALIGN=s_align, BLOCK=cfg["BLOCK"],
                   **launch_options(cfg))

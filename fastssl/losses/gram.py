r"""Gram anchoring (DINOv3): the MSE between the student's and the Gram teacher's patch-similarity
matrices, fused so that neither matrix exists.

Siméoni et al. 2025, "DINOv3", https://arxiv.org/abs/2508.10104, section 4 (facebookresearch/
dinov3, ``dinov3/loss/gram_loss.py``). With the patch features of the student X and of the
Gram teacher Y (each row L2-normalised with ``apply_norm``), the loss is

    mean( (X X^T - Y Y^T)^2 )      per image ([B, N, N]) or over the batch's B N patches ([BN, BN])

with the authors' removal of negative similarities first: ``remove_neg`` zeroes the negative
entries of both matrices; ``remove_only_teacher_neg`` zeroes the teacher's, then the student's
where the student's *and the already zeroed teacher's* are negative, which no entry is: in
effect only the teacher's negative similarities are removed (as their code runs).

The authors build both matrices in fp32: at N = 4,096 patches that is 2 x 64 MiB per image,
and at batch level (B N)^2 entries. The Triton kernels (``fastssl.kernels.gram``) compute the
two similarity tiles and their squared difference tile by tile, over the tiles (I, J >= I)
only (the matrices are symmetric), and the backward recomputes them: memory O(B N d).

Layers: the kernels, the ``fastssl::gram_forward`` / ``_backward`` custom ops with autograd and
fake implementations, the plain PyTorch path, the functional :func:`gram_loss` and the drop-in
:class:`GramLoss` (``fastssl.dinov3.GramLoss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._backend import BACKENDS, resolve_backend
from .normalize import normalize_rows

__all__ = ["GramLoss", "gram_loss"]

_NORM_EPS = 1e-12  # F.normalize's default, as the authors call it


# ----------------------------------------------------------------------------- checks

def _check_feats(op: str, output_feats, target_feats, img_level: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate; return both as ``[G, N, d]`` (G = B at image level, 1 at batch level)."""
    for name, x in (("output_feats", output_feats), ("target_feats", target_feats)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got dtype {x.dtype}")
        if img_level and x.dim() != 3:
            raise ValueError(f"{op}: with img_level=True {name} must be [B, N, dim] patch features, got shape "
                             f"{tuple(x.shape)}")
        if x.dim() not in (2, 3):
            raise ValueError(f"{op}: {name} must be [B, N, dim] or [B * N, dim] patch features, got shape "
                             f"{tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{op}: {name} {tuple(x.shape)} is empty (no patch or no feature)")
    shapes = f"output_feats {tuple(output_feats.shape)}, target_feats {tuple(target_feats.shape)}"
    if output_feats.device != target_feats.device:
        raise ValueError(f"{op}: output_feats are on {output_feats.device} but target_feats on "
                         f"{target_feats.device}")
    if img_level:
        if output_feats.shape[:2] != target_feats.shape[:2]:
            raise ValueError(f"{op}: the student's and the teacher's [B, N] differ: {shapes}")
        return output_feats, target_feats
    a = output_feats.reshape(1, -1, output_feats.shape[-1])
    b = target_feats.reshape(1, -1, target_feats.shape[-1])
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{op}: at batch level the student has {a.shape[1]} patches but the teacher "
                         f"{b.shape[1]}: {shapes}")
    return a, b


def _check_flags(op: str, remove_neg: bool, remove_only_teacher_neg: bool) -> None:
    if remove_neg and remove_only_teacher_neg:
        raise ValueError(f"{op}: remove_neg and remove_only_teacher_neg are exclusive (the authors assert it), "
                         "got both True")


# ----------------------------------------------------------------------------- PyTorch path

def _gram_torch(a: torch.Tensor, b: torch.Tensor, apply_norm: bool, remove_student: bool,
                remove_teacher: bool) -> torch.Tensor:
    """The authors' computation on ``[G, N, d]`` rows in fp32 (fp64 too, as the kernels), the rows
    normalised without fp32's overflow (:func:`~fastssl.losses.normalize.normalize_rows`);
    autograd gives the gradient. Its matmuls follow PyTorch's TF32 settings (on a GPU with
    ``torch.backends.cuda.matmul.allow_tf32`` they are TF32 products, as the authors')."""
    with torch.autocast(a.device.type, enabled=False):
        a, b = a.float(), b.float()
        if apply_norm:
            a, b = normalize_rows(a, _NORM_EPS), normalize_rows(b, _NORM_EPS)
        s = torch.matmul(a, a.transpose(-1, -2))
        t = torch.matmul(b, b.transpose(-1, -2))
        if remove_teacher:
            t = torch.where(t < 0, 0.0, t)
        if remove_student:
            s = torch.where(s < 0, 0.0, s)
        return F.mse_loss(s, t)


# ----------------------------------------------------------------------------- Triton path (custom ops)

@torch.library.custom_op("fastssl::gram_forward", mutates_args=())
def _forward_op(student: torch.Tensor, teacher: torch.Tensor, apply_norm: bool, remove_student: bool,
                remove_teacher: bool, allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.gram import gram_forward

    return gram_forward(student, teacher, apply_norm, remove_student, remove_teacher, allow_tf32)


@_forward_op.register_fake
def _(student, teacher, apply_norm, remove_student, remove_teacher, allow_tf32):
    f32 = dict(dtype=torch.float32, device=student.device)
    factors = (2, student.shape[0] * student.shape[1]) if apply_norm else (0,)
    return torch.empty((), **f32), torch.empty(factors, **f32), torch.empty(factors, **f32)


@torch.library.custom_op("fastssl::gram_backward", mutates_args=())
def _backward_op(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                 factors_student: torch.Tensor, factors_teacher: torch.Tensor, apply_norm: bool, remove_student: bool,
                 remove_teacher: bool, allow_tf32: bool, need_student: bool, need_teacher: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.gram import gram_backward

    return gram_backward(grad_loss, student, teacher, factors_student, factors_teacher, apply_norm, remove_student,
                         remove_teacher, allow_tf32, need_student, need_teacher)


@_backward_op.register_fake
def _(grad_loss, student, teacher, factors_student, factors_teacher, apply_norm, remove_student, remove_teacher,
      allow_tf32, need_student, need_teacher):
    def grad_of(x, needed):
        return torch.empty(x.shape if needed else (0,), dtype=x.dtype, device=x.device)

    return grad_of(student, need_student), grad_of(teacher, need_teacher)


def _setup_context(ctx, inputs, output):
    student, teacher, *flags = inputs
    _, factors_student, factors_teacher = output
    ctx.mark_non_differentiable(factors_student, factors_teacher)
    ctx.save_for_backward(student, teacher, factors_student, factors_teacher)
    ctx.flags = flags


def _backward(ctx, grad_loss, _grad_factors_student, _grad_factors_teacher):
    student, teacher, factors_student, factors_teacher = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ds = dt = None
    if need_s or need_t:
        ds, dt = _backward_op(grad_loss, student, teacher, factors_student, factors_teacher, *ctx.flags, need_s, need_t)
    return (ds if need_s else None), (dt if need_t else None), None, None, None, None


torch.library.register_autograd("fastssl::gram_forward", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- functional API

def gram_loss(output_feats: torch.Tensor, target_feats: torch.Tensor, *, img_level: bool = True,
              apply_norm: bool = True, remove_neg: bool = True, remove_only_teacher_neg: bool = False,
              allow_tf32: bool = False, backend: str = "auto") -> torch.Tensor:
    """DINOv3's Gram anchoring loss: the MSE between the student's and the teacher's patch
    similarity matrices, without either matrix (see the module docstring).

    Args:
        output_feats: the student's patch features ``[B, N, d_s]``, or (``img_level=False``)
            ``[B * N, d_s]``; any float dtype, the gradient comes back in it.
        target_feats: the Gram teacher's ``[B, N, d_t]`` (or ``[B * N, d_t]``); usually without
            gradient, but one flows to it if it requires one (as through the authors' code).
        img_level: one ``[N, N]`` matrix per image (True), or one ``[B N, B N]`` matrix over the
            batch's patches (False).
        apply_norm: L2-normalise each patch feature first (``F.normalize``, eps 1e-12).
        remove_neg: zero the negative similarities of both matrices.
        remove_only_teacher_neg: zero only the teacher's negative similarities (exclusive with
            ``remove_neg``).
        allow_tf32: the Triton kernels multiply fp32 features as TF32 (about 10 bits, ~5e-4
            relative on each similarity) instead of three TF32 products (about fp32's
            accuracy). 16-bit features are exact products either way. The PyTorch path's
            matmuls follow PyTorch's own TF32 settings instead.
        backend: ``"auto"`` (Triton kernels on CUDA, PyTorch elsewhere), ``"torch"`` or
            ``"triton"``.

    Returns:
        The float32 scalar loss. Math is fp32 (fp64 features are computed in fp32, about 1e-7
        relative to float64): the authors' numbers to about 1e-6 relative. The rows are scaled
        by powers of two before their norms and products, so that features beyond ~1e19 (whose
        fp32 squares overflow: the authors' ``F.normalize`` gives zeros) are normalised too;
        fp64 features beyond fp32's range (3.4e38) are not.

    >>> import torch
    >>> from fastssl.functional import gram_loss
    >>> student, teacher = torch.randn(2, 196, 384, requires_grad=True), torch.randn(2, 196, 384)
    >>> loss = gram_loss(student, teacher, img_level=False, remove_neg=False)
    >>> loss.backward()
    >>> student.grad.shape
    torch.Size([2, 196, 384])
    """
    _check_flags("gram_loss", remove_neg, remove_only_teacher_neg)
    a, b = _check_feats("gram_loss", output_feats, target_feats, img_level)
    remove_student, remove_teacher = bool(remove_neg), bool(remove_neg or remove_only_teacher_neg)
    if resolve_backend(backend, a.device, "gram_loss") == "torch":
        return _gram_torch(a, b, bool(apply_norm), remove_student, remove_teacher)
    loss, _, _ = _forward_op(a, b, bool(apply_norm), remove_student, remove_teacher, bool(allow_tf32))
    return loss


class GramLoss(nn.Module):
    """Drop-in for DINOv3's ``GramLoss`` (``dinov3/loss/gram_loss.py``), fused: no ``[B, N, N]`` or
    ``[B N, B N]`` similarity matrix exists, forward or backward.

    ``GramLoss(apply_norm=True, img_level=True, remove_neg=True, remove_only_teacher_neg=False)``
    and ``forward(output_feats, target_feats, img_level=True)`` as the authors': as in their
    code, the constructor's ``img_level`` is stored and not used, the forward's argument
    decides. With ``remove_only_teacher_neg`` their student mask tests the teacher matrix after
    its negatives were zeroed, so only the teacher's negative similarities are removed; this
    does the same. Shapes and precision as :func:`fastssl.functional.gram_loss`; no state.

    >>> import torch
    >>> from fastssl.dinov3 import GramLoss
    >>> loss_fn = GramLoss(remove_neg=False)
    >>> student, teacher = torch.randn(2, 196, 384), torch.randn(2, 196, 384)
    >>> loss = loss_fn(student, teacher, img_level=True)   # per image: [2, 196, 196] never built
    >>> bool(loss > 0)
    True
    """

    def __init__(self, apply_norm: bool = True, img_level: bool = True, remove_neg: bool = True,
                 remove_only_teacher_neg: bool = False, *, allow_tf32: bool = False, backend: str = "auto"):
        super().__init__()
        _check_flags("GramLoss", remove_neg, remove_only_teacher_neg)
        if backend not in BACKENDS:
            raise ValueError(f"GramLoss: backend must be one of {BACKENDS}, got {backend!r}")
        self.apply_norm = apply_norm
        self.img_level = img_level
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg
        self.allow_tf32 = allow_tf32
        self.backend = backend

    def forward(self, output_feats: torch.Tensor, target_feats: torch.Tensor, img_level: bool = True) -> torch.Tensor:
        return gram_loss(output_feats, target_feats, img_level=img_level, apply_norm=self.apply_norm,
                         remove_neg=self.remove_neg, remove_only_teacher_neg=self.remove_only_teacher_neg,
                         allow_tf32=self.allow_tf32, backend=self.backend)

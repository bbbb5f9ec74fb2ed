r"""PAWS: soft nearest neighbours against a labelled support set, and the PAWS loss, fused.

Assran et al. 2021, "Semi-Supervised Learning of Visual Features by Non-Parametrically
Predicting View Assignments with Support Samples", https://arxiv.org/abs/2104.13963
(``init_paws_loss`` of the authors' facebookresearch/suncet, src/losses.py).

Each unlabelled view is classified by soft nearest neighbours against the supports,

    snn(q, S, Y) = softmax( normalize(q) @ normalize(S).T / tau ) @ Y        [N, C]

which has the shape of attention (queries q, keys S, values Y): the Triton kernels
(``fastssl.kernels.snn``) compute it and its gradient to q and S like flash attention,
in O(N * C + M * d) memory: the similarities are never stored whole (the backward writes
their gradient in chunks of supports no larger than the supports' gradient). Labels are
a dense ``[M, C]`` matrix (soft labels, as the authors' ``make_labels_matrix`` builds) or
integer class ids ``[M]`` with ``num_classes`` and ``smoothing`` (then no ``[M, C]`` matrix
exists anywhere).

The loss then acts on ``[N, C]`` tensors in PyTorch: the targets are the sharpened
predictions of the two global target views (``p**(1/T)`` renormalised; each multi-crop
view's target the mean of the two), entries under 1e-4 zeroed, no gradient; the loss is
their cross-entropy with the anchor predictions, mean over anchor rows, plus the
mean-entropy-maximisation regulariser ``sum(avg * log(avg))`` of the mean sharpened
anchor prediction, all-reduced over ranks.

Layers, from the bottom: the kernels, the ``fastssl::snn_forward`` / ``_backward`` custom
ops with their autograd and fake implementations (so ``torch.compile`` traces through),
the plain PyTorch path beside them, the functional :func:`snn` and :func:`paws_loss`,
the authors' closure :func:`init_paws_loss`, and the :class:`PawsLoss` module.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed
from .._backend import BACKENDS, resolve_backend

__all__ = ["PawsLoss", "init_paws_loss", "paws_loss", "sharpen", "snn"]

TARGET_FLOOR = 1e-4  # the authors zero target entries under this, "for numerical stability"


# ----------------------------------------------------------------------------- checks

def _check_embeddings(op: str, **tensors: torch.Tensor) -> int:
    """2-D floating tensors with rows, one embedding width and one device; return the width."""
    dims, devices = {}, {}
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"{op}: {name} must be a non-empty 2-D [rows, d] tensor, got {tuple(x.shape)}")
        dims[name], devices[name] = x.shape[1], x.device
    if len(set(dims.values())) > 1:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items())
        raise ValueError(f"{op}: embedding dims differ: {shapes}")
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{n} on {dev}" for n, dev in devices.items())
        raise ValueError(f"{op}: tensors are on different devices: {where}")
    return next(iter(dims.values()))


def _check_labels(op: str, labels: torch.Tensor, supports: torch.Tensor, rows: tuple[int, ...],
                  num_classes: int | None, smoothing: float, name: str) -> tuple[bool, int]:
    """Validate the labels of ``supports``; return (dense, number of classes).

    ``rows`` are the accepted row counts (the supports' own, and with gathering the
    gathered count).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.device != supports.device:
        raise ValueError(f"{op}: {name} is on {labels.device} but the supports are on {supports.device}")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"{op}: smoothing must lie in [0, 1], got {smoothing}")
    expect = " or ".join(str(r) for r in rows)
    if labels.is_floating_point():
        if labels.dim() != 2:
            raise ValueError(f"{op}: dense {name} must be [M, C], got {tuple(labels.shape)}")
        if labels.shape[0] not in rows:
            raise ValueError(f"{op}: {name} {tuple(labels.shape)} has {labels.shape[0]} rows but the supports "
                             f"{tuple(supports.shape)} need {expect} (support and label rows differ)")
        C = labels.shape[1]
        if C == 0:
            raise ValueError(f"{op}: dense {name} {tuple(labels.shape)} has no class columns")
        if num_classes is not None and num_classes != C:
            raise ValueError(f"{op}: num_classes={num_classes} but dense {name} {tuple(labels.shape)} has {C} columns")
        if smoothing != 0.0:
            raise ValueError(f"{op}: smoothing={smoothing} applies to integer class ids; dense {name} carry "
                             "their own smoothing (e.g. make_labels_matrix(..., smoothing=))")
        return True, C
    if labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{op}: {name} must be floating [M, C] or integer class ids [M], got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{op}: integer {name} must be class ids [M], got {tuple(labels.shape)}")
    if labels.shape[0] not in rows:
        raise ValueError(f"{op}: {name} {tuple(labels.shape)} has {labels.shape[0]} entries but the supports "
                         f"{tuple(supports.shape)} need {expect} (support and label rows differ)")
    if num_classes is None:
        raise ValueError(f"{op}: integer class ids need num_classes= (the width of the predictions)")
    num_classes = operator.index(num_classes)
    if num_classes < 1:
        raise ValueError(f"{op}: num_classes must be positive, got {num_classes}")
    # A data-dependent check (a device sync); torch.compile traces without it.
    if not torch.compiler.is_compiling():
        lo, hi = _id_range(labels)
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{op}: {name} hold class ids in [{lo}, {hi}], outside [0, num_classes={num_classes})")
    return False, num_classes


def _kept_on(labels: torch.Tensor, name: str, compute, *args):
    """``compute(labels, *args)``, kept on the tensor (attribute ``name``) with its address, version
    counter (which every in-place write bumps, through views too) and ``args``, so that a loop that
    reuses its support labels (the trainer does) computes it, and syncs with the device for it, once.
    Writes that bypass the version counter (``.data``, numpy or DLPack aliases) go unseen, as they do
    for autograd. Inference tensors have no version counter: computed every time."""
    if labels.is_inference():
        return compute(labels, *args)
    key = (labels.data_ptr(), labels._version, *args)
    seen = getattr(labels, name, None)
    if seen is None or seen[0] != key:
        seen = (key, compute(labels, *args))
        setattr(labels, name, seen)
    return seen[1]


def _id_range(labels: torch.Tensor) -> tuple[int, int]:
    """The least and greatest class id, read from the device once per tensor and content."""
    return _kept_on(labels, "_fastssl_id_range", lambda ids: tuple(torch.stack(torch.aminmax(ids)).tolist()))


def _balanced_class_order(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An order of the supports that cycles through the classes (the first support of every class in
    class order, then the second, ...; stable), and its inverse, when each of the ``num_classes``
    classes has as many supports (a class-balanced support set, as PAWS samples them); else None.
    Once per tensor and content, as :func:`_id_range`.

    In that order the PyTorch path's class sums are a sum over the middle dimension of the [N, M]
    similarities viewed as [N, M / C, C], and its backward a broadcast over it, instead of a scatter
    and a gather along the columns (on a CPU several times a copy's cost per element; summing classes
    contiguous in memory instead is twice as slow again); the price is reordering [M, d] rows twice
    (index_select both ways: index_copy_ costs three times as much), so :func:`_snn_torch` asks for it
    where d <= N (snn fwd+bwd on 2 CPU cores, N=128, M=1024, C=64: 5-10% faster at d=64, 3% at d=128;
    7-11% slower at d=256 in fp32, 1-2% in bf16), and on a CPU only (elsewhere finding it would sync
    with the device). Not under torch.compile, which traces the scatter (no data-dependent branch).
    """
    def compute(ids, C):
        counts = torch.bincount(ids, minlength=C)  # ids already checked to lie in [0, C)
        if not bool((counts == counts[0]).all()):
            return None
        order = torch.argsort(ids, stable=True).view(C, -1).T.reshape(-1)
        return order, torch.argsort(order)

    return None if torch.compiler.is_compiling() else _kept_on(labels, "_fastssl_class_order", compute, num_classes)


# ----------------------------------------------------------------------------- distributed

class _AllGather(torch.autograd.Function):
    """Concatenate every rank's rows; the backward sums the gradient over ranks and returns this
    rank's slice (each rank's loss depends on every rank's supports), as the authors' AllGather."""

    @staticmethod
    def forward(ctx, x):
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


class _AllReduceMean(torch.autograd.Function):
    """Mean over ranks; the backward passes the gradient through unchanged, as the authors'
    AllReduce (with DDP averaging the parameter gradients this is the single-process gradient)."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous() / dist.get_world_size()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def _gathering() -> bool:
    return distributed.world_size() > 1


@torch.no_grad()
def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


# ----------------------------------------------------------------------------- PyTorch path

_EPS = 1e-12  # F.normalize's


def _unit_rows(x: torch.Tensor, scale: float, low: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x / max(|x|, eps) * scale in the dtype low, 1 / max(|x|, eps), |x|)`` row by row, the norms
    and the product in fp32, rounded once to ``low`` (one fp32 copy of 16-bit rows: mixed-dtype ops,
    and vector_norm's dtype=, copy them on every op instead)."""
    xf = x.float()
    norm = torch.linalg.vector_norm(xf, dim=1, keepdim=True)
    inv = norm.clamp_min(_EPS).reciprocal_()
    factor = inv * scale if scale != 1.0 else inv
    if low != torch.float32:
        return torch.mul(xf, factor, out=torch.empty_like(xf, dtype=low)), inv, norm
    return (xf * factor if xf is x else xf.mul_(factor)), inv, norm


def _unit_rows_backward(grad: torch.Tensor, x: torch.Tensor, inv: torch.Tensor, norm: torch.Tensor,
                        proj: torch.Tensor, scale: float) -> torch.Tensor:
    """The gradient to ``x`` of ``x^ = x / max(|x|, eps)``, given ``grad * scale``, the gradient to
    ``x^`` (``grad`` a fresh tensor, updated in place), and ``proj = <x^, grad * scale>`` per row:
    ``(grad * scale - x^ proj) / |x| = grad * scale / |x| - x * proj / |x|^2``; below eps the norm
    is the constant eps, so no projection. Where ``grad`` has x's dtype (fp32 and bf16 rows) two
    in-place ops on it, in that dtype (no copy of a [rows, d] tensor: on a CPU those are what cost);
    otherwise (fp16 and fp64 rows, whose products ran in fp32, and the fp32 rows of a pair with bf16
    ones, whose gradient came in bf16) in fp32, then x's dtype."""
    proj = proj.unsqueeze(1).masked_fill_(norm < _EPS, 0.0)
    if grad.dtype == x.dtype:
        return grad.mul_((inv * scale).to(x.dtype)).addcmul_(x, (proj * inv * inv).to(x.dtype), value=-1.0)
    return grad.float().mul_(inv * scale).addcmul_(x.float(), proj * inv * inv, value=-1.0).to(x.dtype)


class _SnnTorch(torch.autograd.Function):
    """The definition in plain PyTorch with a hand-written backward: fewer and lighter passes than
    autograd's (1 / tau folded into the query rows, the softmax's backward in one pass or through
    ``<g, probs>`` per row, both normalisations' projections from one N x M product, their
    backwards in place), so that it is at least the authors' speed in every dtype.

    Precision: fp32 (and fp16) inputs in fp32 throughout. bf16 inputs multiply in bf16 with fp32
    accumulation, as the authors' autocast does: the similarities, the products with dense labels
    Y and the backward's products are rounded to bf16; the softmax and its backward are computed in
    fp32 and, with dense labels, rounded to bf16 (what autocast's cast before the product gives; the
    backward uses the rounded probabilities); class ids' sums, the norms and the sums of the
    normalisations' projections are fp32 (with dense labels, of bf16 products), the normalisations'
    last backward steps bf16 (the gradients' dtype). Results land about two thirds as far from
    float64 as the authors' own bf16 formulation (a PAWS loss gradient ~1e-2 against their ~2e-2).
    Materialises the N x M similarities (as the authors do)."""

    @staticmethod
    def forward(ctx, query, supports, labels, tau, num_classes, smoothing, order, restore):
        low = torch.bfloat16 if torch.bfloat16 in (query.dtype, supports.dtype) else torch.float32
        if order is not None:  # class ids of a balanced support set: the supports cycling through the classes
            supports = supports.index_select(0, order)
        q_tau, q_inv, q_norm = _unit_rows(query, 1.0 / tau, low)
        s_low, s_inv, s_norm = _unit_rows(supports, 1.0, low)
        logits = q_tau @ s_low.T  # bf16 products with fp32 accumulation for bf16 rows, as autocast
        if labels.is_floating_point():
            # The softmax in fp32, its output rounded to the products' dtype: what autocast's cast of an
            # fp32 softmax before the product gives, without an fp32 copy of the similarities and one back.
            a = torch.softmax(logits, dim=1)
            y = labels.to(low)  # kept for the backward in the products' dtype: one copy of [M, C] at most
            raw = (a @ y).float()  # a product in the authors' autocast precision
        else:
            a = torch.softmax(logits, dim=1, dtype=torch.float32)
            y = None
            if order is not None:  # columns cycling through the classes
                raw = a.view(a.shape[0], -1, num_classes).sum(1)
            else:  # by an index_add over the columns: no [M, C] matrix
                raw = a.new_zeros(a.shape[0], num_classes).index_add_(1, labels, a)
        ctx.save_for_backward(query, supports, q_inv, s_inv, q_norm, s_norm, q_tau, s_low, logits, a, labels, raw, y,
                              restore)
        ctx.tau, ctx.smoothing, ctx.low = tau, smoothing, low
        return raw * (1.0 - smoothing) + smoothing / num_classes if smoothing else raw

    @staticmethod
    def backward(ctx, grad):
        query, supports, q_inv, s_inv, q_norm, s_norm, q_tau, s_low, logits, a, labels, raw, y, restore = \
            ctx.saved_tensors
        need_q, need_s = ctx.needs_input_grad[:2]
        if not (need_q or need_s):
            return None, None, None, None, None, None, None, None
        low = ctx.low  # the products' dtype
        if ctx.smoothing:  # the smoothing's constant adds the same to every column: the softmax drops it
            grad = grad * (1.0 - ctx.smoothing)
        # d/dA = grad @ Y^T; the softmax's backward subtracts <A_i, d/dA_i> = <grad_i, probs_i> and
        # multiplies by A. On a CPU every N x M pass counts (and every temporary, whose pages fault
        # in again when the allocator had returned them), so:
        if y is not None:
            # one fused pass in the probabilities' dtype (fp32 inside, rounded once to the products'
            # input), then the similarities' products in that dtype, summed in fp32 below;
            dl = torch._softmax_backward_data(grad.to(low) @ y.T, a, 1, a.dtype)
            dl_l = dl * logits
        else:
            # class ids: gathered from grad - <grad_i, probs_i> with a broadcast index, in fp32 (the
            # probabilities' dtype), rounded to the products' dtype after the similarities' products.
            r = torch.linalg.vecdot(grad, raw, dim=1).unsqueeze(1)
            if restore is not None:  # columns cycling through the classes
                dl = (a.view(a.shape[0], -1, grad.shape[1]) * (grad - r).unsqueeze(1)).view(a.shape)
            else:
                dl = torch.gather(grad - r, 1, labels.expand(grad.shape[0], -1)).mul_(a)
            if dl.dtype == low:  # fp32 products: dl itself goes into them
                dl_l = dl * logits
            else:
                dl, dl_l = dl.to(low), dl.mul_(logits)
        # The normalisations' projections <x^, d/dx^> from the similarities: for a support
        # sum_i dl_ij l_ij, for a query the same over j (1 / tau cancels).
        dq = ds = None
        if need_q:  # the similarities are q_tau . s^, q_tau = q^ / tau
            proj = dl_l.sum(1, dtype=torch.float32)
            dq = _unit_rows_backward(dl @ s_low, query, q_inv, q_norm, proj, 1.0 / ctx.tau)
        if need_s:
            proj = dl_l.sum(0, dtype=torch.float32)
            ds = _unit_rows_backward(dl.T @ q_tau, supports, s_inv, s_norm, proj, 1.0)
            if restore is not None:  # back to the caller's order
                ds = ds.index_select(0, restore)
        return dq, ds, None, None, None, None, None, None


def _snn_torch(query, supports, labels, tau, num_classes, smoothing):
    """snn in plain PyTorch (see :class:`_SnnTorch`); autocast off, so the precision is its own."""
    order = restore = None
    if not labels.is_floating_point() and labels.device.type == "cpu" and query.shape[1] <= query.shape[0]:
        order, restore = _balanced_class_order(labels, num_classes) or (None, None)
    with torch.autocast(query.device.type, enabled=False):
        return _SnnTorch.apply(query, supports, labels, tau, num_classes, smoothing, order, restore)


# ----------------------------------------------------------------------------- Triton path (custom ops)

@torch.library.custom_op("fastssl::snn_forward", mutates_args=())
def _snn_forward_op(query: torch.Tensor, supports: torch.Tensor, labels: torch.Tensor, tau: float, num_classes: int,
                    smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.snn import snn_forward

    return snn_forward(query, supports, labels, tau, num_classes, smoothing)


@_snn_forward_op.register_fake
def _(query, supports, labels, tau, num_classes, smoothing):
    f32 = dict(dtype=torch.float32, device=query.device)
    N, M = query.shape[0], supports.shape[0]
    return (torch.empty(N, num_classes, **f32), torch.empty(N, **f32), torch.empty(N, **f32),
            torch.empty(M, **f32))


@torch.library.custom_op("fastssl::snn_backward", mutates_args=())
def _snn_backward_op(grad_probs: torch.Tensor, query: torch.Tensor, supports: torch.Tensor, labels: torch.Tensor,
                     probs: torch.Tensor, lse: torch.Tensor, inv_q: torch.Tensor, inv_s: torch.Tensor, tau: float,
                     num_classes: int, smoothing: float, need_query: bool, need_supports: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.snn import snn_backward

    return snn_backward(grad_probs, query, supports, labels, probs, lse, inv_q, inv_s, tau, num_classes, smoothing,
                        need_query, need_supports)


@_snn_backward_op.register_fake
def _(grad_probs, query, supports, labels, probs, lse, inv_q, inv_s, tau, num_classes, smoothing, need_query,
      need_supports):
    def grad_of(x, needed):
        return torch.empty(x.shape if needed else (0,), dtype=x.dtype, device=x.device)

    return grad_of(query, need_query), grad_of(supports, need_supports)


def _setup_context(ctx, inputs, output):
    query, supports, labels, tau, num_classes, smoothing = inputs
    probs, lse, inv_q, inv_s = output
    ctx.mark_non_differentiable(lse, inv_q, inv_s)
    ctx.save_for_backward(query, supports, labels, probs, lse, inv_q, inv_s)
    ctx.args = (tau, num_classes, smoothing)


def _backward(ctx, grad_probs, _grad_lse, _grad_inv_q, _grad_inv_s):
    query, supports, labels, probs, lse, inv_q, inv_s = ctx.saved_tensors
    need_q, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dq = ds = None
    if need_q or need_s:
        dq, ds = _snn_backward_op(grad_probs, query, supports, labels, probs, lse, inv_q, inv_s, *ctx.args,
                                  need_q, need_s)
    # No gradient to the labels (class assignments, not parameters).
    return (dq if need_q else None), (ds if need_s else None), None, None, None, None


torch.library.register_autograd("fastssl::snn_forward", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- functional API

def _prepare_snn(op: str, query, supports, labels, tau, num_classes, smoothing, gather_supports,
                 labels_name: str = "labels"):
    """Validate one snn call; return (labels ready for the op, number of classes, whether to gather)."""
    if not tau > 0:
        raise ValueError(f"{op}: tau must be positive, got {tau}")
    gather = gather_supports and _gathering()
    M = supports.shape[0]
    rows = (M, M * distributed.world_size()) if gather else (M,)
    dense, C = _check_labels(op, labels, supports, rows, num_classes, smoothing, labels_name)
    # (integer tensors never require grad: the caller's class ids stay the same tensor where they are
    # already int64 and contiguous, with what is kept on it, see _id_range)
    labels = labels.detach() if dense else labels.long().contiguous()
    return labels, C, gather


def _snn(query, supports, labels, tau, C, smoothing, gather, backend):
    """snn on validated inputs (see :func:`snn`)."""
    if gather:
        if labels.shape[0] == supports.shape[0]:
            labels = _all_gather_rows(labels)
        supports = _AllGather.apply(supports)
    if resolve_backend(backend, query.device, "snn") == "torch":
        return _snn_torch(query, supports, labels, tau, C, smoothing)
    if query.dtype != supports.dtype:
        dtype = torch.promote_types(query.dtype, supports.dtype)
        query, supports = query.to(dtype), supports.to(dtype)
    probs, _, _, _ = _snn_forward_op(query, supports, labels, tau, C, smoothing)
    return probs


def snn(query: torch.Tensor, supports: torch.Tensor, labels: torch.Tensor, tau: float, *,
        num_classes: int | None = None, smoothing: float = 0.0, gather_supports: bool = False,
        backend: str = "auto") -> torch.Tensor:
    """Soft nearest-neighbour class probabilities ``softmax(q^ @ S^.T / tau) @ Y``, fused.

    Args:
        query: ``[N, d]`` embeddings (fp32, fp16 or bf16), L2-normalised inside.
        supports: ``[M, d]`` labelled embeddings, L2-normalised inside.
        labels: dense ``[M, C]`` soft labels (e.g. the authors' ``make_labels_matrix``,
            smoothing included), or integer class ids ``[M]`` with ``num_classes``; then
            each support's label is ``(1 - smoothing) * onehot + smoothing / num_classes``
            and no ``[M, C]`` matrix is built. No gradient flows to the labels.
        tau: the temperature of the cosine similarities.
        num_classes, smoothing: for integer class ids (dense labels: ``num_classes`` may
            repeat their width, ``smoothing`` must be 0).
        gather_supports: under an initialised ``torch.distributed`` with several ranks,
            all-gather the supports first (rank order), as the authors do; the backward
            sums the supports' gradient over ranks and returns each rank its own slice.
            ``labels`` then cover the gathered supports (``world * M`` rows, as
            ``make_labels_matrix`` builds them) or this rank's ``M`` (then gathered too).
            Every rank must pass the same number of supports.
        backend: ``"auto"`` (Triton kernels on CUDA, PyTorch elsewhere), ``"torch"`` or
            ``"triton"``.

    Returns:
        float32 ``[N, C]`` probabilities (rows sum to the label rows' mass). Math is fp32
        for fp32 inputs; for 16-bit ones the kernels multiply in that dtype with fp32
        accumulation. The PyTorch path (CPU, MPS, ``backend="torch"``) computes fp16 inputs
        in fp32, and multiplies bf16 inputs in bf16 with fp32 accumulation as the authors'
        autocast does (the similarities and products rounded to bf16; softmax, class sums
        and norms in fp32). Gradients come back in the inputs' dtypes.
    """
    tau, smoothing = float(tau), float(smoothing)
    _check_embeddings("snn", query=query, supports=supports)
    labels, C, gather = _prepare_snn("snn", query, supports, labels, tau, num_classes, smoothing, gather_supports)
    return _snn(query, supports, labels, tau, C, smoothing, gather, backend)


def sharpen(p: torch.Tensor, T: float) -> torch.Tensor:
    """The authors' sharpening: ``p**(1/T)`` renormalised over each row."""
    sharp = p ** (1.0 / T)
    return sharp / sharp.sum(dim=1, keepdim=True)


_sharpen = sharpen  # paws_loss's arguments shadow the names


def _xlogx(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``t * log(p)``, 0 where ``t`` is 0: the value of the authors' ``log(p ** t)``. Unlike theirs
    (and ``xlogy``) the gradient there is 0, not NaN, when ``p`` is 0 too (a class without supports)."""
    return t * torch.log(torch.where(t > 0, p, torch.ones_like(p)))


def paws_loss(anchor_views: torch.Tensor, anchor_supports: torch.Tensor, anchor_support_labels: torch.Tensor,
              target_views: torch.Tensor, target_supports: torch.Tensor, target_support_labels: torch.Tensor, *,
              multicrop: int = 6, tau: float = 0.1, T: float = 0.25, me_max: bool = True,
              num_classes: int | None = None, smoothing: float = 0.0, gather_supports: bool = True,
              backend: str = "auto", sharpen: Callable | None = None, snn: Callable | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The PAWS loss with the authors' semantics: ``(loss, me_max_regulariser)``.

    Args:
        anchor_views: ``[(2 + multicrop) * B, d]``, view-major (the 2 global views, then
            the multi-crop views, B rows each).
        anchor_supports, anchor_support_labels: the supports scored against the anchors
            and their labels (see :func:`snn`); gradients flow to the anchors and these
            supports.
        target_views: ``[2 * B, d]`` embeddings of the two global views, in the order
            whose predictions become the targets of the anchor rows (the authors'
            training loop swaps the two views before the call); no gradient.
        target_supports, target_support_labels: likewise for the targets; no gradient.
        multicrop, tau, T, me_max: as the authors' ``init_paws_loss``.
        num_classes, smoothing: for integer class ids as labels.
        gather_supports: all-gather the supports across ranks (see :func:`snn`).
        backend: where the fused snn runs.
        sharpen, snn: replace the sharpening ``p -> p'`` or the classifier
            ``(query, supports, labels) -> probs``, as the authors' closure allows.

    Returns:
        float32 scalars: the cross-entropy mean over anchor rows, and
        ``sum(avg * log(avg))`` of the mean sharpened anchor prediction (all-reduced
        over ranks; zero when ``me_max`` is off).
    """
    op = "paws_loss"
    multicrop = operator.index(multicrop)
    tau, T, smoothing = float(tau), float(T), float(smoothing)
    if multicrop < 0:
        raise ValueError(f"{op}: multicrop must be >= 0, got {multicrop}")
    if not T > 0:
        raise ValueError(f"{op}: T must be positive, got {T}")
    _check_embeddings(op, anchor_views=anchor_views, anchor_supports=anchor_supports, target_views=target_views,
                      target_supports=target_supports)
    n_views = 2 + multicrop
    rows = anchor_views.shape[0]
    if rows % n_views:
        raise ValueError(f"{op}: anchor_views {tuple(anchor_views.shape)} has {rows} rows, not divisible by "
                         f"2 + multicrop = {n_views} (expected [(2 + multicrop) * B, d], view-major)")
    B = rows // n_views
    if target_views.shape[0] != 2 * B:
        raise ValueError(f"{op}: target_views {tuple(target_views.shape)} has {target_views.shape[0]} rows but "
                         f"anchor_views {tuple(anchor_views.shape)} with multicrop={multicrop} means B={B}, so "
                         f"2 * B = {2 * B} target rows (the 2 global views) were expected")

    if sharpen is None:
        def sharpen(p):
            return _sharpen(p, T)

    if snn is None:
        a_labels, C, gather = _prepare_snn(op, anchor_views, anchor_supports, anchor_support_labels, tau, num_classes,
                                           smoothing, gather_supports, "anchor_support_labels")
        t_labels, C_t, _ = _prepare_snn(op, target_views, target_supports, target_support_labels, tau, num_classes,
                                        smoothing, gather_supports, "target_support_labels")
        if C_t != C:
            raise ValueError(f"{op}: anchor_support_labels give {C} classes but target_support_labels {C_t}")

        def probs_of(query, supports, labels):
            return _snn(query, supports, labels, tau, C, smoothing, gather, backend)

        probs = probs_of(anchor_views, anchor_supports, a_labels)
        with torch.no_grad():
            target_probs = probs_of(target_views.detach(), target_supports.detach(), t_labels)
    else:
        probs = snn(anchor_views, anchor_supports, anchor_support_labels)
        with torch.no_grad():
            target_probs = snn(target_views, target_supports, target_support_labels)

    with torch.no_grad():
        targets = sharpen(target_probs)
        if multicrop > 0:
            mc_target = 0.5 * (targets[:B] + targets[B:])
            targets = torch.cat([targets, *[mc_target] * multicrop], dim=0)
        targets = torch.where(targets < TARGET_FLOOR, torch.zeros_like(targets), targets)
    loss = -_xlogx(targets, probs).sum(dim=1).mean()
    rloss = torch.zeros((), device=probs.device, dtype=probs.dtype)
    if me_max:
        avg_probs = torch.mean(sharpen(probs), dim=0)
        if _gathering():
            avg_probs = _AllReduceMean.apply(avg_probs)
        rloss = _xlogx(avg_probs, avg_probs).sum()
    return loss, rloss


def init_paws_loss(multicrop: int = 6, tau: float = 0.1, T: float = 0.25, me_max: bool = True, *,
                   num_classes: int | None = None, smoothing: float = 0.0, gather_supports: bool = True,
                   backend: str = "auto"):
    """Drop-in for the authors' ``init_paws_loss`` (suncet src/losses.py), fused.

    Returns ``loss(anchor_views, anchor_supports, anchor_support_labels, target_views,
    target_supports, target_support_labels, sharpen=..., snn=...) -> (loss, me_max_reg)``
    with the authors' semantics (see :func:`paws_loss`). The defaults of ``sharpen`` and
    ``snn`` are the closure's own (``snn(query, supports, labels)`` fused, supports
    all-gathered across ranks when ``gather_supports``); passing others replaces them.
    """
    multicrop = operator.index(multicrop)
    tau, T, smoothing = float(tau), float(T), float(smoothing)
    if multicrop < 0:
        raise ValueError(f"init_paws_loss: multicrop must be >= 0, got {multicrop}")
    if backend not in BACKENDS:
        raise ValueError(f"init_paws_loss: backend must be one of {BACKENDS}, got {backend!r}")
    if not tau > 0 or not T > 0:
        raise ValueError(f"init_paws_loss: tau and T must be positive, got tau={tau}, T={T}")
    options = dict(multicrop=multicrop, tau=tau, T=T, me_max=me_max, num_classes=num_classes, smoothing=smoothing,
                   gather_supports=gather_supports, backend=backend)

    def default_sharpen(p):
        return _sharpen(p, T)

    def default_snn(query, supports, labels):
        return snn(query, supports, labels, tau, num_classes=num_classes, smoothing=smoothing,
                   gather_supports=gather_supports, backend=backend)

    def loss(anchor_views, anchor_supports, anchor_support_labels, target_views, target_supports,
             target_support_labels, sharpen=default_sharpen, snn=default_snn):
        # The defaults take the fused path (validated once, labels named in errors).
        return paws_loss(anchor_views, anchor_supports, anchor_support_labels, target_views, target_supports,
                         target_support_labels, sharpen=None if sharpen is default_sharpen else sharpen,
                         snn=None if snn is default_snn else snn, **options)

    return loss


# ----------------------------------------------------------------------------- module

class PawsLoss(nn.Module):
    """The PAWS loss as an ``nn.Module``: ``forward(...)`` returns ``(loss, me_max_reg)``.

    Same arguments and semantics as :func:`init_paws_loss` / :func:`paws_loss`; no state.
    """

    def __init__(self, multicrop: int = 6, tau: float = 0.1, T: float = 0.25, me_max: bool = True, *,
                 num_classes: int | None = None, smoothing: float = 0.0, gather_supports: bool = True,
                 backend: str = "auto"):
        super().__init__()
        multicrop = operator.index(multicrop)
        if multicrop < 0:
            raise ValueError(f"PawsLoss: multicrop must be >= 0, got {multicrop}")
        if not float(tau) > 0 or not float(T) > 0:
            raise ValueError(f"PawsLoss: tau and T must be positive, got tau={tau}, T={T}")
        if not 0.0 <= float(smoothing) <= 1.0:
            raise ValueError(f"PawsLoss: smoothing must lie in [0, 1], got {smoothing}")
        if backend not in BACKENDS:
            raise ValueError(f"PawsLoss: backend must be one of {BACKENDS}, got {backend!r}")
        self.multicrop, self.tau, self.T, self.me_max = multicrop, float(tau), float(T), bool(me_max)
        self.num_classes, self.smoothing = num_classes, float(smoothing)
        self.gather_supports, self.backend = bool(gather_supports), backend

    def forward(self, anchor_views, anchor_supports, anchor_support_labels, target_views, target_supports,
                target_support_labels) -> tuple[torch.Tensor, torch.Tensor]:
        return paws_loss(anchor_views, anchor_supports, anchor_support_labels, target_views, target_supports,
                         target_support_labels, multicrop=self.multicrop, tau=self.tau, T=self.T,
                         me_max=self.me_max, num_classes=self.num_classes, smoothing=self.smoothing,
                         gather_supports=self.gather_supports, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"multicrop={self.multicrop}, tau={self.tau}, T={self.T}, me_max={self.me_max}, "
                f"num_classes={self.num_classes}, smoothing={self.smoothing}, "
                f"gather_supports={self.gather_supports}, backend={self.backend!r}")

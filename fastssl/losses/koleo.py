r"""KoLeo: the Kozachenko-Leonenko entropy regulariser of DINOv2 and DINOv3, with the authors' numbers.

Sablayrolles et al. 2018, "Spreading vectors for similarity search",
https://arxiv.org/abs/1806.03198; used on the student's pre-head CLS features by DINOv2
(Oquab et al. 2023, facebookresearch/dinov2 ``dinov2/loss/koleo_loss.py``) and DINOv3
(Siméoni et al. 2025, facebookresearch/dinov3 ``dinov3/loss/koleo_loss.py``). With
x^_i = x_i / max(|x_i|, eps) and, for each row, its nearest neighbour(s) n(i) by inner
product among the other rows of its neighbour set (the row itself excluded),

    loss = -mean_i log( || x^_i - x^_n(i) + 1e-8 ||_2 + eps )

The distance is the authors' ``nn.PairwiseDistance(2, eps=1e-8)``, the norm of the
difference *plus* 1e-8 in every coordinate: identical vectors are sqrt(d) 1e-8 apart, not
``sqrt(2 - 2 cos)`` = 0. ``KoLeoLossDistributed`` takes the neighbours from every rank's rows
(all-gathered, the gradient summed back to each rank), within groups of ``loss_group_size``
consecutive rows of the global batch, the ``topk`` nearest of each.

Ties between equally near neighbours go to the lowest index (as ``torch.max`` does; the
authors' ``torch.topk`` leaves the order of ties unspecified). The row itself is excluded
outright: the authors write -1 on the diagonal instead, which would pick the row itself if
every other inner product were -1 or less (antipodal rows only). A neighbour set of one row
has no neighbour: a ``ValueError`` (the authors' code returns -log(sqrt(d) 1e-8 + 1e-8)
with a zero gradient).

The search is the costly part, B x G x d multiply-adds; the rest is O(B k d). Backends:
``"torch"`` forms the ``[B, G]`` inner products of the normalised rows with a matmul (as the
authors; PyTorch's TF32 settings apply to it on a GPU); ``"triton"`` runs
``fastssl.kernels.koleo``, which keeps a running top k per row over tiles of the set and writes
only the ``[B, k]`` indices, multiplying the rows as they come (16-bit rows exactly on the
tensor cores, as the authors' bf16 matmul but with fp32 sums; fp32 rows as three TF32
products) and scaling by the inverse norms: fp32-accurate whatever the dtype and TF32
settings. Distances, loss and gradient are the same PyTorch code for both, autocast off. The
normalisation is fp32 whatever the input dtype (fp64 included), each row scaled by a power of
two before its norm (``fastssl.losses.normalize``), so that features beyond ~1e19, whose fp32
norm overflows (the authors' ``F.normalize`` gives zeros), are normalised too; fp64 features
beyond fp32's range are not. The B x topk distances, their log and gradient are float64, so
that the opposite gradients of rows that are each other's copies (~1e7 / B each) cancel, which
in fp32 (the authors') leaves an error of ~1e-2 in those rows' gradients. Across ranks the
rows are all-gathered in fp32 (the authors' normalised rows in the input's dtype) and their
gradient summed in fp32; each rank normalises its group's rows.
"""

from __future__ import annotations

import operator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import distributed
from .._backend import BACKENDS, resolve_backend
from .normalize import normalize_rows

__all__ = ["KoLeoLoss", "KoLeoLossDistributed", "koleo_loss"]

PDIST_EPS = 1e-8  # the authors' nn.PairwiseDistance(2, eps=1e-8)


# ----------------------------------------------------------------------------- checks

def _check_input(op: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: student_output must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: student_output must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"{op}: student_output must be [B, D] features, got shape {tuple(x.shape)}")


def _layout(op: str, local_b: int, world: int, rank: int, topk, loss_group_size) -> tuple[int, int, int]:
    """The neighbour set of this rank's rows: ``(first row of its group in the gathered batch,
    group size, offset of this rank's rows in the group)``, with the authors' errors."""
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"{op}: topk must be a positive integer, got {topk!r}")
    global_b = world * local_b
    size = global_b if loss_group_size is None else operator.index(loss_group_size)
    if size < 1:
        raise ValueError(f"{op}: loss_group_size must be positive, got {size}")
    # The authors' two checks and messages.
    if size % local_b != 0:
        raise ValueError(f"Loss group size size {size} must be a multiple of local batch size {local_b}.")
    if global_b % size != 0:
        raise ValueError(f"Global batch size {global_b} must be divisible by loss group size {size}.")
    if size == 1:
        where = f"a batch of 1 on each of {world} ranks" if world > 1 else "a batch of 1"
        raise ValueError(f"{op}: the neighbour set has one member ({where}, student_output [{local_b}, D]): a row "
                         "has no nearest neighbour other than itself (the authors' code returns -log of about 1e-7 "
                         "with a zero gradient)")
    if topk > size - 1:
        raise ValueError(f"{op}: topk={topk} neighbours need a neighbour set of at least {topk + 1} rows, it has "
                         f"{size} (loss_group_size={loss_group_size}, global batch {global_b})")
    ranks_per_group = world // (global_b // size)
    group, rank_in_group = rank // ranks_per_group, rank % ranks_per_group
    return group * size, size, rank_in_group * local_b


# ----------------------------------------------------------------------------- neighbour search

def _neighbours_torch(x: torch.Tensor, members: torch.Tensor, offset: int, k: int) -> torch.Tensor:
    """``[B, k]`` indices of the k largest ``x_i . members_j`` (j != offset + i), ties to the lowest j."""
    dots = x @ members.T
    dots.diagonal(offset).fill_(float("-inf"))
    if k == 1:
        return dots.argmax(dim=1, keepdim=True)  # the first of equal maxima (documented)
    # torch.topk orders ties arbitrarily: rank (value, -index) pairs as distinct int64 keys, the
    # value's bits made monotone (negative floats' magnitude bits reversed, -0.0 made +0.0).
    bits = (dots + 0.0).view(torch.int32)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64) * 2**32
    G = members.shape[0]
    key += torch.arange(G - 1, -1, -1, device=dots.device)
    return key.topk(k, dim=1).indices


@torch.library.custom_op("fastssl::koleo_neighbours", mutates_args=())
def _neighbours_op(members: torch.Tensor, offset: int, rows: int, k: int, eps: float) -> torch.Tensor:
    from ..kernels.koleo import nearest_neighbours

    return nearest_neighbours(members, offset, rows, k, eps)


@_neighbours_op.register_fake
def _(members, offset, rows, k, eps):
    return members.new_empty(rows, k, dtype=torch.int64)


_MAX_KERNEL_TOPK = 16  # fastssl.kernels.koleo.MAX_TOPK (not imported here: importing fastssl never imports triton)


@torch.no_grad()
def _neighbours(raw: torch.Tensor, normalised: torch.Tensor, offset: int, rows: int, k: int, eps: float,
                backend: str) -> torch.Tensor:
    """``[rows, k]`` neighbour indices of the set's rows ``offset ..`` among the set: ``raw`` its rows as
    the features come (the kernel's, which normalises them itself), ``normalised`` them normalised in fp32
    (PyTorch's search)."""
    if resolve_backend(backend, raw.device, "koleo_loss") == "triton" and k <= _MAX_KERNEL_TOPK:
        return _neighbours_op(raw, offset, rows, k, eps)
    return _neighbours_torch(normalised[offset:offset + rows], normalised, offset, k)


# ----------------------------------------------------------------------------- distributed

class _AllGather(torch.autograd.Function):
    """Every rank's rows in rank order; the backward sums the gradient over ranks and returns this
    rank's rows (``torch.distributed.nn.all_gather``'s semantics, which needs reduce_scatter, which
    gloo lacks)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


# ----------------------------------------------------------------------------- functional API

def koleo_loss(student_output: torch.Tensor, *, topk: int = 1, loss_group_size: int | None = None,
               gather: bool = False, eps: float = 1e-8, backend: str = "auto") -> torch.Tensor:
    """The KoLeo regulariser of ``[B, D]`` features, with the authors' numbers (module docstring).

    Args:
        student_output: ``[B, D]`` features (the student's pre-head CLS tokens), any float
            dtype; the gradient comes back in it.
        topk: neighbours per row (the authors' ``KoLeoLossDistributed``; ``KoLeoLoss`` has 1).
        loss_group_size: rows of the global batch per neighbour set (consecutive ranks' rows);
            None: the whole global batch. It must be a multiple of B and divide the global batch.
        gather: all-gather the rows of every rank of the default process group first, when one
            is initialised with several ranks (``KoLeoLossDistributed``); the gradient is summed
            back over ranks. Every rank must pass the same B.
        eps: of the normalisation and of the log, as the authors' ``forward(..., eps)``.
        backend: ``"auto"`` (the Triton search on CUDA, PyTorch elsewhere), ``"torch"`` or
            ``"triton"`` (the search; topk above 16 searches with PyTorch).

    Returns:
        The float32 scalar ``-mean log(distance + eps)`` over this rank's B x topk pairs.

    >>> import torch
    >>> from fastssl.functional import koleo_loss
    >>> x = torch.randn(64, 384, requires_grad=True)
    >>> loss = koleo_loss(x)
    >>> loss.backward()
    >>> same = torch.cat([x.detach()[:1], x.detach()[:1]])   # identical rows: sqrt(D) 1e-8 apart
    >>> expected = -torch.log(torch.tensor(384 ** 0.5 * 1e-8 + 1e-8))
    >>> bool(abs(koleo_loss(same) - expected) < 1e-5)
    True
    """
    _check_input("koleo_loss", student_output)
    world, rank = (distributed.world_size(), dist.get_rank()) if gather and distributed.is_initialized() else (1, 0)
    start, size, offset = _layout("koleo_loss", student_output.shape[0], world, rank, topk, loss_group_size)
    B = student_output.shape[0]
    with torch.autocast(student_output.device.type, enabled=False):
        # The rows are gathered as they come (in fp32), and each rank normalises its group's: the
        # all-gather's backward then sums fp32 gradients, and the search reads the rows in their dtype.
        x = student_output.float()
        group = (_AllGather.apply(x) if world > 1 else x)[start:start + size]
        normalised = normalize_rows(group, eps)
        raw = student_output.detach() if world == 1 else group.detach()
        if student_output.dtype in (torch.float16, torch.bfloat16):
            raw = raw.to(student_output.dtype)  # exact: they are the rows' own values
        idx = _neighbours(raw, normalised.detach(), offset, B, topk, eps, backend)
        # The distances, the log and their gradient in float64 (O(B topk D) values): two rows that are
        # each other's nearest copies get opposite gradients of ~1 / (B sqrt(D) 1e-8) each, whose fp32
        # sum with the rest of a row's gradient would leave ~1e-2 of it; here they cancel. One float64
        # tensor holds both roles of a row, so that its gradients add up before the cast to fp32.
        rows64 = normalised.double()
        mine = rows64[offset:offset + B]
        mine = mine.repeat_interleave(topk, dim=0) if topk > 1 else mine
        distances = F.pairwise_distance(mine, rows64[idx.reshape(-1)], p=2.0, eps=PDIST_EPS)
        return (-torch.log(distances + eps).mean()).float()


# ----------------------------------------------------------------------------- modules

class KoLeoLoss(nn.Module):
    """Drop-in for DINOv2's and DINOv3's ``KoLeoLoss``: ``forward(student_output [B, D], eps=1e-8)``
    over this process's rows, each row's one nearest neighbour (:func:`koleo_loss`). No state.
    ``pairwise_NNs_inner(x)`` gives the ``[B]`` neighbour indices of normalised rows, as theirs.

    >>> import torch
    >>> from fastssl.dinov3 import KoLeoLoss        # or fastssl.dinov2
    >>> loss = KoLeoLoss()(torch.randn(32, 384))
    >>> loss.shape
    torch.Size([])
    """

    def __init__(self, *, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"KoLeoLoss: backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def pairwise_NNs_inner(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (the authors' name)
        _check_input("KoLeoLoss", x)
        _layout("KoLeoLoss", x.shape[0], 1, 0, 1, None)
        return _neighbours(x.detach(), x.detach().float(), 0, x.shape[0], 1, 1e-8, self.backend).squeeze(1)

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return koleo_loss(student_output, eps=eps, backend=self.backend)


class KoLeoLossDistributed(nn.Module):
    """Drop-in for DINOv3's ``KoLeoLossDistributed(topk=1, loss_group_size=None)``: the neighbours
    of this rank's rows among the all-gathered rows of its group of ``loss_group_size`` (None:
    the global batch), ``topk`` of them each (:func:`koleo_loss` with ``gather=True``), the same
    errors when the sizes do not divide. Without an initialised process group it is one rank.
    ``pairwise_NNs_inner(x, all_x, rank)`` gives the ``[B, topk]`` indices into ``all_x``, as theirs.

    >>> import torch
    >>> from fastssl.dinov3 import KoLeoLossDistributed
    >>> loss_fn = KoLeoLossDistributed(topk=2, loss_group_size=32)
    >>> loss = loss_fn(torch.randn(32, 384))
    """

    def __init__(self, topk: int = 1, loss_group_size: int | None = None, *, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"KoLeoLossDistributed: backend must be one of {BACKENDS}, got {backend!r}")
        self.topk = topk
        self.loss_group_size = loss_group_size
        self.backend = backend

    def pairwise_NNs_inner(self, x: torch.Tensor, all_x: torch.Tensor, rank: int) -> torch.Tensor:  # noqa: N802
        _check_input("KoLeoLossDistributed", x)
        _check_input("KoLeoLossDistributed", all_x)
        B = x.shape[0]
        if all_x.shape[1] != x.shape[1] or not 0 <= rank * B <= all_x.shape[0] - B:
            raise ValueError(f"KoLeoLossDistributed: x {tuple(x.shape)} are not the rows of rank {rank} in all_x "
                             f"{tuple(all_x.shape)}")
        _layout("KoLeoLossDistributed", all_x.shape[0], 1, 0, self.topk, None)
        return _neighbours(all_x.detach(), all_x.detach().float(), rank * B, B, self.topk, 1e-8, self.backend)

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return koleo_loss(student_output, topk=self.topk, loss_group_size=self.loss_group_size, gather=True,
                          eps=eps, backend=self.backend)

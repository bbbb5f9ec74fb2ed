"""KoLeo (DINOv2, DINOv3) and the Gram anchoring loss (DINOv3) as the authors define them, in PyTorch.

Sablayrolles et al. 2018, https://arxiv.org/abs/1806.03198 (KoLeo; facebookresearch/dinov2
``dinov2/loss/koleo_loss.py``, facebookresearch/dinov3 ``dinov3/loss/koleo_loss.py``); Siméoni
et al. 2025, "DINOv3", https://arxiv.org/abs/2508.10104 (``dinov3/loss/gram_loss.py``). Each
function follows the authors' steps in the inputs' dtype (16-bit features are cast to fp32
where the authors cast them): pass float64 tensors for a reference value. They are what the
fused ops are tested against and the baselines the benchmarks time.

:class:`AuthorsDinov3Loss` is DINOv3's objective as one step computes it (``SSLMetaArch``:
``get_teacher_output``'s Sinkhorn-Knopp targets and ``compute_losses``), on their loss code as
they write it (``dinov3/loss/dino_clstoken_loss.py``, ``ibot_patch_loss.py``, ``koleo_loss.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import dinov2

__all__ = ["AuthorsDinov3Loss", "dino_loss", "gram_loss", "ibot_loss_masked", "ibot_sinkhorn_knopp", "koleo_loss",
           "koleo_loss_distributed", "koleo_neighbours", "sinkhorn_knopp"]


def koleo_neighbours(x, all_x, offset, topk=1):
    """The authors' ``pairwise_NNs_inner``: the inner products of normalised rows with the
    neighbour set, -1 written on the row's own entry (column ``offset + i``), then the largest
    (``torch.max``: the first of equal maxima) or the ``topk`` largest. For ``topk > 1`` a
    stable descending sort stands in for their ``torch.topk`` so that ties go to the lowest
    index, as for one neighbour."""
    dots = torch.mm(x, all_x.t())
    local_b, group_b = dots.shape
    dots.view(-1)[offset::(group_b + 1)].fill_(-1)
    if topk == 1:
        return torch.max(dots, dim=1).indices[:, None]
    return torch.sort(dots, dim=1, descending=True, stable=True).indices[:, :topk]


def koleo_loss(student_output, eps=1e-8):
    """``KoLeoLoss.forward`` (DINOv2 and DINOv3): normalise, nearest neighbour by inner product,
    ``nn.PairwiseDistance(2, eps=1e-8)`` (the norm of x - y + 1e-8), ``-log(distance + eps)``
    averaged."""
    x = F.normalize(student_output, eps=eps, p=2, dim=-1)
    indices = koleo_neighbours(x.detach(), x.detach(), 0)[:, 0]
    distances = torch.nn.PairwiseDistance(2, eps=1e-8)(x, x[indices])
    return -torch.log(distances + eps).mean()


def koleo_loss_distributed(all_outputs, world_size, topk=1, loss_group_size=None, eps=1e-8):
    """``KoLeoLossDistributed.forward`` of every rank at once, from the gathered batch
    ``all_outputs`` (rank r's rows are ``r * B`` to ``(r + 1) * B - 1``): the list of the ranks'
    losses. The gradient of their sum with respect to rank r's rows is what the authors'
    all-gather (its backward sums over ranks) gives rank r."""
    global_b = all_outputs.shape[0]
    local_b = global_b // world_size
    all_x = F.normalize(all_outputs, eps=eps, p=2, dim=-1)
    size = loss_group_size if loss_group_size is not None else global_b
    n_groups = global_b // size
    ranks_per_group = world_size // n_groups
    losses = []
    for rank in range(world_size):
        x = all_x[rank * local_b:(rank + 1) * local_b]
        group = rank // ranks_per_group
        members = all_x.view(n_groups, size, -1)[group]
        indices = koleo_neighbours(x.detach(), members.detach(), (rank % ranks_per_group) * local_b, topk)
        expanded = x.unsqueeze(1).repeat(1, topk, 1).flatten(0, 1)
        distances = torch.nn.PairwiseDistance(2, eps=1e-8)(expanded, members[indices].flatten(0, 1))
        losses.append(-torch.log(distances + eps).mean())
    return losses


def gram_loss(output_feats, target_feats, img_level=True, apply_norm=True, remove_neg=True,
              remove_only_teacher_neg=False):
    """``GramLoss.forward``: 16-bit features cast to fp32 (float64 kept), optionally normalised,
    flattened to ``[B N, d]`` at batch level, the two similarity matrices by matmul, negatives
    removed in place (``remove_only_teacher_neg``: the teacher's, then the student's where the
    student's and the already zeroed teacher's are negative), then ``MSELoss``."""
    upcast = torch.promote_types(output_feats.dtype, torch.float32)
    output_feats = output_feats.to(upcast)
    target_feats = target_feats.to(torch.promote_types(target_feats.dtype, torch.float32))
    if apply_norm:
        target_feats = F.normalize(target_feats, dim=-1)
    if not img_level and target_feats.dim() == 3:
        target_feats = target_feats.flatten(0, 1)
    target_sim = torch.matmul(target_feats, target_feats.transpose(-1, -2))
    if apply_norm:
        output_feats = F.normalize(output_feats, dim=-1)
    if not img_level and output_feats.dim() == 3:
        output_feats = output_feats.flatten(0, 1)
    student_sim = torch.matmul(output_feats, output_feats.transpose(-1, -2))
    if remove_neg:
        target_sim[target_sim < 0] = 0.0
        student_sim[student_sim < 0] = 0.0
    elif remove_only_teacher_neg:
        target_sim[target_sim < 0] = 0.0
        student_sim[(student_sim < 0) & (target_sim < 0)] = 0.0
    return torch.nn.MSELoss()(student_sim, target_sim)


# ----------------------------------------------------------------------------- the step's objective

def _fp32(x):
    """The authors' ``.float()``, float64 kept (so that a float64 call gives a reference value)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3):
    """``DINOLoss.sinkhorn_knopp_teacher`` on one process: the logits cast to fp32, then the
    linear-domain iterations in place (:func:`fastssl.reference.dinov2.sinkhorn_knopp`)."""
    return dinov2.sinkhorn_knopp(_fp32(teacher_output), teacher_temp, n_iterations)


def ibot_sinkhorn_knopp(teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
    """``iBOTPatchLoss``'s ``SinkhornKnoppTeacher.forward`` on one process: as DINOLoss's, but the
    column normalisation divides by the tensor ``n_masked_patches_tensor`` (the collate's count
    of masked patches, which the authors all-reduce over the ranks, unconditionally: on one
    process it is this batch's count). ``[n, K]`` targets, rows summing to one."""
    q = torch.exp(_fp32(teacher_output) / teacher_temp).t()  # [K, n], the paper's layout
    n_prototypes = q.shape[0]
    samples = n_masked_patches_tensor
    q /= torch.sum(q)
    for _ in range(n_iterations):
        q /= torch.sum(q, dim=1, keepdim=True)  # each prototype's mass to 1 / K
        q /= n_prototypes
        q /= torch.sum(q, dim=0, keepdim=True)  # each sample's mass to 1 / n
        q /= samples
    q *= samples
    return q.t()


def dino_loss(student_logits, teacher_probs, student_temp, ignore_diagonal=False):
    """DINOv3's ``DINOLoss.forward``: ``[S, B, K]`` student logits against ``[T, B, K]`` teacher
    probabilities, an fp32 log-softmax of the students and one einsum over the crop pairs; with
    ``ignore_diagonal`` the per-pair sums with their s == t entries zeroed by ``diagonal_scatter``,
    over the number of terms left."""
    n_student, batch, _ = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    log_p = F.log_softmax(_fp32(student_logits) / student_temp, dim=-1)
    if not ignore_diagonal:
        return -torch.einsum("sbk,tbk->", log_p, teacher_probs) / (batch * n_student * n_teacher)
    per_pair = -torch.einsum("sbk,tbk->st", log_p, teacher_probs)
    on_diagonal = min(n_student, n_teacher)
    per_pair = torch.diagonal_scatter(per_pair, per_pair.new_zeros(on_diagonal))
    return per_pair.sum() / (batch * n_student * n_teacher - batch * on_diagonal)


def ibot_loss_masked(student_masked, teacher_masked, masks, student_temp, n_masked_patches=None, masks_weight=None):
    """DINOv3's ``iBOTPatchLoss.forward_masked``: per masked patch ``sum(t * log_softmax(s / temp))``
    with both cast to fp32 (their ``lossfunc``), the first ``n_masked_patches`` rows, times
    ``masks_weight`` (default: 1 / the masked patches of the patch's image), summed, over minus the
    images of ``masks``."""
    per_patch = torch.sum(_fp32(teacher_masked) * F.log_softmax(_fp32(student_masked) / student_temp, dim=-1),
                          dim=-1)
    if masks_weight is None:
        counts = masks.sum(-1).clamp(min=1.0)
        masks_weight = (1 / counts).unsqueeze(-1).expand_as(masks)[masks]
    if n_masked_patches is not None:
        per_patch = per_patch[:n_masked_patches]
    return -(per_patch * masks_weight).sum() / masks.shape[0]


class AuthorsDinov3Loss(nn.Module):
    """DINOv3's objective as the authors compute it in a step, on one process, without the Gram term.

    :meth:`teacher_targets` is ``get_teacher_output``'s centering: :func:`sinkhorn_knopp` of the
    teacher's CLS logits ``[T B, K]`` and :func:`ibot_sinkhorn_knopp` of its masked-patch logits
    ``[n, K']`` (``compile_sinkhorn``: that one through ``torch.compile``, as their
    ``SinkhornKnoppTeacher.compile()``). :meth:`forward` is ``compute_losses``: :func:`dino_loss` of
    the local crops and of the global ones (``ignore_diagonal``), each scaled by its share of the crop
    pairs; :func:`koleo_loss` of each global crop's pre-head CLS tokens with autocast off, averaged,
    times the number of global crops; :func:`ibot_loss_masked`; each times its weight. Returns the
    total and the terms by the authors' names. Pass float64 tensors for a reference value.
    """

    def __init__(self, *, student_temp=0.1, dino_weight=1.0, koleo_weight=0.1, ibot_weight=1.0,
                 ignore_diagonal=True, compile_sinkhorn=False):
        super().__init__()
        self.student_temp = student_temp
        self.dino_weight, self.koleo_weight, self.ibot_weight = dino_weight, koleo_weight, ibot_weight
        self.ignore_diagonal = ignore_diagonal
        self.ibot_sinkhorn = torch.compile(ibot_sinkhorn_knopp) if compile_sinkhorn else ibot_sinkhorn_knopp

    @torch.no_grad()
    def teacher_targets(self, cls_logits, masked_logits, teacher_temp, n_masked_patches_tensor=None):
        """``(cls_centered [T B, K], masked_patch_centered [n, K'])``, fp32 probabilities.
        ``n_masked_patches_tensor`` defaults to a one-element tensor of ``n`` (the collate's)."""
        if n_masked_patches_tensor is None:
            n_masked_patches_tensor = torch.full((1,), masked_logits.shape[0], dtype=torch.long,
                                                 device=masked_logits.device)
        return (sinkhorn_knopp(cls_logits, teacher_temp),
                self.ibot_sinkhorn(masked_logits, teacher_temp, n_masked_patches_tensor))

    def forward(self, student_global, student_local, student_masked, global_cls, cls_centered, masked_centered, masks,
                masks_weight=None, n_masked_patches=None):
        """``student_global`` ``[2, B, K]``, ``student_local`` ``[n, B, K]``, ``student_masked`` ``[n_masked, K']``,
        ``global_cls`` ``[2, B, D]`` (pre-head), the targets of :meth:`teacher_targets` (``cls_centered``
        flat or ``[2, B, K]``), ``masks`` ``[2 B, patches]`` bool; ``n_masked_patches`` defaults to the
        student's masked rows (the authors pass ``mask_indices_list.shape[0]``)."""
        n_global, batch = student_global.shape[:2]
        n_local = student_local.shape[0]
        teacher_cls = cls_centered.unflatten(0, (-1, batch)) if cls_centered.dim() == 2 else cls_centered
        global_terms = n_global * (n_global - 1) if self.ignore_diagonal else n_global ** 2
        local_terms = n_global * n_local
        global_scale = global_terms / (global_terms + local_terms)
        local_scale = local_terms / (global_terms + local_terms)

        dino_local = dino_loss(student_local, teacher_cls, self.student_temp)
        dino_global = dino_loss(student_global, teacher_cls, self.student_temp, ignore_diagonal=self.ignore_diagonal)
        with torch.autocast(global_cls.device.type, enabled=False):  # theirs: torch.autocast("cuda", enabled=False)
            koleo = sum(koleo_loss(x) for x in global_cls) / n_global
        ibot = ibot_loss_masked(student_masked, masked_centered, masks, self.student_temp,
                                n_masked_patches=student_masked.shape[0] if n_masked_patches is None
                                else n_masked_patches, masks_weight=masks_weight)
        total = 0.0
        total += self.dino_weight * local_scale * dino_local
        total += self.dino_weight * global_scale * dino_global
        total += self.koleo_weight * n_global * koleo
        total += self.ibot_weight * ibot
        return total, {"dino_local_crops_loss": dino_local, "dino_global_crops_loss": dino_global,
                       "koleo_loss": koleo, "ibot_loss": ibot}

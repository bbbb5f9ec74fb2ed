"""KoLeo (DINOv2, DINOv3) and the Gram anchoring loss (DINOv3) as the authors define them, in PyTorch.

Sablayrolles et al. 2018, https://arxiv.org/abs/1806.03198 (KoLeo; facebookresearch/dinov2
``dinov2/loss/koleo_loss.py``, facebookresearch/dinov3 ``dinov3/loss/koleo_loss.py``); Siméoni
et al. 2025, "DINOv3", https://arxiv.org/abs/2508.10104 (``dinov3/loss/gram_loss.py``). Each
function follows the authors' steps in the inputs' dtype (16-bit features are cast to fp32
where the authors cast them): pass float64 tensors for a reference value. They are what the
fused ops are tested against and the baselines the benchmarks time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gram_loss", "koleo_loss", "koleo_loss_distributed", "koleo_neighbours"]


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

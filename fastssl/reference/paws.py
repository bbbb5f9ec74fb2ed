"""The PAWS loss as the authors define it: soft nearest neighbours over the full N x M matrix.

Assran et al. 2021, "Semi-Supervised Learning of Visual Features by Non-Parametrically
Predicting View Assignments with Support Samples", https://arxiv.org/abs/2104.13963
(``init_paws_loss`` and ``make_labels_matrix`` in facebookresearch/suncet, src/losses.py;
``AllGather`` / ``AllReduce`` in src/utils.py). The similarity matrix, its softmax and
the dense label matrix are all materialised; that is the cost fastssl removes.
Everything runs in the inputs' dtype: pass float64 tensors for a reference value.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class AllGather(torch.autograd.Function):
    """Rows of every rank, concatenated; the backward sums over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x):
        if _world() == 1:
            return x
        parts = [torch.zeros_like(x) for _ in range(_world())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grads):
        if _world() == 1:
            return grads
        rows = grads.shape[0] // _world()
        grads = grads.contiguous()
        dist.all_reduce(grads)
        return grads[rows * dist.get_rank():rows * (dist.get_rank() + 1)]


class AllReduce(torch.autograd.Function):
    """Mean over ranks; the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, x):
        if _world() > 1:
            x = x.contiguous() / _world()
            dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grads):
        return grads


def snn_reference(query, supports, labels, tau):
    """``softmax(normalize(query) @ normalize(supports).T / tau) @ labels``, supports all-gathered."""
    query = F.normalize(query)
    supports = AllGather.apply(F.normalize(supports))
    return torch.softmax(query @ supports.T / tau, dim=1) @ labels


def init_paws_loss(multicrop=6, tau=0.1, T=0.25, me_max=True):
    """The authors' closure: ``loss(anchor_views, ..., target_support_labels) -> (loss, rloss)``."""

    def sharpen(p):
        sharp_p = p ** (1.0 / T)
        return sharp_p / torch.sum(sharp_p, dim=1, keepdim=True)

    def snn(query, supports, labels):
        return snn_reference(query, supports, labels, tau)

    def loss(anchor_views, anchor_supports, anchor_support_labels, target_views, target_supports,
             target_support_labels, sharpen=sharpen, snn=snn):
        batch_size = len(anchor_views) // (2 + multicrop)
        probs = snn(anchor_views, anchor_supports, anchor_support_labels)
        with torch.no_grad():
            targets = sharpen(snn(target_views, target_supports, target_support_labels))
            if multicrop > 0:
                mc_target = 0.5 * (targets[:batch_size] + targets[batch_size:])
                targets = torch.cat([targets, *[mc_target for _ in range(multicrop)]], dim=0)
            targets[targets < 1e-4] *= 0
        loss = torch.mean(torch.sum(torch.log(probs ** (-targets)), dim=1))
        rloss = 0.0
        if me_max:
            avg_probs = AllReduce.apply(torch.mean(sharpen(probs), dim=0))
            rloss -= torch.sum(torch.log(avg_probs ** (-avg_probs)))
        return loss, rloss

    return loss


def make_labels_matrix(num_classes, s_batch_size, world_size, device, unique_classes=False, smoothing=0.0):
    """The authors' dense support labels for ``ClassStratifiedSampler`` batches.

    A rank's ``num_classes * s_batch_size`` supports cycle through its classes (support
    ``j`` has class slot ``j % num_classes``); with ``unique_classes`` rank ``r``'s slots
    are columns ``r * num_classes + slot`` (``num_classes * world_size`` columns in all,
    either way). Off-class entries hold ``smoothing / classes``, the class entry
    ``1 - smoothing`` more.
    """
    local = s_batch_size * num_classes
    columns = num_classes * world_size
    off_value = smoothing / columns if unique_classes else smoothing / num_classes
    labels = torch.full((local * world_size, columns), off_value, device=device)
    for r in range(world_size):
        for i in range(num_classes):
            col = r * num_classes + i if unique_classes else i
            labels[r * local + i:(r + 1) * local:num_classes, col] = 1.0 - smoothing + off_value
    return labels

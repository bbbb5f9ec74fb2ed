"""The DINOv2 / DINOv3 objective as the authors define it, written plainly in PyTorch.

Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision",
https://arxiv.org/abs/2304.07193 (facebookresearch/dinov2, ``dinov2/loss/``); Siméoni et al.
2025, "DINOv3", https://arxiv.org/abs/2508.10104 (facebookresearch/dinov3, ``dinov3/loss/``).
Each function follows the authors' definition step by step, in the inputs' dtype: pass
float64 tensors for a reference value. They are what the fused ops are tested against and
the baselines the benchmarks time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_over_pairs(student_logits, teacher_probs, student_temp, ignore_diagonal=False, reduction="mean"):
    """The CLS-token DINO loss over lists of crops, pair by pair.

    ``student_logits`` ``[S, B, K]``, ``teacher_probs`` ``[T, B, K]``. Every (student crop s,
    teacher crop t) pair, but s == t with ``ignore_diagonal``, adds sum over samples of
    ``-<q_t, log_softmax(s / student_temp)>``. ``reduction="mean"``: divided by the number of
    (pair, sample) terms (DINOv3's ``DINOLoss.forward``); ``"sum_of_batch_means"``: divided
    by B, the sum over pairs of batch means (DINOv2's ``DINOLoss.forward``).
    """
    S, B, _ = student_logits.shape
    T = teacher_probs.shape[0]
    log_p = F.log_softmax(student_logits / student_temp, dim=-1)
    total, pairs = 0.0, 0
    for s in range(S):
        for t in range(T):
            if ignore_diagonal and s == t:
                continue
            total = total - (teacher_probs[t] * log_p[s]).sum()
            pairs += 1
    return total / (pairs * B) if reduction == "mean" else total / B


def sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3):
    """The authors' ``sinkhorn_knopp_teacher`` on one process: the ``[K, R]`` matrix
    ``exp(x / tau)``, normalised to sum 1, then ``n_iterations`` times each class row to 1 / K
    and each sample column to 1 / R; returned ``[R, K]`` with rows summing to one. In the
    input's dtype (the authors cast to fp32; float64 gives the reference value)."""
    Q = torch.exp(teacher_output / teacher_temp).t()
    K, R = Q.shape
    Q /= Q.sum()  # in place, as the authors: the benchmarks time this as their baseline
    for _ in range(n_iterations):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= R
    Q *= R
    return Q.t()


def cross_entropy_over_pairs_einsum(student_logits, teacher_probs, student_temp, ignore_diagonal=False):
    """DINOv3's ``DINOLoss.forward`` as they compute it, the baseline the benchmarks time: an fp32
    log-softmax of every student crop, then one einsum over all (s, t) pairs (per pair with
    ``ignore_diagonal``, whose s == t terms are zeroed), over the number of terms."""
    S, B, _ = student_logits.shape
    T = teacher_probs.shape[0]
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    if not ignore_diagonal:
        return -torch.einsum("sbk,tbk->", log_p, teacher_probs) / (B * S * T)
    per_pair = -torch.einsum("sbk,tbk->st", log_p, teacher_probs)
    off_diagonal = 1 - torch.eye(S, T, dtype=per_pair.dtype, device=per_pair.device)
    return (per_pair * off_diagonal).sum() / (B * S * T - B * min(S, T))


def softmax_center(teacher_output, center, teacher_temp):
    """Softmax centering: ``softmax((x - center) / tau)`` over the last dimension."""
    return F.softmax((teacher_output - center) / teacher_temp, dim=-1)


def ibot_loss_masked(student_masked, teacher_masked, masks, student_temp, n_masked_patches=None, masks_weight=None):
    """``iBOTPatchLoss.forward_masked``: per masked patch the cross-entropy of the teacher's
    probabilities against the student's log-softmax, the first ``n_masked_patches`` rows kept,
    weighted (default: 1 / the masked patches of its image), summed, over the images of ``masks``."""
    loss = (teacher_masked * F.log_softmax(student_masked / student_temp, dim=-1)).sum(dim=-1)
    if masks_weight is None:
        per_image = 1 / masks.sum(dim=-1).clamp(min=1.0)
        masks_weight = per_image[:, None].expand_as(masks)[masks]
    if n_masked_patches is not None:
        loss = loss[:n_masked_patches]
    return -(loss * masks_weight).sum() / masks.shape[0]


def ibot_loss_dense(student_patches, teacher_patches, masks, student_temp):
    """``iBOTPatchLoss.forward``: ``[B, N, K]`` patch tokens; each image's masked patches'
    mean cross-entropy (0 without one), averaged over the images."""
    loss = (teacher_patches * F.log_softmax(student_patches / student_temp, dim=-1)).sum(dim=-1)
    per_image = (loss * masks.to(loss.dtype)).sum(dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
    return -per_image.mean()


class CenteredTeacher:
    """The authors' center bookkeeping on one process: ``update_center`` queues this batch's
    center (``rows_mean``: the CLS loss's sum over rows / rows; the iBOT loss's mean over the
    rows of each leading index, summed, / leading indices), applied as an EMA at the next
    ``apply``."""

    def __init__(self, center, momentum=0.9):
        self.center, self.momentum, self.pending = center, momentum, None

    def update_center(self, teacher_output, patches=False):
        if patches:
            self.pending = teacher_output.mean(dim=1).sum(dim=0, keepdim=True) / len(teacher_output)
        else:
            self.pending = teacher_output.sum(dim=0, keepdim=True) / len(teacher_output)

    def apply(self):
        if self.pending is not None:
            self.center = self.center * self.momentum + self.pending.view_as(self.center) * (1 - self.momentum)
            self.pending = None
        return self.center

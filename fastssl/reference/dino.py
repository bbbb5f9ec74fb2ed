"""The DINO loss as the authors define it: a Python loop over every crop pair.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
https://arxiv.org/abs/2104.14294 (``DINOLoss`` in facebookresearch/dino,
main_dino.py). Each of the 2 * ncrops - 2 (teacher crop, student crop) pairs keeps
its own ``B x K`` log-probabilities alive for autograd; that is the cost fastssl
removes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def dino_loss_pairwise(student_output, teacher_output, center, ncrops, student_temp, teacher_temp):
    """Mean over crop pairs (v != i) of the batch-mean cross-entropy H(q_i, p_v).

    Computed in the inputs' dtype: pass float64 tensors for a reference value.
    """
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue  # the student never predicts the teacher's own view
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss = total_loss + loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


class AuthorsDINOLoss(nn.Module):
    """The authors' module: the pairwise loss, then the EMA of the teacher center."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                 nepochs, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def forward(self, student_output, teacher_output, epoch):
        temp = self.teacher_temp_schedule[epoch]
        loss = dino_loss_pairwise(student_output, teacher_output, self.center, self.ncrops,
                                  self.student_temp, temp)
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)

"""Evaluation by soft nearest neighbours against a large labelled set (PAWS's SNN classifier).

Assran et al. 2021, https://arxiv.org/abs/2104.13963: a query is classified by
``softmax(normalize(q) @ normalize(S).T / tau)`` over every labelled training image, the
probabilities summed per class. With ImageNet's 128k supports the similarity matrix of a
batch of queries takes gigabytes; the fused :func:`fastssl.functional.snn` never builds it
and, with integer class ids, sums the classes over narrow tiles of them.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import nn

from ._backend import BACKENDS
from .losses.paws import _check_embeddings, _check_labels, snn

__all__ = ["SoftNNClassifier"]


class SoftNNClassifier(nn.Module):
    """Soft nearest-neighbour classifier over a fixed labelled support set, in query chunks.

    Args:
        supports: ``[M, d]`` embeddings of the labelled images (normalised inside).
        labels: integer class ids ``[M]`` (with ``num_classes``, default ``max + 1``) or
            dense ``[M, C]`` labels.
        tau: the temperature.
        smoothing: label smoothing of integer ids (0 for evaluation, as a rule).
        chunk_size: queries per call of the fused op. The kernels need O(chunk * C)
            memory; the PyTorch path builds a ``[chunk, M]`` matrix.
        backend: as :func:`fastssl.functional.snn`.

    With class ids the supports are stored sorted by class, so the kernels read each
    class's supports contiguously. ``forward`` returns float32 ``[N, C]`` probabilities,
    no gradient; :meth:`predict` the top-k classes; :meth:`accuracy` top-k accuracies.
    """

    def __init__(self, supports: torch.Tensor, labels: torch.Tensor, tau: float = 0.1, *,
                 num_classes: int | None = None, smoothing: float = 0.0, chunk_size: int = 4096,
                 backend: str = "auto"):
        super().__init__()
        op = "SoftNNClassifier"
        if backend not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
        if not float(tau) > 0:
            raise ValueError(f"{op}: tau must be positive, got {tau}")
        self.chunk_size = operator.index(chunk_size)
        if self.chunk_size < 1:
            raise ValueError(f"{op}: chunk_size must be positive, got {chunk_size}")
        _check_embeddings(op, supports=supports)
        if (isinstance(labels, torch.Tensor) and not labels.is_floating_point() and num_classes is None
                and labels.numel() > 0):
            num_classes = int(labels.max()) + 1
        dense, C = _check_labels(op, labels, supports, (supports.shape[0],), num_classes, float(smoothing), "labels")
        supports, labels = supports.detach(), labels.detach()
        if not dense:
            order = torch.argsort(labels, stable=True)
            supports, labels = supports[order], labels[order].long()
        self.register_buffer("supports", supports)
        self.register_buffer("labels", labels)
        self.tau, self.num_classes, self.smoothing, self.backend = float(tau), C, float(smoothing), backend

    @torch.no_grad()
    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        _check_embeddings("SoftNNClassifier", queries=queries, supports=self.supports)
        num_classes = None if self.labels.is_floating_point() else self.num_classes
        return torch.cat([snn(chunk, self.supports, self.labels, self.tau, num_classes=num_classes,
                              smoothing=self.smoothing, backend=self.backend)
                          for chunk in queries.split(self.chunk_size)])

    @torch.no_grad()
    def predict(self, queries: torch.Tensor, k: int = 1) -> torch.Tensor:
        """The ``k`` most probable classes of each query, ``[N, k]`` int64, best first."""
        return self(queries).topk(k, dim=1).indices

    @torch.no_grad()
    def accuracy(self, queries: torch.Tensor, targets: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict[int, float]:
        """Fraction of queries whose target class is among the top ``k``, for each ``k`` in ``topk``."""
        if targets.shape != (queries.shape[0],):
            raise ValueError(f"SoftNNClassifier.accuracy: targets {tuple(targets.shape)} must be [N] for queries "
                             f"{tuple(queries.shape)}")
        if max(topk) > self.num_classes:
            raise ValueError(f"SoftNNClassifier.accuracy: topk={tuple(topk)} exceeds the {self.num_classes} classes")
        top = self.predict(queries, max(topk))
        hits = top == targets.to(top.device).view(-1, 1)
        return {k: hits[:, :k].any(dim=1).float().mean().item() for k in topk}

    def extra_repr(self) -> str:
        return (f"supports={tuple(self.supports.shape)}, num_classes={self.num_classes}, tau={self.tau}, "
                f"smoothing={self.smoothing}, chunk_size={self.chunk_size}, backend={self.backend!r}")

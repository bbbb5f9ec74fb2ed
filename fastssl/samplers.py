"""Class-stratified batches of labelled images: the support set of PAWS.

Assran et al. 2021, https://arxiv.org/abs/2104.13963 (``ClassStratifiedSampler`` in
facebookresearch/suncet, src/data_manager.py). Every batch holds ``classes_per_batch``
classes and ``samples_per_class`` images of each, cycling through the classes:
``[a, b, c, a, b, c, ...]``, so image ``j`` of a rank's batch has class slot
``j % classes_per_batch``. That order is what the authors' ``make_labels_matrix`` (and
:meth:`ClassStratifiedSampler.labels` as class ids) assume.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from . import distributed

__all__ = ["ClassStratifiedSampler"]


class ClassStratifiedSampler(Sampler):
    """Batch sampler (``DataLoader(dataset, batch_sampler=...)``) of class-stratified support batches.

    Args:
        targets: the class id of every image of the labelled dataset (a sequence or a
            1-D tensor), or a dataset with a ``.targets`` attribute.
        classes_per_batch: classes drawn for each batch (per rank).
        samples_per_class: images of each drawn class in each batch.
        world_size, rank: default to ``torch.distributed``'s (1 and 0 without it).
        unique_classes: each rank draws different classes (rank ``r`` the ``r``-th group
            of one shared random permutation), else every rank draws the same classes
            from its own share of each class's images.
        seed: all ranks must pass the same seed; :meth:`set_epoch` varies it per epoch.
        batches_per_epoch: default ``len(targets) // (world_size * batch_size)``, at least 1.

    Images are drawn without replacement within a batch when a class (or, with shared
    classes, a rank's share of it) has enough, with replacement otherwise.
    ``__iter__`` yields lists of dataset indices; :meth:`batches` yields them with their
    class ids; :meth:`labels` gives the class slots that match every batch's order.
    """

    def __init__(self, targets, classes_per_batch: int, samples_per_class: int, *, world_size: int | None = None,
                 rank: int | None = None, unique_classes: bool = False, seed: int = 0,
                 batches_per_epoch: int | None = None):
        if hasattr(targets, "targets"):
            targets = targets.targets
        targets = torch.as_tensor(targets)
        if targets.dim() != 1 or targets.numel() == 0 or targets.is_floating_point():
            raise ValueError(f"ClassStratifiedSampler: targets must be a non-empty 1-D sequence of integer class "
                             f"ids, got shape {tuple(targets.shape)} and dtype {targets.dtype}")
        self.classes_per_batch = operator.index(classes_per_batch)
        self.samples_per_class = operator.index(samples_per_class)
        if self.classes_per_batch < 1 or self.samples_per_class < 1:
            raise ValueError(f"ClassStratifiedSampler: classes_per_batch={classes_per_batch} and "
                             f"samples_per_class={samples_per_class} must be positive")
        self.world_size = distributed.world_size() if world_size is None else operator.index(world_size)
        if rank is None:
            rank = torch.distributed.get_rank() if distributed.is_initialized() else 0
        self.rank = operator.index(rank)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"ClassStratifiedSampler: rank={self.rank} outside [0, world_size={self.world_size})")
        self.unique_classes = bool(unique_classes)
        self.seed, self.epoch = int(seed), 0
        self.targets = targets.long()
        self.classes = torch.unique(self.targets)  # sorted
        needed = self.classes_per_batch * (self.world_size if self.unique_classes else 1)
        if len(self.classes) < needed:
            raise ValueError(f"ClassStratifiedSampler: {len(self.classes)} classes in targets, but classes_per_batch="
                             f"{self.classes_per_batch}" + (f" x world_size={self.world_size} unique classes"
                                                            if self.unique_classes else "") + f" = {needed} needed")
        order = torch.argsort(self.targets, stable=True)
        counts = torch.bincount(torch.searchsorted(self.classes, self.targets), minlength=len(self.classes))
        per_class = torch.split(order, counts.tolist())
        if self.unique_classes:
            self._pools = list(per_class)
        else:
            # A rank's share of each class (all of it when the class has fewer images than ranks).
            self._pools = [p[self.rank::self.world_size] if len(p) >= self.world_size else p for p in per_class]
        if batches_per_epoch is None:
            batches_per_epoch = max(1, len(self.targets) // (self.world_size * self.batch_size))
        self.batches_per_epoch = operator.index(batches_per_epoch)

    @property
    def batch_size(self) -> int:
        """Images per batch on each rank."""
        return self.classes_per_batch * self.samples_per_class

    @property
    def num_classes(self) -> int:
        """Width of the predictions: class slots over all ranks (``classes_per_batch``, times
        ``world_size`` with unique classes)."""
        return self.classes_per_batch * (self.world_size if self.unique_classes else 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = operator.index(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def labels(self, gathered: bool = False, device=None, views: int = 1) -> torch.Tensor:
        """Class slots of a batch's supports, int64: ``j % classes_per_batch`` (plus
        ``rank * classes_per_batch`` with unique classes). ``views``: the batch embedded as that
        many augmented views, view-major (``[view 0 of every support, view 1, ...]``).
        ``gathered``: of every rank's (multi-view) batch concatenated in rank order, for supports
        all-gathered across ranks."""
        views = operator.index(views)
        if views < 1:
            raise ValueError(f"ClassStratifiedSampler.labels: views must be positive, got {views}")
        slots = (torch.arange(self.batch_size, device=device) % self.classes_per_batch).repeat(views)
        ranks = range(self.world_size) if gathered else [self.rank]
        offset = self.classes_per_batch if self.unique_classes else 0
        return torch.cat([slots + r * offset for r in ranks])

    def batches(self) -> Iterator[tuple[list[int], list[int]]]:
        """``(dataset indices, their class ids)`` of each batch of this epoch."""
        # The class draws come from a generator every rank seeds alike (same classes, or disjoint
        # groups of one permutation); the image draws from one of this rank's own.
        shared = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        local = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch + 7_919 * (self.rank + 1))
        cpb, spc = self.classes_per_batch, self.samples_per_class
        group = self.rank if self.unique_classes else 0
        for _ in range(self.batches_per_epoch):
            chosen = torch.randperm(len(self.classes), generator=shared)[group * cpb:(group + 1) * cpb]
            picks = []
            for c in chosen.tolist():
                pool = self._pools[c]
                if len(pool) >= spc:
                    picks.append(pool[torch.randperm(len(pool), generator=local)[:spc]])
                else:
                    picks.append(pool[torch.randint(len(pool), (spc,), generator=local)])
            # Round k holds one image of every chosen class, in slot order: [a, b, c, a, b, c, ...].
            indices = torch.stack(picks, dim=1).reshape(-1)
            yield indices.tolist(), self.classes[chosen].repeat(spc).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for indices, _ in self.batches():
            yield indices

"""Weighted k-NN classification of frozen features, as the DINO authors' ``eval_knn.py``.

Features are L2-normalised; each test image's ``k`` most similar training images vote for
their class with weight ``exp(similarity / T)`` (k = 20, T = 0.07 by default); top-1 and top-5
accuracies are the share of test images whose class is among the 1 / 5 classes with the most votes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed

__all__ = ["embed_datasets", "extract_features", "knn_classify", "knn_eval"]


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, T: float = 0.07, num_classes: int | None = None,
                 chunk_size: int = 1024) -> tuple[float, float]:
    """``(top1, top5)`` accuracies in percent of the similarity-weighted k-NN vote.

    Features are normalised here (``[N, D]`` and ``[M, D]``); labels are class ids. Test images
    are scored ``chunk_size`` at a time (the authors' chunks of 100), so memory stays
    ``chunk_size * N``. Ties in the vote go to the lower class id.
    """
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("knn_classify: empty train or test features")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"knn_classify: train features have {train_features.shape[1]} dims, test features "
                         f"{test_features.shape[1]}")
    k = min(k, train_features.shape[0])
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1 if num_classes is None else num_classes
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    train_labels = train_labels.to(train.device)
    top1 = top5 = 0.0
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start:start + chunk_size] @ train.T
        weights, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[idx], (weights / T).exp())
        # A stable sort: among equal votes the lower class id comes first.
        pred = votes.sort(dim=1, descending=True, stable=True).indices
        target = test_labels[start:start + chunk_size].to(pred.device).view(-1, 1)
        top1 += (pred[:, :1] == target).sum().item()
        top5 += (pred[:, :min(5, num_classes)] == target).any(dim=1).sum().item()
    n = test.shape[0]
    return 100.0 * top1 / n, 100.0 * top5 / n


@torch.no_grad()
def extract_features(model, loader, device: torch.device, prepare) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, labels)`` of every image of ``loader`` (a :class:`~fastssl.train.data.Batch` loader),
    ``prepare(batch) -> (float images [B, C, S, S], labels)``, gathered from all ranks in dataset order
    (each rank embeds its own share: the loader must use a non-shuffling ``ResumableSampler``)."""
    parts: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] = ([], [], [])
    for batch in loader:
        x, y = prepare(batch)
        if x is None:
            continue
        parts[0].append(model(x).float())
        parts[1].append(y.to(device))
        parts[2].append(batch.indices[:y.shape[0]].to(device))
    feats, labels, indices = (torch.cat(p) for p in parts)
    if distributed.world_size() > 1:
        feats, labels, indices = (_all_gather_varlen(t) for t in (feats, labels, indices))
        # Drop the sampler's padding (repeated indices) and restore dataset order.
        order = torch.argsort(indices)
        keep = torch.ones_like(order, dtype=torch.bool)
        keep[1:] = indices[order][1:] != indices[order][:-1]
        order = order[keep]
        feats, labels = feats[order], labels[order]
    return feats, labels


def _all_gather_varlen(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    padded = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes, strict=True)])


def center_crop_boxes(images, crop_fraction: float) -> torch.Tensor:
    """``[B, 5]`` boxes of the central square of side ``crop_fraction * min(H, W)`` of each image:
    with ``crop_fraction = 224 / 256`` the authors' ``Resize(256), CenterCrop(224)`` once resized."""
    sizes = [(im.shape[-2], im.shape[-1]) for im in images]
    rows = []
    for i, (h, w) in enumerate(sizes):
        side = crop_fraction * min(h, w)
        rows.append((i, (h - side) / 2, (w - side) / 2, side, side))
    return torch.tensor(rows, dtype=torch.float32)


@torch.no_grad()
def embed_datasets(model, datasets, device: torch.device, *, size: int, crop_fraction: float, batch_size: int,
                   num_workers: int, amp_dtype=None, forward=None, interpolation: str = "bicubic") -> list[tuple]:
    """``[(features, labels), ...]`` of every labelled dataset by ``model`` (eval mode), each image's
    central square (``crop_fraction`` of its short side) resized to ``size`` (``interpolation``: bicubic as
    DINO's evaluation, bilinear as PAWS's) and normalised as in
    training (``forward(x)``, default ``model(x)``); under torchrun each rank embeds its share and all get
    every feature, in dataset order."""
    from torch.utils.data import DataLoader

    from ..augment import IMAGENET_MEAN, IMAGENET_STD
    from ..ops import resized_crops
    from .data import ResumableSampler, collate, decode_batch

    rank = torch.distributed.get_rank() if distributed.is_initialized() else 0
    world = distributed.world_size()
    def prepare(batch):
        images, _ = decode_batch(batch, device)
        if not len(images):
            return None, None
        if len(images) != batch.labels.shape[0]:  # a JPEG failed to decode on the GPU: labels of the rest unknown
            raise RuntimeError("evaluation: an image failed to decode; remove it from the evaluation folder")
        x = resized_crops(images, center_crop_boxes(images, crop_fraction), size, interpolation=interpolation,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return (forward or model)(x), batch.labels

    was_training = model.training
    model.eval()
    out = []
    for ds in datasets:
        sampler = ResumableSampler(len(ds), shuffle=False, rank=rank, world_size=world)
        # A generator of its own: the loader's seed draw must not move the global RNG (a run resumed
        # from the checkpoint written before this evaluation would then differ from the straight run).
        loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(0))
        out.append(extract_features(lambda x: x, loader, device, prepare))
    model.train(was_training)
    return out


def knn_eval(backbone, bank_set, query_set, device: torch.device, *, k: int, T: float, size: int,
             crop_fraction: float, batch_size: int, num_workers: int, amp_dtype=None) -> dict[str, float]:
    """k-NN accuracy (``k`` neighbours, temperature ``T``) of ``backbone``'s features: ``bank_set`` (labelled
    images, the neighbours) against ``query_set``, embedded by :func:`embed_datasets` (central crops of
    ``crop_fraction`` resized to ``size``). Returns ``{"top1", "top5"}`` in percent."""
    (bank, bank_labels), (query, query_labels) = embed_datasets(
        backbone, (bank_set, query_set), device, size=size, crop_fraction=crop_fraction, batch_size=batch_size,
        num_workers=num_workers, amp_dtype=amp_dtype)
    top1, top5 = knn_classify(bank, bank_labels, query, query_labels, k=k, T=T, num_classes=len(bank_set.classes))
    return {"top1": top1, "top5": top5}

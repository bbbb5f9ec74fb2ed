"""iBOT's block masks, as the DINOv2 / DINOv3 authors draw them (``dinov3/data/masking.py``, ``collate.py``).

:class:`MaskingGenerator` draws one ``[h, w]`` mask of exactly ``num_masking_patches`` patches: blocks
of area uniform in ``[min_num_patches, max]`` and log-uniform aspect ratio, each placed at a uniform
position and kept when it adds new patches without exceeding what is left to mask (at most 10 tries
per block), until none fits; the rest is completed by patches drawn uniformly among those unmasked.

:func:`block_masks` masks a batch of ``n`` global crops as the authors' collate function:
``int(n * mask_probability)`` crops are masked, crop ``i`` of them with ``int(N * r_{i+1})`` patches
where ``r = linspace(min_ratio, max_ratio, masked + 1)``; the others get an empty mask; the list is
shuffled. Each masked patch weighs 1 / (masked patches of its crop) in iBOT's loss.

The authors draw from Python's and numpy's global generators; here both are explicit objects (a
``random.Random`` and a legacy ``numpy.random.RandomState``), called in the authors' order, so the
same generator states give the authors' masks bit for bit, and a trainer can seed them per step.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["BlockMasks", "MaskingGenerator", "block_masks", "max_num_patches"]


class MaskingGenerator:
    """The authors' ``MaskingGenerator(input_size, num_masking_patches=None, min_num_patches=4,
    max_num_patches=None, min_aspect=0.3, max_aspect=None)``; ``__call__(num_masking_patches, rng,
    np_rng)`` returns a boolean ``[height, width]`` numpy mask with exactly that many patches set.

    >>> import random, numpy as np
    >>> gen = MaskingGenerator((14, 14), max_num_patches=98)
    >>> int(gen(60, random.Random(0), np.random.RandomState(0)).sum())
    60
    """

    def __init__(self, input_size: int | tuple[int, int], num_masking_patches: int | None = None,
                 min_num_patches: int = 4, max_num_patches: float | None = None, min_aspect: float = 0.3,
                 max_aspect: float | None = None):
        if not isinstance(input_size, tuple):
            input_size = (input_size, input_size)
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        most = num_masking_patches if max_num_patches is None else max_num_patches
        if most is None:
            raise ValueError("MaskingGenerator: give num_masking_patches or max_num_patches (the largest block)")
        self.max_num_patches: float = most
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (f"MaskingGenerator({self.height}, {self.width} -> [{self.min_num_patches} ~ {self.max_num_patches}], "
                f"aspect {math.exp(self.log_aspect_ratio[0]):.3f} ~ {math.exp(self.log_aspect_ratio[1]):.3f})")

    def _add_block(self, mask: np.ndarray, max_mask_patches: float, rng: random.Random) -> int:
        """One block of new patches (10 tries); how many patches it added."""
        added = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                already = int(mask[top:top + h, left:left + w].sum())
                if 0 < h * w - already <= max_mask_patches:  # new patches, not more than are left to mask
                    added += h * w - already
                    mask[top:top + h, left:left + w] = True
            if added > 0:
                break
        return added

    def __call__(self, num_masking_patches: int, rng: random.Random, np_rng: np.random.RandomState) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            left_to_mask = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, left_to_mask, rng)
            if added == 0:
                break
            count += added
        # Complete with patches drawn uniformly among the unmasked ones (the authors' np.random.choice, which
        # draws from the generator even for none).
        flat = mask.reshape(-1)
        extra = np_rng.choice(np.where(~flat)[0], size=num_masking_patches - int(flat.sum()), replace=False)
        flat[extra] = True
        return flat.reshape(mask.shape)


def max_num_patches(crop_size: int, patch_size: int) -> float:
    """The authors' ``max_num_patches=0.5 * img_size // patch_size * img_size // patch_size`` (train.py),
    evaluated left to right as Python does: half the patches when ``crop_size / patch_size`` is even."""
    return 0.5 * crop_size // patch_size * crop_size // patch_size


@dataclass
class BlockMasks:
    """The masks of a batch of global crops, as the authors' collate function returns them."""

    masks: torch.Tensor  # [n_crops, N] bool ("collated_masks"), crop-major like the crops
    indices: torch.Tensor  # [n_masked] int64: the masked patches' flat indices in masks ("mask_indices_list")
    weights: torch.Tensor  # [n_masked] float32: 1 / masked patches of the patch's crop ("masks_weight")
    upperbound: int  # sum of the masked crops' patch counts ("upperbound")

    @property
    def n_masked(self) -> int:
        return int(self.indices.shape[0])

    def to(self, device: torch.device) -> BlockMasks:
        return BlockMasks(self.masks.to(device, non_blocking=True), self.indices.to(device, non_blocking=True),
                          self.weights.to(device, non_blocking=True), self.upperbound)


def block_masks(n_crops: int, generator: MaskingGenerator, mask_ratio_min_max: tuple[float, float],
                mask_probability: float, rng: random.Random, np_rng: np.random.RandomState, *,
                random_circular_shift: bool = False) -> BlockMasks:
    """Masks for ``n_crops`` global crops of ``generator``'s patch grid (the authors' ``collate_data_and_cast``,
    its mask part, with ``B = n_crops``, ``N`` the grid's patches)."""
    N = generator.num_patches
    n_masked_crops = int(n_crops * mask_probability)
    probs = torch.linspace(*mask_ratio_min_max, n_masked_crops + 1)
    upperbound = 0
    masks = []
    for i in range(n_masked_crops):
        prob_max = probs[i + 1]
        mask = torch.from_numpy(generator(int(N * prob_max), rng, np_rng))
        if random_circular_shift:
            shift = (rng.randint(0, mask.shape[0] - 1), rng.randint(0, mask.shape[1] - 1))
            mask = torch.roll(mask, shift, (0, 1))
        masks.append(mask)
        upperbound += int(N * prob_max)
    for _ in range(n_masked_crops, n_crops):
        masks.append(torch.from_numpy(generator(0, rng, np_rng)))
    rng.shuffle(masks)
    flat = torch.stack(masks).flatten(1) if masks else torch.zeros(0, N, dtype=torch.bool)
    indices = flat.flatten().nonzero().flatten()
    weights = (1 / flat.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(flat)[flat]
    return BlockMasks(flat, indices, weights.float(), upperbound)

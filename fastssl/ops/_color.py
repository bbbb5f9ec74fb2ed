"""The DINO colour pipeline on uint8 crops on the CPU: the C++ op ``fastssl::dino_color_u8``
(``csrc/dino_color.cpp``), with PIL's 8-bit arithmetic per step, as the authors' pipeline runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ext

__all__ = ["dino_color_u8"]


def dino_color_u8(crops: torch.Tensor, order: torch.Tensor, factors: torch.Tensor, jitter: torch.Tensor,
                  grayscale: torch.Tensor, blur: torch.Tensor, solarize: torch.Tensor, sigma: torch.Tensor,
                  kernel_size: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """ColorJitter (ops in ``order``, factors ``[N, 4]`` brightness, contrast, saturation, hue),
    grayscale, Gaussian blur (``sigma``, odd ``kernel_size``), solarisation, each where its ``[N]``
    bool flag holds, then ``(x / 255 - mean) / std``: float32 ``[N, 3, S, S]`` from uint8 CPU crops."""
    if _ext.loaded() is None:
        _ext.load_extension()
    return torch.ops.fastssl.dino_color_u8(
        crops.contiguous(), order.long().contiguous(), factors.float().contiguous(), jitter.bool().contiguous(),
        grayscale.bool().contiguous(), blur.bool().contiguous(), solarize.bool().contiguous(),
        sigma.float().contiguous(), kernel_size.long().contiguous(), torch.tensor(mean, dtype=torch.float32),
        torch.tensor(std, dtype=torch.float32))

"""C++/CUDA ops (the ``fastssl._C`` extension, built at install time or just in time on first use).

* :func:`resized_crops`: every crop of a batch cropped, resized, flipped and normalised in one launch.
"""

from ._crops import resized_crops

__all__ = ["resized_crops"]

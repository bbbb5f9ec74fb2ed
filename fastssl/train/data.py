"""Training data: an ``ImageFolder``-style directory, or the digits that scikit-learn ships.

Images travel as uint8 ``[3, H, W]`` tensors of their own sizes (a list per batch); the
augmentation crops and resizes them on the device. JPEG files can be decoded on the GPU
(``torchvision.io.decode_jpeg(device="cuda")``): the loader workers then only read bytes.
An unreadable or corrupt image is skipped with a warning and counted, never a crash.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from .errors import DataError

__all__ = ["Batch", "DataError", "DigitsImages", "ImageFolder", "LabelledSubset", "ResumableSampler", "StreamSampler",
           "collate", "decode_batch", "labelled_subset", "load_digits_split", "training_sets"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_JPEG = (".jpg", ".jpeg")


# ----------------------------------------------------------------------------- decoding

def _decode_file(path: str) -> torch.Tensor:
    """uint8 ``[3, H, W]``: torchvision's decoders, PIL for the formats they lack."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError:
        from PIL import Image  # bmp, tif: formats torchvision.io does not decode

        with Image.open(path) as im:
            im = im.convert("RGB")
            return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3) \
                .permute(2, 0, 1).contiguous()


def _warn_skipped(path: str, err: Exception) -> None:
    warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)


class ImageFolder(Dataset):
    """``root/<class>/<image>`` (or images directly in ``root``, one class), sorted like torchvision's.

    ``__getitem__`` returns ``(image, label, index)``: ``image`` a uint8 ``[3, H, W]`` tensor,
    the file's bytes (a 1-D uint8 tensor) for JPEGs when ``raw_jpeg`` (decoded later on the
    GPU), or None when the file cannot be read (a warning; :func:`collate` drops and counts it).
    A missing folder or one without images raises :class:`DataError` at construction.
    """

    def __init__(self, root: str | os.PathLike, *, raw_jpeg: bool = False, extensions=IMG_EXTENSIONS):
        root = Path(root).expanduser()
        if not root.exists():
            raise DataError(f"data folder {str(root)!r} does not exist")
        if not root.is_dir():
            raise DataError(f"data path {str(root)!r} is not a folder (expected root/<class>/<image> files)")
        try:
            classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
            samples = []
            for label, name in enumerate(classes):
                for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
                    samples += [(os.path.join(dirpath, f), label) for f in sorted(files)
                                if f.lower().endswith(extensions)]
            if not classes:  # a flat folder of images: one class
                classes = [root.name]
                samples = [(str(root / f), 0) for f in sorted(os.listdir(root)) if f.lower().endswith(extensions)]
        except OSError as e:  # no permission to list it, say
            raise DataError(f"data folder {str(root)!r} cannot be read: {e.strerror or e}") from e
        if not samples:
            raise DataError(f"no images ({', '.join(extensions)}) found in {str(root)!r}; expected "
                            "root/<class>/<image> files")
        self.root, self.classes, self.samples = root, classes, samples
        self.targets = [label for _, label in samples]
        self.raw_jpeg = raw_jpeg

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            if self.raw_jpeg and path.lower().endswith(_JPEG):
                from torchvision.io import read_file

                data = read_file(path)
                if data.numel() == 0:
                    raise RuntimeError("empty file")
                return data, label, index
            return _decode_file(path), label, index
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, never a crash mid-epoch
            _warn_skipped(path, e)
            return None, label, index


# ----------------------------------------------------------------------------- the digits of `make demo`

def load_digits_split(size: int = 32, test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's 1797 handwritten digits (8x8, 0..16) as uint8 RGB ``size x size`` images.

    Returns ``(train_images, train_labels, test_images, test_labels)``, a fixed stratified split:
    DINO trains on the train images without labels; k-NN uses the train labels as its bank and
    scores the held-out test images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.round().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    tr, te = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction, stratify=y.numpy(),
                              random_state=seed)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return x[tr], y[tr], x[te], y[te]


class DigitsImages(Dataset):
    """In-memory uint8 images ``[N, 3, H, W]`` with labels, as ``(image, label, index)`` items."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes=None):
        self.images, self.labels = images, labels
        self.targets = labels.tolist()
        self.classes = classes or [str(c) for c in range(int(labels.max()) + 1)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index]), index


# ----------------------------------------------------------------------------- the labelled part (PAWS)

class LabelledSubset(Dataset):
    """The images of ``dataset`` at ``indices``, with their labels (``targets``) and ``classes``."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        self.targets = [dataset.targets[i] for i in self.indices]
        self.classes = dataset.classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, label, _ = self.dataset[self.indices[index]]
        return image, label, index


def labelled_subset(dataset, *, names_file: str | os.PathLike | None = None, per_class: int | None = None,
                    seed: int = 0) -> LabelledSubset:
    """The labelled images of a PAWS run: those named in ``names_file``, or ``per_class`` of each class.

    ``names_file`` holds one image file name per line (the authors' ``imagenet_subsets/1percent.txt`` and
    ``10percent.txt`` format, e.g. ``n01440764_10026.JPEG``; a relative path inside the folder works too;
    blank lines and ``#`` comments are skipped); every name must match an image of ``dataset`` (an
    :class:`ImageFolder`). ``per_class`` draws that many images of every class, seeded; with neither,
    every image is labelled.
    """
    if names_file is not None and per_class is not None:
        raise DataError("give either a file of labelled image names or a number of labelled images per class, "
                        "not both")
    if names_file is not None:
        path = Path(names_file).expanduser()
        if not path.is_file():
            raise DataError(f"labelled-image list {str(path)!r} does not exist")
        names = [line.strip() for line in path.read_text().splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
        if not names:
            raise DataError(f"labelled-image list {str(path)!r} names no images")
        samples = getattr(dataset, "samples", None)
        if samples is None:
            raise DataError("a labelled-image list needs an image folder (file names to match)")
        root = str(dataset.root)
        by_name: dict[str, int] = {}
        for i, (file, _) in enumerate(samples):
            by_name.setdefault(os.path.basename(file), i)
            by_name.setdefault(os.path.relpath(file, root), i)
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DataError(f"{len(missing)} of the {len(names)} images named in {str(path)!r} are not in "
                            f"{root!r}, e.g. {missing[:3]}")
        return LabelledSubset(dataset, sorted({by_name[n] for n in names}))
    targets = torch.as_tensor(dataset.targets)
    if per_class is None:
        return LabelledSubset(dataset, range(len(targets)))
    if per_class < 1:
        raise DataError(f"labelled images per class must be positive, got {per_class}")
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(targets).tolist():
        pool = torch.nonzero(targets == c).flatten()
        if len(pool) < per_class:
            raise DataError(f"class {dataset.classes[c]!r} has {len(pool)} images, fewer than the {per_class} "
                            "labelled images per class asked for")
        keep += pool[torch.randperm(len(pool), generator=g)[:per_class]].tolist()
    return LabelledSubset(dataset, sorted(keep))


# ----------------------------------------------------------------------------- batches

@dataclass
class Batch:
    images: torch.Tensor | list[torch.Tensor]  # uint8 [B, 3, H, W], or a list of [3, H_i, W_i] / JPEG bytes
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: int  # unreadable images dropped from this batch

    def pin_memory(self) -> Batch:
        """What ``DataLoader(pin_memory=True)`` calls: page-locked copies, so the copies to the GPU
        (``non_blocking=True``) overlap with compute."""
        images = self.images.pin_memory() if isinstance(self.images, torch.Tensor) else \
            [im.pin_memory() for im in self.images]
        return Batch(images, self.labels.pin_memory(), self.indices.pin_memory(), self.skipped)


def collate(items) -> Batch:
    """Drop unreadable images (counted), stack same-sized images, else keep a list."""
    kept = [it for it in items if it[0] is not None]
    listed: list[torch.Tensor] = [it[0] for it in kept]
    images: torch.Tensor | list[torch.Tensor] = listed
    if listed and all(im.dim() == 3 and im.shape == listed[0].shape for im in listed):
        images = torch.stack(listed)
    return Batch(images, torch.tensor([it[1] for it in kept], dtype=torch.int64),
                 torch.tensor([it[2] for it in kept], dtype=torch.int64), len(items) - len(kept))


def gpu_jpeg_decoding_available(device: torch.device) -> bool:
    """Whether ``decode_jpeg(device=...)`` works here (torchvision built with nvJPEG, a GPU)."""
    if device.type != "cuda":
        return False
    try:
        from torchvision.io import decode_jpeg, encode_jpeg

        data = encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))
        decode_jpeg([data], device=device)
        return True
    except Exception:  # noqa: BLE001 - any failure means: decode in the workers
        return False


def decode_batch(batch: Batch, device: torch.device) -> tuple[torch.Tensor | list[torch.Tensor], int]:
    """The batch's images on ``device``, JPEG bytes decoded there; returns ``(images, newly skipped)``."""
    images = batch.images
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True), 0
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = [i for i, im in enumerate(images) if im.dim() == 1]
    out: list[torch.Tensor | None] = [None if im.dim() == 1 else im.to(device, non_blocking=True) for im in images]
    if raw:
        with _decode_stream(device) as main:
            try:
                decoded = decode_jpeg([images[i] for i in raw], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # one bad file fails the batched call: decode one by one
                decoded = []
                for i in raw:
                    try:
                        decoded.append(decode_jpeg(images[i], mode=ImageReadMode.RGB, device=device))
                    except RuntimeError:
                        decoded.append(_decode_on_cpu(images[i], f"#{int(batch.indices[i])}", device))
            for im in decoded:
                if im is not None:
                    im.record_stream(main)
        for i, im in zip(raw, decoded, strict=True):
            out[i] = im
    kept = [im for im in out if im is not None]
    return kept, len(out) - len(kept)


def _decode_on_cpu(data: torch.Tensor, name: str, device: torch.device) -> torch.Tensor | None:
    """What nvJPEG refuses (CMYK JPEGs, a PNG named .jpg: both occur in ImageNet) decoded on the
    host; None, with a warning, when that fails too."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(data, mode=ImageReadMode.RGB).to(device, non_blocking=True)
    except RuntimeError as e:
        _warn_skipped(name, e)
        return None


_DECODE_STREAMS: dict[int, torch.cuda.Stream] = {}


@contextlib.contextmanager
def _decode_stream(device: torch.device):
    """Run GPU JPEG decoding on a stream of its own and hand its outputs to the current stream.

    nvJPEG's hardware decoder does not honour stream order (torchvision allocates the outputs on
    the current stream, and the decoder may write them while queued kernels still read a block
    the caching allocator just recycled: pytorch/vision#9606, meta-pytorch/torchcodec#1634).
    Here the outputs come from a stream only decoding uses, whose blocks are recycled only after
    the consumers recorded with ``record_stream`` are done, and the host waits for the decode
    itself (not for the training step queued before it). Yields the consuming stream.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    side = _DECODE_STREAMS.get(index)
    if side is None:
        side = _DECODE_STREAMS[index] = torch.cuda.Stream(device=index)
    main = torch.cuda.current_stream(index)
    with torch.cuda.stream(side):
        yield main
    side.synchronize()
    main.wait_stream(side)


class ResumableSampler(Sampler):
    """Each rank's share of a per-epoch permutation (``DistributedSampler``'s split), from any position.

    The order of epoch ``e`` depends only on ``(seed, e)``, so a run resumed in the middle of an
    epoch (``set_epoch(e, start=i)``, ``i`` samples already seen by this rank) sees exactly the
    samples the uninterrupted run would have.
    """

    def __init__(self, n: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.per_rank = -(-n // world_size)  # padded, as DistributedSampler (drop_last=False)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        order += order[: total - len(order)]
        return iter(order[self.rank:total:self.world_size][self.start:])


class StreamSampler(Sampler):
    """This rank's share of an endless stream of images: permutation after permutation of the data set (pass
    ``p``'s order depends only on ``(seed, p)``, as :class:`ResumableSampler`'s epochs), a global batch of
    ``batch * world_size`` consecutive stream positions per step, rank ``r`` taking the ``r``-th ``batch`` of
    them. Batches run across the end of a pass, as the DINOv2 / DINOv3 authors' infinite sampler, so an epoch
    can be any number of iterations (their ``OFFICIAL_EPOCH_LENGTH``). Starts at step ``start_step``: a resumed
    run sees exactly the images of the uninterrupted one."""

    def __init__(self, n: int, batch: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_step: int = 0):
        if n < 1 or batch < 1:
            raise ValueError(f"StreamSampler: n={n} and batch={batch} must be positive")
        self.n, self.batch, self.seed, self.rank, self.world_size = n, batch, seed, rank, world_size
        self.start_step = start_step
        self._orders: dict[int, list[int]] = {}

    def _order(self, p: int) -> list[int]:
        if p not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k >= p - 1}  # keep the last pass or two
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + p)
            self._orders[p] = torch.randperm(self.n, generator=g).tolist()
        return self._orders[p]

    def __iter__(self):
        step = self.start_step
        while True:
            first = (step * self.world_size + self.rank) * self.batch
            for q in range(first, first + self.batch):
                yield self._order(q // self.n)[q % self.n]
            step += 1


def training_sets(data: str, *, digits_size: int = 32, knn_data: str | None = None, knn_val_data: str | None = None,
                  raw_jpeg: bool = False) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """``(train set, k-NN bank or None, k-NN query set or None)`` of a run's ``--data`` (a folder, or 'digits':
    the train digits, and the train / held-out digits as bank and queries); folder errors come from here,
    before any file or GPU work."""
    if data == "digits":
        xtr, ytr, xte, yte = load_digits_split(digits_size)
        train = DigitsImages(xtr, ytr)
        return train, train, DigitsImages(xte, yte)
    folder = ImageFolder(data, raw_jpeg=raw_jpeg)
    bank = ImageFolder(knn_data) if knn_data else None
    query = ImageFolder(knn_val_data) if knn_val_data else None
    return folder, bank, query

"""Datasets by name or path, and the batches training and evaluation read.

Datasets that fit in memory (digits, MNIST, CIFAR) are held as one uint8 tensor already at the
model's input size; their augmentation runs batched on the training device. Folders are read
file by file through the shared loader in `edgeft.preprocess`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from edgeft.config import BUILTIN_DATASETS
from edgeft.errors import InputError
from edgeft.preprocess import IMAGE_EXTENSIONS, FileScan, Preprocess, load_image, preprocess_image, to_array

__all__ = [
    "BUILTIN_DATASETS",
    "DataBundle",
    "FolderImages",
    "FolderLoaders",
    "TensorImages",
    "augment_batch",
    "iterate_batches",
    "UnreadableFiles",
    "shard_indices",
    "load_checkpoint_data",
    "load_data",
    "size_from_data",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TensorImages:
    """A split held in memory: uint8 images (N, C, size, size) at the model's input size."""

    images: torch.Tensor
    labels: torch.Tensor  # int64 (N,)
    raw: np.ndarray | None = None  # the images as stored (uint8, before resizing): what validation decodes

    def __len__(self) -> int:
        return len(self.labels)


class UnreadableFiles:
    """The files of a folder dataset that could not be read (at start-up or when decoded later),
    with their reasons; more than `max_fraction` of `total` raises InputError."""

    def __init__(self, root: Path, total: int, max_fraction: float):
        self.root, self.total, self.max_fraction = root, total, max_fraction
        self.found: dict[str, str] = {}

    def add(self, *found: tuple[str | Path, str]) -> None:
        """Record (path, reason) pairs; raise past the limit, else warn about the new ones."""
        new = {str(path): reason for path, reason in found if str(path) not in self.found}
        self.found.update(new)
        if len(self.found) > self.max_fraction * self.total:
            raise InputError(
                f"{len(self.found)} of {self.total} files in {self.root} are not readable images "
                f"(more than {self.max_fraction:.0%}), e.g. {next(iter(self.found.values()))}"
            )
        for reason in new.values():
            log.warning("skipped %s", reason)


_DECODE_ERRORS = (InputError, OSError, ValueError, SyntaxError, EOFError)  # the loader's, and what Pillow raises


class FolderImages(torch.utils.data.Dataset):
    """A split of image files; `augment` picks the training or the eval transform. Indexed by
    position (raises on an unreadable file), or by (position, seed) as the batch loader does:
    the augmentation then depends on that seed only, and an unreadable file gives None."""

    def __init__(
        self,
        files: list[tuple[Path, int]],
        preprocess: Preprocess,
        augment: str = "none",
        flips: bool = True,
        unreadable: UnreadableFiles | None = None,
    ):
        self.files = files
        self.preprocess = preprocess
        self.labels = torch.tensor([label for _, label in files], dtype=torch.int64)
        self.transform = _folder_train_transform(preprocess, augment, flips) if augment != "none" else None
        self.unreadable = unreadable

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | tuple[int, int]):
        if not isinstance(key, tuple):
            return self._load(key)
        index, seed = key
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x, label = self._load(index)
            return x, label, "", ""
        except _DECODE_ERRORS as exc:
            path, label = self.files[index]
            reason = str(exc) if isinstance(exc, InputError) else f"{path}: {exc}"
            return None, label, str(path), reason

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[index]
        if self.transform is None:
            return torch.from_numpy(preprocess_image(path, self.preprocess)), label
        return self.transform(load_image(path, channels=self.preprocess.channels)), label


@dataclass
class DataBundle:
    """A dataset ready to train on: both splits, class names, and the eval preprocessing."""

    name: str
    classes: list[str]
    preprocess: Preprocess
    train: TensorImages | FolderImages
    val: TensorImages | FolderImages
    flips: bool  # horizontal flips keep the label (not for digits)
    skipped_files: int = 0  # unreadable images and non-image files left out of a folder dataset at start-up
    skipped_examples: tuple[str, ...] = ()  # the first few, with their reasons
    unreadable: UnreadableFiles | None = None  # folders: every unreadable file so far (start-up and later)
    size_from_data: bool = False  # the input size was chosen from the images' sizes

    def skipped(self) -> tuple[int, list[str]]:
        """Files left out so far (at start-up, and found unreadable since), and a few examples."""
        if self.unreadable is None:
            return self.skipped_files, list(self.skipped_examples)
        later = [reason for reason in self.unreadable.found.values() if reason not in self.skipped_examples]
        return self.skipped_files + len(later), list(self.skipped_examples) + later[:5]


def default_preprocess(*, size: int, channels: int, resize: int | None = None) -> Preprocess:
    mean = IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,)
    std = IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,)
    return Preprocess(size=size, resize=resize or size, mean=mean, std=std, channels=channels)


def load_data(
    data: str,
    *,
    root: str | Path = "data",
    img_size: int | None = None,
    channels: int | None = None,
    val_split: float = 0.2,
    seed: int = 0,
    max_bad_fraction: float = 0.01,
    preprocess: Preprocess | None = None,
) -> DataBundle:
    """`data` is a built-in name (digits, mnist, fashion-mnist, cifar10, cifar100; the last four
    under `root`) or an ImageFolder directory (with train/ and val/, or split by `val_split`).
    Without `img_size`, built-in data is read at 32 px and a folder at `size_from_data` of its
    images. `preprocess` replaces the data's default (an exported model's own, when validating it)."""
    if not 0.0 < val_split < 1.0:
        raise InputError(f"--val-split must be between 0 and 1 (exclusive), got {val_split}")
    if img_size is not None and not 8 <= img_size <= 1024:
        raise InputError(f"--img-size must be between 8 and 1024, got {img_size}")
    if channels not in (None, 1, 3):
        raise InputError(f"--channels must be 1 or 3, got {channels}")
    if data == "digits":
        return _digits(preprocess or default_preprocess(size=img_size or 32, channels=channels or 1), val_split, seed)
    if data in BUILTIN_DATASETS:
        native = default_preprocess(size=img_size or 32, channels=channels or (1 if "mnist" in data else 3))
        return _torchvision_dataset(data, Path(root), preprocess or native)
    path = Path(data)
    if not path.is_dir():
        raise InputError(f"--data {data!r} is neither a folder nor one of: {', '.join(BUILTIN_DATASETS)}")
    return _folder(path, img_size, channels, val_split, seed, max_bad_fraction, preprocess)


# --- in-memory datasets ---------------------------------------------------------------------


def _to_tensor_images(arrays: np.ndarray, labels: np.ndarray, spec: Preprocess) -> TensorImages:
    """Resize raw uint8 images with the shared preprocessing, so evaluation here equals
    `preprocess_image` on the same pixels saved as a file."""
    resized = [to_array(load_image(Image.fromarray(a), channels=spec.channels), spec) for a in arrays]
    images = np.stack(resized).reshape(len(resized), spec.size, spec.size, -1).transpose(0, 3, 1, 2)
    labels = torch.from_numpy(labels.astype(np.int64))
    return TensorImages(torch.from_numpy(np.ascontiguousarray(images)), labels, raw=np.asarray(arrays, dtype=np.uint8))


def _digits(spec: Preprocess, val_split: float, seed: int) -> DataBundle:
    with resources.files("edgeft").joinpath("assets/digits.npz").open("rb") as f:
        arrays = np.load(f)
        images, labels = arrays["images"], arrays["labels"]
    train_idx, val_idx = _stratified_split(labels.tolist(), val_split, seed)
    return DataBundle(
        name="digits",
        classes=[str(d) for d in range(10)],
        preprocess=spec,
        train=_to_tensor_images(images[train_idx], labels[train_idx], spec),
        val=_to_tensor_images(images[val_idx], labels[val_idx], spec),
        flips=False,
    )


def _torchvision_dataset(name: str, root: Path, spec: Preprocess) -> DataBundle:
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[
        name
    ]
    splits = []
    existed = root.exists()
    for train in (True, False):
        try:
            dataset = cls(str(root), train=train, download=True)
        except Exception as exc:  # noqa: BLE001 - URLError, RuntimeError, HTTPError: all mean "not here"
            _remove_empty_folders(root, keep_root=existed)
            raise InputError(
                f"{name} is not under {root.resolve()} and could not be downloaded ({exc}); on a connected "
                f"machine, download {_archives(cls, root.resolve())}, or pass --data-root"
            ) from None
        arrays = np.asarray(dataset.data)
        splits.append(_to_tensor_images(arrays, np.asarray(dataset.targets), spec))
    return DataBundle(name, list(dataset.classes), spec, splits[0], splits[1], flips=name != "mnist")


def _archives(cls, root: Path) -> str:
    """Which files a torchvision dataset class reads, from where, into which folder."""
    if getattr(cls, "resources", None):  # MNIST and Fashion-MNIST: four .gz files in <root>/<class>/raw
        names = ", ".join(name for name, _ in cls.resources)
        return f"{names} from {cls.mirrors[0]} into {root / cls.__name__ / 'raw'}/"
    return f"{cls.url} into {root}/ (it is unpacked there)"  # CIFAR: one archive


def _remove_empty_folders(root: Path, *, keep_root: bool) -> None:
    """Remove the empty folders a failed download left under `root` (and `root` itself, unless it existed)."""
    if not root.is_dir():
        return
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    if not keep_root and not any(root.iterdir()):
        root.rmdir()


# --- folders --------------------------------------------------------------------------------


def _folder(
    root: Path,
    size: int | None,
    channels: int | None,
    val_split: float,
    seed: int,
    max_bad: float,
    preprocess: Preprocess | None,
) -> DataBundle:
    split_folders = (root / "train").is_dir() and (root / "val").is_dir()
    if split_folders:
        classes, (train_files, val_files), others = _scan([root / "train", root / "val"])
    else:
        classes, (files,), others = _scan([root])
        train_idx, val_idx = _stratified_split([label for _, label in files], val_split, seed)
        train_files, val_files = [files[i] for i in train_idx], [files[i] for i in val_idx]
    all_files = train_files + val_files
    headers, errors = _read_headers([path for path, _ in all_files])
    unreadable = UnreadableFiles(root, len(all_files), max_bad)
    unreadable.add(*errors)
    if channels is None:
        channels = 1 if headers and all(mode in _GRAY_MODES for mode, _ in headers) else 3
    chosen = size or size_from_data([short for _, short in headers])
    spec = preprocess or default_preprocess(size=chosen, channels=channels, resize=math.floor(chosen / 0.875))
    bad = {path for path, _ in errors}
    keep = lambda files: [(p, label) for p, label in files if p not in bad]  # noqa: E731
    train, val = keep(train_files), keep(val_files)
    if not val:
        raise InputError(
            f"{root}/val holds no readable images; add some"
            if split_folders
            else f"{root}: the validation split is empty: a class needs at least 2 images to be split "
            f"(one for validation); add images, or give {root}/train and {root}/val"
        )
    return DataBundle(
        name=str(root),
        classes=classes,
        preprocess=spec,
        train=FolderImages(train, spec, unreadable=unreadable),
        val=FolderImages(val, spec, unreadable=unreadable),
        flips=True,
        skipped_files=len(bad) + len(others),
        skipped_examples=tuple([reason for _, reason in errors[:5]] + [f"{p}: not an image file" for p in others[:5]]),
        unreadable=unreadable,
        size_from_data=size is None and preprocess is None,
    )


_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def size_from_data(short_sides: list[int]) -> int:
    """The input side for images of these shorter sides: their median rounded up to a multiple
    of 32, between 32 and 224."""
    if not short_sides:
        return 224
    median = float(np.median(short_sides))
    return int(min(224, max(32, math.ceil(median / 32) * 32)))


def _scan(roots: list[Path]) -> tuple[list[str], list[list[tuple[Path, int]]], list[Path]]:
    """Class folders (sorted, the same in each root), the image files of each root (by extension,
    as torchvision's ImageFolder), and the other visible files, which are skipped. One
    `FileScan`: no symlinked folder is followed, and no file is listed twice (not in two
    classes, not in train and val)."""
    scan = FileScan()
    names = [[folder.name for folder in scan.folders(root)] for root in roots]
    if any(found != names[0] for found in names):
        raise InputError(f"{roots[0]} and {roots[1]} have different class folders")
    per_root, others = [], []
    for root in roots:
        visible = [(path, label) for label, name in enumerate(names[0]) for path in scan.files(root / name)]
        files = [(path, label) for path, label in visible if path.suffix.lower() in IMAGE_EXTENSIONS]
        others += [path for path, _ in visible if path.suffix.lower() not in IMAGE_EXTENSIONS]
        _check_classes(root, names[0], files)
        per_root.append(files)
    scan.log_skipped(roots[0].parent if len(roots) > 1 else roots[0])
    return names[0], per_root, others


def _check_classes(root: Path, classes: list[str], files: list[tuple[Path, int]]) -> None:
    """At least 2 classes, each with images."""
    if not files:
        raise InputError(f"{root} holds no images in class sub-folders (expected {root}/<class>/<image>)")
    used = sorted({label for _, label in files})
    if len(used) < 2:
        raise InputError(f"{root} has {len(used)} class folder with images; a classifier needs at least 2")
    if len(used) < len(classes):
        empty = [classes[i] for i in range(len(classes)) if i not in used]
        raise InputError(f"{root}: class folders without images: {', '.join(empty)}")


def _read_headers(paths: list[Path]) -> tuple[list[tuple[str, int]], list[tuple[Path, str]]]:
    """Read each file's header only (format, mode, size; no pixels): (mode, shorter side) of the
    readable ones, and (path, reason) for the others. (Pillow parses headers in Python: threads
    do not make it faster.)"""
    results = [_header(path) for path in paths]
    headers = [found for found, _ in results if found is not None]
    errors = [(path, reason) for path, (_, reason) in zip(paths, results) if reason is not None]
    return headers, errors


def _header(path: Path) -> tuple[tuple[str, int] | None, str | None]:
    try:
        with Image.open(path) as img:
            return (img.mode, min(img.size)), None
    except Exception as exc:  # noqa: BLE001 - anything Pillow raises marks the file as bad
        return None, f"{path}: {exc}"


def _stratified_split(labels: list[int], val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a per-class shuffled split; every class with >= 2 items is in both splits."""
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    train, val = [], []
    for label in sorted(by_class):
        indices = by_class[label]
        order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        n_val = min(max(1, round(len(order) * val_split)), len(order) - 1) if len(order) > 1 else 0
        val += order[:n_val]
        train += order[n_val:]
    return sorted(train), sorted(val)


# --- augmentation and batches ---------------------------------------------------------------

_PRESETS = {  # translate: fraction of the side; rotate: degrees; scale: +-; jitter: brightness/contrast +-
    "none": dict(translate=0.0, rotate=0.0, scale=0.0, jitter=0.0),
    "light": dict(translate=0.08, rotate=0.0, scale=0.0, jitter=0.0),
    "standard": dict(translate=0.08, rotate=12.0, scale=0.1, jitter=0.2),
}


def augment_batch(x: torch.Tensor, preset: str, *, flips: bool, generator: torch.Generator) -> torch.Tensor:
    """Random affine (shift, rotation, scale, horizontal flip) and brightness/contrast jitter for
    a float batch in [0, 1], one draw per image, in one pass on whatever device `x` lives on."""
    p = _PRESETS[preset]
    n = x.shape[0]
    if preset == "none":
        return x

    def uniform(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=generator) * 2 - 1).to(x.device)

    angle = uniform(n) * math.radians(p["rotate"])
    scale = 1 + uniform(n) * p["scale"]
    flip = torch.ones(n, device=x.device)
    if flips:
        flip = torch.where(torch.rand(n, generator=generator).to(x.device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = torch.cos(angle) / scale * flip
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale * flip
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, :, 2] = uniform(n, 2) * 2 * p["translate"]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if p["jitter"]:
        brightness = 1 + uniform(n, 1, 1, 1) * p["jitter"]
        contrast = 1 + uniform(n, 1, 1, 1) * p["jitter"]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean) * brightness
        x = x.clamp_(0, 1)
    return x


def _folder_train_transform(spec: Preprocess, augment: str, flips: bool):
    """torchvision transforms for one training image from a folder (PIL in, tensor out)."""
    from torchvision.transforms import v2

    p = _PRESETS[augment]
    min_scale = 0.35 if augment == "standard" else 0.6
    steps = [v2.PILToTensor(), v2.RandomResizedCrop(spec.size, scale=(min_scale, 1.0), antialias=True)]
    if flips:
        steps.append(v2.RandomHorizontalFlip())
    if p["jitter"]:
        steps.append(v2.ColorJitter(brightness=p["jitter"], contrast=p["jitter"], saturation=p["jitter"]))
    if p["rotate"]:
        steps.append(v2.RandomRotation(p["rotate"]))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
    return v2.Compose(steps)


def shard_indices(n: int, *, shuffle: bool, seed: int, rank: int = 0, world: int = 1, pad: bool = True) -> torch.Tensor:
    """This rank's share of 0..n-1 (shuffled by `seed`, the same on every rank), as
    DistributedSampler splits it; `pad` repeats a few indices so every rank gets as many."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    if world > 1 and pad and n % world:
        total = math.ceil(n / world) * world
        order = order.repeat(math.ceil(total / n))[:total]  # cyclic, also when n < world
    return order[rank::world]


def iterate_batches(
    split: TensorImages | FolderImages,
    *,
    batch_size: int,
    preprocess: Preprocess,
    device: torch.device,
    shuffle: bool = False,
    augment: str = "none",
    flips: bool = False,
    seed: int = 0,
    workers: int = 0,
    rank: int = 0,
    world: int = 1,
    pad: bool = True,
    loaders: FolderLoaders | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalized float batches (and int64 labels) on `device`, from this rank's shard of the
    split; order and augmentation depend on `seed` (and the rank) only, so a resumed run sees
    the same epochs. In-memory images may already live on `device` (then nothing is copied).
    A folder is read by `workers` processes: those of `loaders`, kept for the next pass, or
    else started for this pass only."""
    if isinstance(split, TensorImages):
        indices = shard_indices(len(split), shuffle=shuffle, seed=seed, rank=rank, world=world, pad=pad)
        generator = torch.Generator().manual_seed(seed * 7919 + rank + 1)  # augmentation draws differ per rank
        indices = indices.to(split.images.device)
        mean = torch.tensor(preprocess.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(preprocess.std, device=device).view(1, -1, 1, 1)
        for start in range(0, len(indices), batch_size):
            index = indices[start : start + batch_size]
            x = split.images[index].to(device, non_blocking=True).float().div_(255.0)
            if augment != "none":
                x = augment_batch(x, augment, flips=flips, generator=generator)
            yield (x - mean) / std, split.labels[index].to(device, non_blocking=True)
        return
    settings = dict(
        batch_size=batch_size,
        preprocess=preprocess,
        augment=augment,
        flips=flips,
        workers=workers,
        rank=rank,
        world=world,
        pad=pad,
        shuffle=shuffle,
        device=device,
    )
    loader = (
        loaders.get(split, **settings) if loaders is not None else _folder_loader(split, persistent=False, **settings)
    )
    loader.sampler.seed = seed
    for x, y, failed in loader:
        if failed and split.unreadable is None:
            raise InputError(failed[0][1])
        if failed:
            split.unreadable.add(*failed)  # raises past the folder's limit
        if x is not None:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class FolderLoaders:
    """The DataLoaders of one run over its folder splits, one per split and setting, kept so
    that their worker processes persist from epoch to epoch (each image's augmentation is
    seeded by the epoch's seed and its index, not by the worker); `close`, or the end of a
    `with` block, ends the workers."""

    def __init__(self) -> None:
        self._loaders: dict[tuple, torch.utils.data.DataLoader] = {}

    def __enter__(self) -> FolderLoaders:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def get(self, split: FolderImages, **settings) -> torch.utils.data.DataLoader:
        """The kept loader of `split` with these `iterate_batches` settings (made on first use)."""
        key = (split, *sorted(settings.items()))
        if key not in self._loaders:
            self._loaders[key] = _folder_loader(split, persistent=True, **settings)
        return self._loaders[key]

    def close(self) -> None:
        """End every worker process now, also those of a pass left half-read."""
        for loader in self._loaders.values():
            if loader._iterator is not None:  # torch has no public call that ends persistent workers
                loader._iterator._shutdown_workers()
        self._loaders.clear()


def _folder_loader(
    split: FolderImages,
    *,
    persistent: bool,
    batch_size: int,
    preprocess: Preprocess,
    augment: str,
    flips: bool,
    workers: int,
    rank: int,
    world: int,
    pad: bool,
    shuffle: bool,
    device: torch.device,
) -> torch.utils.data.DataLoader:
    """A DataLoader of (index, seed) items of `split`; `persistent` keeps its workers between passes."""
    dataset = FolderImages(split.files, preprocess, augment, flips) if augment != "none" else split
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=_ShardSampler(len(split), shuffle=shuffle, rank=rank, world=world, pad=pad),
        num_workers=workers,
        persistent_workers=persistent and workers > 0,
        collate_fn=_collate_readable,
        generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone
        pin_memory=device.type == "cuda",
    )


def _collate_readable(items: list[tuple]) -> tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[str, str]]]:
    """A batch of the readable images, and (path, reason) of the unreadable ones."""
    good = [(x, label) for x, label, _, _ in items if x is not None]
    failed = [(path, reason) for x, _, path, reason in items if x is None]
    if not good:
        return None, None, failed
    return torch.stack([x for x, _ in good]), torch.tensor([label for _, label in good]), failed


class _ShardSampler(torch.utils.data.Sampler):
    """(index, seed) pairs of `shard_indices` for the seed of the current pass (set before each
    epoch); the item seed makes an image's augmentation independent of which worker reads it."""

    def __init__(self, n: int, *, shuffle: bool, rank: int, world: int, pad: bool):
        self.n, self.shuffle, self.rank, self.world, self.pad, self.seed = n, shuffle, rank, world, pad, 0

    def _indices(self) -> torch.Tensor:
        return shard_indices(
            self.n, shuffle=self.shuffle, seed=self.seed, rank=self.rank, world=self.world, pad=self.pad
        )

    def __iter__(self):
        base = (self.seed * 1_000_003) % 2**62
        return iter([(index, base + index) for index in self._indices().tolist()])

    def __len__(self) -> int:  # without drawing the permutation
        return math.ceil(self.n / self.world) if self.pad else len(range(self.rank, self.n, self.world))


def load_checkpoint_data(checkpoint: dict, *, data: str | None = None, data_root: str | None = None) -> DataBundle:
    """The data a checkpoint was trained on (same split, same seed), or `data` instead, read with
    the checkpoint's own preprocessing; the class names must match the checkpoint's."""
    config = checkpoint.get("config", {})
    source = data or config.get("data")
    if not source:
        raise InputError("the checkpoint does not record its data; pass --data")
    bundle = load_data(
        source,
        root=data_root or config.get("data_root", "data"),
        val_split=config.get("val_split", 0.2),
        seed=config.get("seed", 0),
        preprocess=Preprocess.from_dict(checkpoint["preprocess"]),
    )
    if list(bundle.classes) != list(checkpoint["classes"]):
        raise InputError(f"--data {source}: classes {bundle.classes} differ from the model's {checkpoint['classes']}")
    return bundle

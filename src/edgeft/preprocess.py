"""The one image loader and the one preprocessing function, shared by training, validation and
prediction. Pillow and numpy only: the predictor imports this without torch."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from edgeft.errors import InputError

__all__ = [
    "ALPHA_BACKGROUND",
    "IMAGE_EXTENSIONS",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "MAX_RESIZED_PIXELS",
    "MAX_SIDE",
    "FileScan",
    "Preprocess",
    "check_size",
    "first_images",
    "image_files",
    "load_image",
    "normalize",
    "preprocess_image",
    "resized_size",
    "to_array",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
MAX_FILE_BYTES = 200 * 1024 * 1024  # larger files are refused before they are opened
MAX_PIXELS = 50_000_000  # more is refused as a decompression bomb; a rotated 50 M pixel photo decodes in ~400 MB
MAX_SIDE = 2048  # the largest size and resize a preprocessing spec may ask for
MAX_RESIZED_PIXELS = 16_000_000  # an image this large once resized to the model's size is refused (long, thin)
ALPHA_BACKGROUND = 255  # transparent pixels are composited on white
_BLOCK_PIXELS = 1 << 20  # large images change mode this many pixels at a time

# MAX_PIXELS is checked here, explicitly, from the header; Pillow's own warning (at a higher
# count) would only repeat it. Set once at import: warnings filters are process-wide and changing
# them inside decoder threads is not thread-safe.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Pillow allocates large images in blocks (16 MiB by default). Blocks over glibc's largest mmap
# threshold (32 MiB) go back to the system when freed; smaller ones stay in each decoder thread's
# malloc arena, so every thread would keep the memory of the last large image it decoded.
if "PILLOW_BLOCK_SIZE" not in os.environ:
    Image.core.set_block_size(64 * 2**20)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input: shorter side resized to `resize`, centre crop of
    `size`, scaled to [0, 1], normalized per channel."""

    size: int  # side of the square input the model sees
    resize: int  # shorter side before the centre crop (>= size)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3  # 1: grayscale model, 3: RGB model
    interpolation: str = "bilinear"  # nearest | bilinear | bicubic

    def __post_init__(self) -> None:
        _check_mean_std(self.mean, self.std)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.size, self.resize, self.channels)):
            raise InputError(
                "preprocess: size, resize and channels must be integers, "
                f"got {self.size}, {self.resize}, {self.channels}"
            )
        if self.channels not in (1, 3) or len(self.mean) != self.channels or len(self.std) != self.channels:
            raise InputError(
                f"preprocess: channels={self.channels} needs that many mean/std values, "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if self.interpolation not in _RESAMPLE:
            raise InputError(f"preprocess: interpolation must be one of {', '.join(_RESAMPLE)}")
        if not 0 < self.size <= MAX_SIDE:
            raise InputError(f"preprocess: size must be between 1 and {MAX_SIDE} pixels, got {self.size}")
        if not self.size <= self.resize <= MAX_SIDE:
            raise InputError(
                f"preprocess: resize (the shorter side before the centre crop) must be between size "
                f"({self.size}) and {MAX_SIDE}, got {self.resize}"
            )

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict) -> Preprocess:
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})


class FileScan:
    """The one way edgeft lists files under folders (datasets, calibration images, prediction
    inputs). Symlinked folders are never followed (`s -> .` would loop, `up -> ..` would mix
    classes), and a file reached twice (through a file link, or a folder given twice) is listed
    once: the first time. `log_skipped` reports the links left out, once per scan."""

    def __init__(self) -> None:
        self.seen: set[str] = set()  # real paths of the files listed so far
        self.skipped_links = 0  # symlinked folders not followed
        self.duplicates = 0  # files already listed

    def folders(self, parent: Path) -> list[Path]:
        """The visible sub-folders of `parent` that are not symlinks, sorted."""
        found = []
        for entry in _entries(parent):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            if entry.is_symlink():
                self.skipped_links += 1
            else:
                found.append(Path(entry.path))
        return sorted(found)

    def files(self, folder: Path) -> list[Path]:
        """Every file under `folder` whose name does not start with a dot, sorted."""
        found: list[tuple[Path, str]] = []  # (path, real path)
        stack = [(str(folder), os.path.realpath(folder))]
        while stack:
            path, real = stack.pop()
            for entry in _entries(path):
                if entry.is_symlink() and entry.is_dir():
                    self.skipped_links += 1
                elif entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, os.path.join(real, entry.name)))
                elif not entry.name.startswith("."):
                    target = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                    found.append((Path(entry.path), target))
        return [path for path, real in sorted(found) if self._first(real)]

    def images(self, folder: Path) -> list[Path]:
        """The files under `folder` with an image extension, sorted."""
        return [path for path in self.files(folder) if path.suffix.lower() in IMAGE_EXTENSIONS]

    def _first(self, real: str) -> bool:
        if real in self.seen:
            self.duplicates += 1
            return False
        self.seen.add(real)
        return True

    def log_skipped(self, what: str | os.PathLike) -> None:
        if self.skipped_links or self.duplicates:
            log.info(
                "%s: skipped %d symlinked folders (never followed) and %d files listed twice",
                what,
                self.skipped_links,
                self.duplicates,
            )


def _entries(folder: str | os.PathLike) -> list[os.DirEntry]:
    """The entries of `folder`; none when it cannot be read (as os.walk)."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda entry: entry.name)
    except OSError:
        return []


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files under `folder` (by extension), sorted, by the rules of `FileScan`."""
    scan = FileScan()
    found = scan.images(Path(folder))
    scan.log_skipped(folder)
    return found


def _check_mean_std(mean: tuple, std: tuple) -> None:
    """Finite float32 numbers; std positive, and small enough a divisor that normalized pixels
    stay finite in float32."""
    numbers = (*mean, *std)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        raise InputError(f"preprocess: mean and std must be finite numbers, got {list(mean)}, {list(std)}")
    if not all(v > 0 for v in std):
        raise InputError(f"preprocess: std must be positive, got {list(std)}")
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        m, s = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        extremes = np.concatenate([(np.float32(0) - m) / s, (np.float32(1) - m) / s]) if len(m) == len(s) else m
    if not (np.isfinite(m).all() and np.isfinite(s).all() and (s > 0).all() and np.isfinite(extremes).all()):
        raise InputError(
            f"preprocess: mean and std must fit float32 and normalize pixels to finite values, "
            f"got {list(mean)}, {list(std)}"
        )


def load_image(source: str | os.PathLike | Image.Image, *, channels: int = 3, resize: int | None = None) -> Image.Image:
    """Decode a file into an 'L' (channels=1) or 'RGB' image: first frame, EXIF orientation
    applied, alpha composited on white, 16-bit scaled to 8-bit. Raises InputError for anything
    that is not a readable, reasonably sized image. With `resize` (the shorter side the image
    will be resized to), an image that would be over MAX_RESIZED_PIXELS once resized is refused
    too. Sizes are checked from the header, before any pixel is decoded."""
    if isinstance(source, Image.Image):
        check_size("image", source.size, resize=resize)
        if getattr(source, "n_frames", 1) > 1:
            source.seek(0)
        return _to_mode(source, channels)
    path = Path(source)
    _check_file_size(path)
    try:
        with Image.open(path) as img:
            check_size(path, img.size, resize=resize)
            img.seek(0)
            img.load()
            return _to_mode(img, channels)
    except InputError:
        raise
    except Image.DecompressionBombError:  # Pillow's own limit, which is above MAX_PIXELS
        raise InputError(f"{path}: too many pixels (decompression bomb?)") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image file Pillow can read") from None
    except MemoryError:
        raise InputError(f"{path}: not enough memory to decode it") from None
    except Exception as exc:  # noqa: BLE001 - truncated data, bad headers, codec errors
        raise InputError(f"{path}: broken image ({exc})") from None


def _check_file_size(path: Path) -> None:
    try:
        nbytes = path.stat().st_size
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if nbytes == 0:
        raise InputError(f"{path}: empty file")
    if nbytes > MAX_FILE_BYTES:
        raise InputError(f"{path}: {nbytes / 2**20:.0f} MiB is over the {MAX_FILE_BYTES // 2**20} MiB limit")


def check_size(name: str | os.PathLike, size: tuple[int, int], *, resize: int | None = None) -> None:
    """Refuse an image of `size` (width, height) that is over MAX_PIXELS, or, resized so its
    shorter side is `resize`, over MAX_RESIZED_PIXELS (a long, thin image): InputError naming `name`."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise InputError(
            f"{name}: {width}x{height} pixels is over the {MAX_PIXELS:,} pixel limit (decompression bomb?)"
        )
    if resize is not None:
        new_width, new_height = resized_size(size, resize)
        if new_width * new_height > MAX_RESIZED_PIXELS:
            raise InputError(
                f"{name}: {width}x{height} is too long and thin: resized to {new_width}x{new_height} for this "
                f"model it would be over the {MAX_RESIZED_PIXELS:,} pixel limit"
            )


def resized_size(size: tuple[int, int], resize: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to `resize`, as torchvision's Resize does."""
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    if short == resize:
        return size
    new_long = int(resize * long / short)
    return (resize, new_long) if width <= height else (new_long, resize)


# EXIF orientation -> the transposition that shows the image upright (as ImageOps.exif_transpose)
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {_ORIENTATION[5], _ORIENTATION[6], _ORIENTATION[7], _ORIENTATION[8]}  # rows become columns
_REVERSES_ROWS = {_ORIENTATION[3], _ORIENTATION[4], _ORIENTATION[6], _ORIENTATION[7]}  # the last row comes first


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Apply the EXIF orientation and convert any Pillow mode to 'L' or 'RGB' by the rules in
    `load_image`'s docstring. Both work pixel by pixel, so a large image is done a strip of rows
    at a time: memory is the image and the result, never intermediate copies of the whole."""
    target = "L" if channels == 1 else "RGB"
    method = _ORIENTATION.get(img.getexif().get(ExifTags.Base.Orientation, 1))
    if img.mode == target and method is None:
        return img
    rows = max(1, _BLOCK_PIXELS // max(1, img.width))
    if rows >= img.height:
        converted = _convert_pixels(img, target)
        return converted if method is None else converted.transpose(method)
    size = (img.height, img.width) if method in _SWAPS_AXES else img.size
    out = Image.new(target, size)
    for top in range(0, img.height, rows):
        bottom = min(top + rows, img.height)
        strip = _convert_pixels(img.crop((0, top, img.width, bottom)), target)
        offset = img.height - bottom if method in _REVERSES_ROWS else top
        if method is not None:
            strip = strip.transpose(method)
        out.paste(strip, (offset, 0) if method in _SWAPS_AXES else (0, offset))
    return out


def _convert_pixels(img: Image.Image, target: str) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _sixteen_bit_to_8(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (ALPHA_BACKGROUND,) * 3 + (255,))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == target else img.convert(target)


def _sixteen_bit_to_8(img: Image.Image) -> Image.Image:
    """Scale 16-bit (and 32-bit integer) images to 0..255; floats are taken as 0..1."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        values = values * 255.0
    else:
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def to_array(img: Image.Image, spec: Preprocess) -> np.ndarray:
    """Resize and centre-crop to `spec.size`: a uint8 array, HWC (RGB) or HW (gray)."""
    check_size("image", img.size, resize=spec.resize)
    new_size = resized_size(img.size, spec.resize)
    if new_size != img.size:
        img = img.resize(new_size, _RESAMPLE[spec.interpolation])
    width, height = img.size
    top = int(round((height - spec.size) / 2.0))
    left = int(round((width - spec.size) / 2.0))
    if (width, height) != (spec.size, spec.size):
        img = img.crop((left, top, left + spec.size, top + spec.size))
    return np.asarray(img, dtype=np.uint8)


def normalize(pixels: np.ndarray, spec: Preprocess) -> np.ndarray:
    """uint8 HWC/HW pixels -> normalized float32 CHW."""
    chw = pixels.reshape(pixels.shape[0], pixels.shape[1], -1).transpose(2, 0, 1)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return (chw.astype(np.float32) / np.float32(255.0) - mean) / std


def preprocess_image(source: str | os.PathLike | Image.Image, spec: Preprocess) -> np.ndarray:
    """The model input for one image: float32 CHW, exactly what training's eval transform gives."""
    return normalize(to_array(load_image(source, channels=spec.channels, resize=spec.resize), spec), spec)


def first_images(batches: Iterable[np.ndarray], count: int) -> Iterator[np.ndarray]:
    """The batches that hold the first `count` images (the last one cut to size), as float32."""
    remaining = count
    for batch in batches:
        batch = np.ascontiguousarray(batch[:remaining], dtype=np.float32)
        remaining -= len(batch)
        yield batch
        if remaining <= 0:
            return

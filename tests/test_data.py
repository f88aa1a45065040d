"""edgeft.data: the embedded digits, ImageFolder directories, torchvision datasets under a root,
and the batches training and evaluation read."""

from __future__ import annotations

import multiprocessing
import struct
import time
from collections import Counter
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgeft.data import (
    FolderImages,
    FolderLoaders,
    TensorImages,
    _stratified_split,
    augment_batch,
    iterate_batches,
    load_data,
    size_from_data,
)
from edgeft.errors import InputError
from edgeft.preprocess import preprocess_image

from conftest import class_image, make_image_folder

CPU = torch.device("cpu")


def eval_tensors(bundle, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*iterate_batches(getattr(bundle, split), batch_size=50, preprocess=bundle.preprocess, device=CPU))
    return torch.cat(xs), torch.cat(ys)


def file_names(files) -> set[str]:
    return {f"{path.parent.name}/{path.name}" for path, _ in files}


# --- digits -----------------------------------------------------------------------------------


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    with resources.files("edgeft").joinpath("assets/digits.npz").open("rb") as f:
        arrays = np.load(f)
        return arrays["images"], arrays["labels"]


def test_digits_loads_with_a_stratified_split():
    bundle = load_data("digits", img_size=16, val_split=0.2, seed=0)
    assert bundle.classes == [str(d) for d in range(10)]
    assert len(bundle.train) + len(bundle.val) == 1797
    assert isinstance(bundle.val, TensorImages)
    assert bundle.train.images.shape[1:] == (1, 16, 16) and bundle.train.images.dtype == torch.uint8
    assert bundle.preprocess.channels == 1 and bundle.flips is False

    _, labels = digits_arrays()
    per_class = Counter(labels.tolist())
    val_counts = Counter(bundle.val.labels.tolist())
    train_counts = Counter(bundle.train.labels.tolist())
    assert set(val_counts) == set(range(10))  # every class is validated
    for label, n in per_class.items():
        assert train_counts[label] + val_counts[label] == n
        assert abs(val_counts[label] / n - 0.2) <= 1 / n  # stratified: each class split 80/20


def test_digits_split_depends_on_the_seed_only():
    a, b, c = (load_data("digits", img_size=8, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.val.images, c.val.images)
    rgb = load_data("digits", img_size=8, channels=3)
    assert rgb.train.images.shape[1] == 3 and rgb.preprocess.channels == 3


def test_digits_eval_tensors_equal_preprocess_image_of_the_same_pixels_as_png(tmp_path):
    bundle = load_data("digits", img_size=24, val_split=0.2, seed=0)
    images, labels = digits_arrays()
    _, val_idx = _stratified_split(labels.tolist(), 0.2, 0)
    x, y = eval_tensors(bundle)
    assert torch.equal(y, torch.from_numpy(labels[val_idx].astype(np.int64)))
    for row, index in enumerate(val_idx[::7]):
        path = tmp_path / f"{index}.png"
        Image.fromarray(images[index]).save(path)
        expected = preprocess_image(path, bundle.preprocess)
        assert np.abs(x[row * 7].numpy() - expected).max() < 1e-6


# --- ImageFolder --------------------------------------------------------------------------------


def test_folder_split_by_val_split_is_stratified_and_seeded(tmp_path):
    root = make_image_folder(tmp_path / "data", {"cat": 10, "dog": 10, "owl": 10}, size=12)
    bundle = load_data(str(root), img_size=16, val_split=0.3, seed=0)
    assert bundle.classes == ["cat", "dog", "owl"]
    assert isinstance(bundle.train, FolderImages) and bundle.skipped_files == 0
    train, val = file_names(bundle.train.files), file_names(bundle.val.files)
    assert not train & val
    assert train | val == {f"{c}/{i:03d}.png" for c in ("cat", "dog", "owl") for i in range(10)}
    assert Counter(label for _, label in bundle.val.files) == {0: 3, 1: 3, 2: 3}
    for path, label in bundle.val.files:  # the labels are the folders
        assert bundle.classes[label] == path.parent.name

    again = load_data(str(root), img_size=16, val_split=0.3, seed=0)
    assert file_names(again.val.files) == val
    other = load_data(str(root), img_size=16, val_split=0.3, seed=1)
    assert file_names(other.val.files) != val


def test_folder_with_train_and_val(tmp_path):
    make_image_folder(tmp_path / "data" / "train", {"a": 4, "b": 5}, size=10)
    make_image_folder(tmp_path / "data" / "val", {"a": 2, "b": 3}, size=10, seed=1)
    bundle = load_data(str(tmp_path / "data"), img_size=16, val_split=0.5)
    assert [p.parent.parent.name for p, _ in bundle.train.files] == ["train"] * 9
    assert [p.parent.parent.name for p, _ in bundle.val.files] == ["val"] * 5
    assert Counter(label for _, label in bundle.val.files) == {0: 2, 1: 3}


def _linked_folder(tmp_path: Path) -> Path:
    """cat/ and dog/ of 4 images each, with links a folder scan must not follow: a loop to
    itself (`s -> .`), one to the dataset root (`up -> ..`), a class folder linking to another
    (`kitten -> cat`), and a file link to an image of the same class."""
    root = make_image_folder(tmp_path / "data", {"cat": 4, "dog": 4}, size=10)
    (root / "cat" / "s").symlink_to(".")
    (root / "cat" / "up").symlink_to("..")
    (root / "kitten").symlink_to("cat")
    (root / "dog" / "again.png").symlink_to("000.png")
    return root


def test_folder_scan_never_follows_symlinked_folders_nor_lists_a_file_twice(tmp_path, caplog):
    root = _linked_folder(tmp_path)
    with caplog.at_level("INFO", logger="edgeft.preprocess"):
        bundle = load_data(str(root), img_size=16, val_split=0.25)  # used to hang on `s -> .`
    assert bundle.classes == ["cat", "dog"]
    files = bundle.train.files + bundle.val.files
    assert len(files) == 8 and len({p.resolve() for p, _ in files}) == 8
    for path, label in files:  # never a dog labelled cat through `up -> ..`
        assert path.resolve().parent.name == bundle.classes[label]
    assert not {p.resolve() for p, _ in bundle.train.files} & {p.resolve() for p, _ in bundle.val.files}
    assert [r.getMessage() for r in caplog.records if "symlinked" in r.getMessage()] == [
        f"{root}: skipped 3 symlinked folders (never followed) and 1 files listed twice"
    ]


def test_train_and_val_folders_share_no_file(tmp_path):
    make_image_folder(tmp_path / "data" / "train", {"a": 4, "b": 4}, size=10)
    make_image_folder(tmp_path / "data" / "val", {"a": 2, "b": 2}, size=10, seed=1)
    (tmp_path / "data" / "val" / "a" / "from-train.png").symlink_to(tmp_path / "data" / "train" / "a" / "000.png")
    bundle = load_data(str(tmp_path / "data"), img_size=16)
    assert len(bundle.train) == 8 and len(bundle.val) == 4
    assert "from-train.png" not in file_names(bundle.val.files) | file_names(bundle.train.files)


def test_folder_train_and_val_with_different_classes(tmp_path):
    make_image_folder(tmp_path / "data" / "train", {"a": 2, "b": 2}, size=10)
    make_image_folder(tmp_path / "data" / "val", {"a": 2, "c": 2}, size=10)
    with pytest.raises(InputError):
        load_data(str(tmp_path / "data"), img_size=16)


def test_folder_eval_tensors_equal_preprocess_image(tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 5, "b": 5}, size=30)
    bundle = load_data(str(root), img_size=16, val_split=0.4)
    x, y = eval_tensors(bundle)
    for i, (path, label) in enumerate(bundle.val.files):
        assert np.abs(x[i].numpy() - preprocess_image(path, bundle.preprocess)).max() < 1e-6
        assert y[i] == label
    assert bundle.preprocess.resize > bundle.preprocess.size  # centre crop, as torchvision's eval does
    assert load_data(str(root)).preprocess.size == 32  # from the data: 30 px rounded up to a multiple of 32


def write_mixed_folder(root: Path) -> list[Path]:
    """Images of many sizes, modes and formats, two classes."""
    rng = np.random.default_rng(0)
    written = []
    variants = [
        ("RGB", ".png"),
        ("L", ".png"),
        ("RGBA", ".png"),
        ("P", ".png"),
        ("RGB", ".jpg"),
        ("L", ".jpg"),
        ("LA", ".png"),
        ("RGB", ".bmp"),
        ("RGB", ".webp"),
        ("P", ".gif"),
    ]
    for label, name in enumerate(("x", "y")):
        (root / name).mkdir(parents=True)
        for i, (mode, ext) in enumerate(variants):
            size = int(rng.integers(9, 60))
            img = class_image(label, size=size, mode=mode, rng=rng)
            if i % 3 == 0:  # not square either
                img = img.resize((size, size // 2 + 5))
            path = root / name / f"{i:02d}{ext}"
            img.save(path)
            written.append(path)
    return written


def test_folder_with_mixed_sizes_modes_and_formats(tmp_path):
    written = write_mixed_folder(tmp_path / "mixed")
    assert {Image.open(p).mode for p in written} >= {"RGB", "L", "RGBA", "P", "LA"}
    bundle = load_data(str(tmp_path / "mixed"), img_size=16, val_split=0.2)
    assert bundle.skipped_files == 0
    assert len(bundle.train) + len(bundle.val) == len(written)
    assert bundle.preprocess.channels == 3  # some images have colour
    x, _ = eval_tensors(bundle)
    assert x.shape == (len(bundle.val), 3, 16, 16) and torch.isfinite(x).all()
    for augment in ("light", "standard"):
        batches = list(
            iterate_batches(
                bundle.train,
                batch_size=8,
                preprocess=bundle.preprocess,
                device=CPU,
                shuffle=True,
                augment=augment,
                flips=True,
                seed=0,
            )
        )
        assert sum(len(yb) for _, yb in batches) == len(bundle.train)
        assert all(xb.shape[1:] == (3, 16, 16) and torch.isfinite(xb).all() for xb, _ in batches)


def test_grayscale_folder_gives_one_channel_unless_asked(tmp_path):
    root = make_image_folder(tmp_path / "gray", {"a": 4, "b": 4}, size=12, modes=("L",))
    assert load_data(str(root), img_size=16).preprocess.channels == 1
    bundle = load_data(str(root), img_size=16, channels=3)
    assert bundle.preprocess.channels == 3
    assert eval_tensors(bundle)[0].shape[1] == 3


def corrupt_folder(root: Path, n_good_per_class: int, n_bad: int) -> list[Path]:
    make_image_folder(root, {"a": n_good_per_class, "b": n_good_per_class}, size=8)
    bad = []
    for i in range(n_bad):
        path = root / ("a" if i % 2 == 0 else "b") / f"broken{i}.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature and nothing usable
        bad.append(path)
    return bad


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    bad = corrupt_folder(tmp_path / "data", 50, 1)  # 1 of 101 files: under 1 %
    bundle = load_data(str(tmp_path / "data"), img_size=16)
    assert bundle.skipped_files == 1
    assert len(bundle.train) + len(bundle.val) == 100
    kept = {path for path, _ in bundle.train.files + bundle.val.files}
    assert bad[0] not in kept
    assert len(bundle.skipped_examples) == 1 and bad[0].name in bundle.skipped_examples[0]


def test_too_many_corrupt_files_abort_the_run(tmp_path):
    corrupt_folder(tmp_path / "data", 50, 2)  # 2 of 102 files: over 1 %
    with pytest.raises(InputError) as info:  # bad input: exit 2
        load_data(str(tmp_path / "data"), img_size=16)
    assert "2 of 102" in str(info.value)
    bundle = load_data(str(tmp_path / "data"), img_size=16, max_bad_fraction=0.05)  # the limit is an option
    assert bundle.skipped_files == 2


def test_empty_missing_and_one_class_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "classes_no_images" / "a").mkdir(parents=True)
    (tmp_path / "classes_no_images" / "b").mkdir()
    make_image_folder(tmp_path / "one", {"only": 5}, size=8)
    make_image_folder(tmp_path / "hollow", {"a": 3, "b": 3}, size=8)
    (tmp_path / "hollow" / "c").mkdir()
    for name in ("empty", "classes_no_images", "one", "missing", "hollow"):
        with pytest.raises(InputError) as info:
            load_data(str(tmp_path / name), img_size=16)
        assert "\n" not in str(info.value)
        assert name in str(info.value)


def test_too_few_images_for_a_validation_split(tmp_path):
    make_image_folder(tmp_path / "tiny", {"a": 1, "b": 1}, size=8)
    with pytest.raises(InputError) as info:
        load_data(str(tmp_path / "tiny"), img_size=16)
    assert "validation" in str(info.value)
    assert "at least 2 images" in str(info.value) and "--val-split" not in str(info.value)  # no split would help


@pytest.mark.parametrize("val_split", [0.0, 1.0, -0.2, 1.5])
def test_bad_val_split(val_split):
    with pytest.raises(InputError) as info:
        load_data("digits", val_split=val_split)
    assert "val-split" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "flag"), [({"img_size": 4}, "img-size"), ({"img_size": 5000}, "img-size"), ({"channels": 2}, "channels")]
)
def test_bad_size_and_channels(kwargs, flag):
    with pytest.raises(InputError) as info:
        load_data("digits", **kwargs)
    assert flag in str(info.value)


# --- torchvision datasets under a root ----------------------------------------------------------


def write_idx(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST's own uncompressed idx files, which torchvision reads without downloading."""
    n, rows, cols = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x0803, n, rows, cols) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, n) + labels.astype(np.uint8).tobytes())


def test_mnist_from_idx_files(tmp_path, torch_home):
    rng = np.random.default_rng(0)
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train_x, train_y = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), np.arange(20) % 10
    test_x, test_y = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), (np.arange(7) * 3) % 10
    write_idx(raw, "train", train_x, train_y)
    write_idx(raw, "t10k", test_x, test_y)

    bundle = load_data("mnist", root=tmp_path / "root", img_size=16)
    assert len(bundle.classes) == 10 and bundle.classes[0].startswith("0")
    assert len(bundle.train) == 20 and len(bundle.val) == 7
    assert bundle.preprocess.channels == 1
    assert torch.equal(bundle.train.labels, torch.from_numpy(train_y.astype(np.int64)))
    x, y = eval_tensors(bundle)
    assert torch.equal(y, torch.from_numpy(test_y.astype(np.int64)))
    for i in range(7):
        path = tmp_path / f"t{i}.png"
        Image.fromarray(test_x[i]).save(path)
        assert np.abs(x[i].numpy() - preprocess_image(path, bundle.preprocess)).max() < 1e-6
    assert sorted(p.name for p in raw.iterdir()) == sorted(  # nothing was downloaded
        f"{s}-{k}" for s in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")
    )


def test_cifar10_offline_names_the_root_and_fails_fast(tmp_path, torch_home):
    root = tmp_path / "nothing-here"
    started = time.perf_counter()
    with pytest.raises(InputError) as info:
        load_data("cifar10", root=root)
    assert time.perf_counter() - started < 30
    message = str(info.value)
    assert str(root.resolve()) in message and "cifar10" in message
    assert "\n" not in message


# --- batches and augmentation -------------------------------------------------------------------


def test_iterate_batches_order_depends_on_the_seed_only():
    bundle = load_data("digits", img_size=8)

    def labels(seed: int, shuffle: bool = True) -> torch.Tensor:
        return torch.cat(
            [
                y
                for _, y in iterate_batches(
                    bundle.train, batch_size=100, preprocess=bundle.preprocess, device=CPU, shuffle=shuffle, seed=seed
                )
            ]
        )

    first, again, other = labels(0), labels(0), labels(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert sorted(first.tolist()) == sorted(bundle.train.labels.tolist())  # each image once
    assert torch.equal(labels(5, shuffle=False), bundle.train.labels)


def test_augment_batch():
    x = torch.rand(6, 3, 16, 16)
    assert torch.equal(augment_batch(x, "none", flips=True, generator=torch.Generator().manual_seed(0)), x)
    a = augment_batch(x, "standard", flips=True, generator=torch.Generator().manual_seed(0))
    b = augment_batch(x, "standard", flips=True, generator=torch.Generator().manual_seed(0))
    c = augment_batch(x, "standard", flips=True, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)


@pytest.mark.parametrize("n,world", [(10, 2), (7, 3), (2, 4)])
def test_shards_are_equal_and_cover_the_split(n, world):
    from edgeft.data import shard_indices

    shards = [shard_indices(n, shuffle=True, seed=3, rank=r, world=world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank takes as many steps
    assert set(torch.cat(shards).tolist()) == set(range(n))
    unpadded = [shard_indices(n, shuffle=True, seed=3, rank=r, world=world, pad=False) for r in range(world)]
    assert sorted(torch.cat(unpadded).tolist()) == list(range(n))  # evaluation sees each image once


# --- folders at scale: headers at start-up, decode failures later, per-image augmentation seeds ---


def truncate_after_header(path: Path) -> None:
    """Keep a JPEG's header (size, mode and format still read) and cut its compressed data."""
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xff\xda") + 20])


def test_start_up_reads_headers_only_and_later_failures_are_counted(tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 10, "b": 10}, size=24, ext=".jpg")
    broken = root / "a" / "003.jpg"
    truncate_after_header(broken)
    bundle = load_data(str(root), img_size=16, val_split=0.25, max_bad_fraction=0.1)
    assert bundle.skipped_files == 0  # its header is fine: nothing decoded at start-up
    assert len(bundle.train) + len(bundle.val) == 20
    for split in (bundle.train, bundle.val):
        n = sum(
            len(y)
            for _, y in iterate_batches(
                split,
                batch_size=4,
                preprocess=bundle.preprocess,
                device=CPU,
                augment="light",
                flips=True,
                shuffle=True,
                workers=2,
            )
        )
        assert n == len(split) - (broken in {p for p, _ in split.files})
    count, examples = bundle.skipped()
    assert count == 1 and broken.name in examples[0]


def test_decode_failures_past_the_limit_abort_as_bad_input(tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 6, "b": 6}, size=24, ext=".jpg")
    for path in sorted(root.rglob("*.jpg")):
        truncate_after_header(path)
    bundle = load_data(str(root), img_size=16, val_split=0.25)
    with pytest.raises(InputError) as info:
        list(iterate_batches(bundle.train, batch_size=4, preprocess=bundle.preprocess, device=CPU))
    assert "not readable images" in str(info.value)


def augmented(bundle, *, seed: int, workers: int, loaders: FolderLoaders | None = None) -> torch.Tensor:
    return torch.cat(
        [
            x
            for x, _ in iterate_batches(
                bundle.train,
                batch_size=4,
                preprocess=bundle.preprocess,
                device=CPU,
                shuffle=True,
                augment="standard",
                flips=True,
                seed=seed,
                workers=workers,
                loaders=loaders,
            )
        ]
    )


def test_folder_augmentation_depends_on_the_epoch_seed_not_on_workers(tmp_path):
    """Persistent workers are seeded once, so each image is seeded by (epoch seed, index): epoch 1
    of a resumed process equals epoch 1 of an uninterrupted one, with any number of workers."""
    root = make_image_folder(tmp_path / "data", {"a": 6, "b": 6}, size=24)
    bundle = load_data(str(root), img_size=16, val_split=0.25)
    with FolderLoaders() as loaders:
        first, second = (augmented(bundle, seed=seed, workers=2, loaders=loaders) for seed in (1, 2))
        assert not torch.equal(first, second)
        fresh = load_data(str(root), img_size=16, val_split=0.25)  # a new process's loader, started at epoch 2
        assert torch.equal(augmented(fresh, seed=2, workers=2, loaders=FolderLoaders()), second)
        assert torch.equal(augmented(fresh, seed=1, workers=0), first)
        assert torch.equal(augmented(bundle, seed=1, workers=2, loaders=loaders), first)


def test_folder_loaders_keep_their_workers_until_closed(tmp_path):
    """One set of worker processes serves every pass over a split until `close` ends them, also
    with a pass left half-read; without FolderLoaders a pass starts and ends its own."""
    root = make_image_folder(tmp_path / "data", {"a": 6, "b": 6}, size=24)
    bundle = load_data(str(root), img_size=16, val_split=0.25)
    before = set(multiprocessing.active_children())

    def passes(loaders: FolderLoaders | None) -> Iterator:
        return iterate_batches(
            bundle.train, batch_size=2, preprocess=bundle.preprocess, device=CPU, workers=2, loaders=loaders
        )

    def workers() -> set:
        return set(multiprocessing.active_children()) - before

    with FolderLoaders() as loaders:
        list(passes(loaders))
        first = workers()
        list(passes(loaders))
        assert len(first) == 2 and workers() == first  # the next pass reuses them
        half_read = passes(loaders)
        next(half_read)
    assert workers() == set()
    list(passes(None))
    assert workers() == set()


@pytest.mark.parametrize(
    ("sides", "size"), [([25] * 5, 32), ([20, 30, 70, 500, 500], 96), ([600, 700], 224), ([5, 9], 32), ([64, 64], 64)]
)
def test_size_from_data(sides, size):
    assert size_from_data(sides) == size


def test_folder_size_follows_the_images(tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 4, "b": 4}, size=25, modes=("L",))
    bundle = load_data(str(root))
    assert bundle.preprocess.size == 32 and bundle.size_from_data
    assert load_data(str(root), img_size=64).preprocess.size == 64

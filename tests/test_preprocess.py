"""edgeft.preprocess: the one loader and the one preprocessing, against torchvision's eval
transform, and the decoding rules for awkward files."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

import edgeft.preprocess as pp
from edgeft.errors import InputError
from edgeft.preprocess import Preprocess, load_image, preprocess_image, to_array

MEAN3, STD3 = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MEAN1, STD1 = (0.449,), (0.226,)


def spec(size: int, resize: int, channels: int = 3, interpolation: str = "bilinear") -> Preprocess:
    mean, std = (MEAN3, STD3) if channels == 3 else (MEAN1, STD1)
    return Preprocess(size=size, resize=resize, mean=mean, std=std, channels=channels, interpolation=interpolation)


def torchvision_eval(s: Preprocess):
    """The oracle: torchvision's usual eval transform for the same spec."""
    interp = getattr(InterpolationMode, s.interpolation.upper())
    return v2.Compose(
        [
            v2.Resize(s.resize, interpolation=interp),
            v2.CenterCrop(s.size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(s.mean), list(s.std)),
        ]
    )


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").convert(mode)


# --- equality with torchvision ----------------------------------------------------------------


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("width", "height", "size", "resize"),
    [(37, 23, 16, 18), (23, 37, 16, 18), (64, 64, 32, 36), (300, 201, 224, 256), (15, 40, 16, 16), (17, 17, 16, 16)],
)
def test_preprocess_equals_torchvision_eval_transform(tmp_path, width, height, size, resize, channels, interpolation):
    s = spec(size, resize, channels, interpolation)
    path = tmp_path / "img.png"
    noise_image(width, height, seed=width * height).save(path)
    decoded = Image.open(path).convert("L" if channels == 1 else "RGB")

    ours = preprocess_image(path, s)
    oracle = torchvision_eval(s)(decoded).numpy()

    assert ours.dtype == np.float32
    assert ours.shape == oracle.shape == (channels, size, size)
    assert np.abs(ours - oracle).max() < 1e-6
    # the geometric part (resize + crop) is identical to the pixel
    geometric = v2.Compose(
        [v2.Resize(resize, interpolation=getattr(InterpolationMode, interpolation.upper())), v2.CenterCrop(size)]
    )
    expected_pixels = np.asarray(geometric(decoded))
    np.testing.assert_array_equal(to_array(load_image(path, channels=channels), s), expected_pixels)


def test_file_and_pil_image_give_the_same_tensor(tmp_path):
    s = spec(16, 18)
    img = noise_image(30, 21)
    img.save(tmp_path / "a.png")
    np.testing.assert_array_equal(preprocess_image(tmp_path / "a.png", s), preprocess_image(img, s))
    np.testing.assert_array_equal(preprocess_image(str(tmp_path / "a.png"), s), preprocess_image(img, s))


def test_spec_validation_and_round_trip():
    s = spec(16, 18, 1, "bicubic")
    assert Preprocess.from_dict(s.to_dict()) == s
    with pytest.raises(InputError):
        Preprocess(size=16, resize=16, mean=MEAN3, std=STD3, channels=1)  # 3 means for 1 channel
    with pytest.raises(InputError):
        Preprocess(size=16, resize=16, mean=MEAN1, std=STD1, channels=2)
    with pytest.raises(InputError):
        Preprocess(size=20, resize=16, mean=MEAN3, std=STD3)  # crop larger than the resize
    with pytest.raises(InputError):
        Preprocess(size=16, resize=16, mean=MEAN3, std=STD3, interpolation="lanczos3")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mean": (1e39,)}, "fit float32"),  # finite in Python, inf in float32: predictions were NaN
        ({"mean": (-1e39,)}, "fit float32"),
        ({"std": (1e-45,)}, "fit float32"),  # 0 in float32
        ({"std": (1e-39,)}, "fit float32"),  # normalized pixels overflow float32
        ({"mean": (3e38,), "std": (0.5,)}, "fit float32"),
        ({"std": (0.0,)}, "std must be positive"),
        ({"std": (-0.2,)}, "std must be positive"),
        ({"mean": (float("nan"),)}, "finite numbers"),
        ({"std": (float("inf"),)}, "finite numbers"),
        ({"mean": (True,)}, "finite numbers"),
        ({"mean": (0.5, 0.5)}, "needs that many"),
        ({"std": ()}, "needs that many"),
        ({"size": 32, "resize": 1}, r"resize .* must be between size \(32\)"),
        ({"size": 1, "resize": 10**6}, "resize .* must be between"),  # used to read "1x1 is too long and thin"
        ({"size": 10**6, "resize": 10**6}, "size must be between 1 and"),
        ({"size": 0, "resize": 8}, "size must be between 1 and"),
    ],
)
def test_spec_refuses_values_that_cannot_give_a_finite_input(change, message):
    values = {"size": 16, "resize": 16, "mean": MEAN1, "std": STD1, "channels": 1, **change}
    with pytest.raises(InputError, match=message):
        Preprocess(**values)


# --- decoding rules ---------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    # stored 40 wide x 20 high: left half red, right half blue; EXIF 6 = display rotated 90 deg CW
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    assert Image.open(path).size == (40, 20)  # Pillow alone does not rotate

    img = load_image(path)
    assert img.size == (20, 40)  # portrait after rotation
    pixels = np.asarray(img).astype(int)
    # rotating clockwise moves the left (red) half to the top
    assert np.abs(pixels[5, 10] - (255, 0, 0)).max() < 40
    assert np.abs(pixels[35, 10] - (0, 0, 255)).max() < 40


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)  # transparent black
    rgba[0, 0] = (200, 10, 30, 255)  # opaque
    rgba[1, 1] = (0, 0, 0, 128)  # half-transparent black
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)

    rgb = np.asarray(load_image(path))
    assert rgb.shape == (4, 4, 3)
    assert tuple(rgb[0, 0]) == (200, 10, 30)
    assert tuple(rgb[3, 3]) == (255, 255, 255)  # fully transparent -> the white background
    assert np.all(np.abs(rgb[1, 1].astype(int) - 127) <= 1)  # 50 % black over white
    gray = np.asarray(load_image(path, channels=1))
    assert gray.shape == (4, 4) and gray[3, 3] == 255


def test_la_image_is_composited_on_white(tmp_path):
    la = Image.new("LA", (3, 3), (0, 0))
    la.putpixel((0, 0), (50, 255))
    la.save(tmp_path / "la.png")
    gray = np.asarray(load_image(tmp_path / "la.png", channels=1))
    assert gray[0, 0] == 50 and gray[2, 2] == 255


def test_palette_png(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    img = Image.new("P", (3, 1))
    img.putpalette(palette)
    for x in range(3):
        img.putpixel((x, 0), x)
    path = tmp_path / "palette.png"
    img.save(path)
    assert Image.open(path).mode == "P"
    rgb = np.asarray(load_image(path))
    np.testing.assert_array_equal(rgb[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255]])


def test_palette_png_with_transparent_index(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 0, 0, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    path = tmp_path / "trns.png"
    img.save(path, transparency=1)
    rgb = np.asarray(load_image(path))
    assert tuple(rgb[0, 0]) == (10, 20, 30)
    assert tuple(rgb[0, 1]) == (255, 255, 255)  # transparent palette entry -> white, not black


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535], [257 * 10, 257 * 100, 257 * 200, 257 * 254]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file

    gray = np.asarray(load_image(path, channels=1))
    np.testing.assert_array_equal(gray, [[0, 1, 128, 255], [10, 100, 200, 254]])
    rgb = np.asarray(load_image(path, channels=3))
    assert rgb.shape == (2, 4, 3)
    assert rgb[0, 2].tolist() == [128, 128, 128]


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(path), "n_frames", 1) == 3
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (8, 8, 3)
    assert np.all(rgb == (255, 0, 0))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA", "I;16", "1", "CMYK"])
@pytest.mark.parametrize("channels", [1, 3])
def test_channel_count_follows_the_model_not_the_file(tmp_path, mode, channels):
    img = noise_image(12, 10, "RGB").convert("L" if mode in ("I;16", "1", "LA") else "RGB")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
    else:
        img = img.convert(mode)
    path = tmp_path / ("img.jpg" if mode == "CMYK" else "img.png")
    img.save(path)
    s = spec(8, 10, channels)
    out = preprocess_image(path, s)
    assert out.shape == (channels, 8, 8)
    assert np.isfinite(out).all()
    assert load_image(path, channels=channels).mode == ("L" if channels == 1 else "RGB")


def test_gray_image_in_rgb_model_has_equal_channels(tmp_path):
    noise_image(10, 10, "L").save(tmp_path / "g.png")
    pixels = np.asarray(load_image(tmp_path / "g.png", channels=3))
    assert pixels.shape == (10, 10, 3)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])


# --- refusals ---------------------------------------------------------------------------------


def assert_one_line_input_error(path, match: str | None = None, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        load_image(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message  # the user learns which file
    if match:
        assert match in message
    return message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert_one_line_input_error(path, "empty")


def test_text_renamed_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 20)
    assert_one_line_input_error(path)


def test_missing_file(tmp_path):
    assert_one_line_input_error(tmp_path / "nope.jpg")


def test_directory_is_not_an_image(tmp_path):
    (tmp_path / "dir.png").mkdir()
    assert_one_line_input_error(tmp_path / "dir.png")


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_file(tmp_path, ext):
    full = tmp_path / f"full{ext}"
    noise_image(64, 64).save(full)
    data = full.read_bytes()
    path = tmp_path / f"truncated{ext}"
    path.write_bytes(data[: len(data) // 2])
    assert np.asarray(load_image(full)).shape == (64, 64, 3)  # the intact file is fine
    assert_one_line_input_error(path)
    with pytest.raises(InputError):
        preprocess_image(path, spec(16, 18))


def test_decompression_bomb_by_limit(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    noise_image(40, 30).save(path)
    assert load_image(path).size == (40, 30)
    monkeypatch.setattr(pp, "MAX_PIXELS", 40 * 30 - 1)
    assert_one_line_input_error(path, "pixel")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with one tiny (invalid) data chunk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [12_000, 40_000])  # over Pillow's warning limit; over its error limit
def test_decompression_bomb_by_header(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(side, side))
    assert path.stat().st_size < 200  # tiny on disk, huge when decoded
    assert_one_line_input_error(path, "pixels")


def test_over_large_file_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "img.png"
    noise_image(20, 20).save(path)
    monkeypatch.setattr(pp, "MAX_FILE_BYTES", path.stat().st_size - 1)
    assert_one_line_input_error(path, "limit")


# --- bounded memory: limits decided from the header, before decoding or resizing ---------------


@pytest.mark.parametrize(
    ("width", "height", "resize"), [(2_000_000, 1, 32), (1, 200_000, 256), (20_000, 1, 256), (3000, 10, 256)]
)
def test_long_thin_image_is_refused_before_resizing(tmp_path, width, height, resize):
    path = tmp_path / "thin.png"
    Image.new("1", (width, height)).save(path)
    assert path.stat().st_size < 300_000  # small on disk; resized, it would be gigabytes
    s = spec(min(resize, 224), resize)
    with pytest.raises(InputError, match="too long and thin") as info:
        preprocess_image(path, s)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InputError, match="too long and thin"):
        preprocess_image(Image.new("L", (width, height)), s)


def test_thin_image_within_the_limit_still_equals_torchvision(tmp_path):
    s = spec(16, 16)
    path = tmp_path / "strip.png"
    noise_image(4000, 3).save(path)  # resized to 21333 x 16: under the limit
    oracle = torchvision_eval(s)(Image.open(path).convert("RGB")).numpy()
    assert np.abs(preprocess_image(path, s) - oracle).max() < 1e-6


def test_resized_size_limit_follows_the_model_size(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("L", (3000, 10)).save(path)
    assert preprocess_image(path, spec(16, 16)).shape == (3, 16, 16)  # 4800 x 16 once resized
    with pytest.raises(InputError):
        preprocess_image(path, spec(224, 256))  # 76800 x 256 once resized


def sparse_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height, all black: a few kB for any size (zlib of zeros)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.mark.slow
def test_bomb_is_refused_every_time_among_other_images_on_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(sparse_png(10_000, 9_500))  # 95 M pixels: over MAX_PIXELS, under Pillow's error limit
    assert Image.open(bomb).size == (10_000, 9_500)
    good = tmp_path / "good.png"
    noise_image(40, 30).save(good)
    paths = [bomb if i % 4 == 0 else good for i in range(64)]

    def outcome(path):
        try:
            preprocess_image(path, spec(16, 18))
            return "decoded"
        except InputError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(outcome, paths))
    assert all("pixel limit" in r for r, p in zip(results, paths) if p == bomb)
    assert all(r == "decoded" for r, p in zip(results, paths) if p == good)


@pytest.mark.parametrize("mode", ["P", "RGBA", "I;16", "LA"])
def test_large_images_convert_in_strips_exactly_as_whole(tmp_path, monkeypatch, mode):
    rng = np.random.default_rng(1)
    base = noise_image(37, 29, "RGB", seed=3)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (29, 37), dtype=np.uint16))
    elif mode == "P":
        img = base.quantize(colors=16)
        img.info["transparency"] = 3
    else:
        img = base.convert(mode)
        img.putalpha(Image.fromarray(rng.integers(0, 256, (29, 37), dtype=np.uint8)))
    path = tmp_path / "img.png"
    img.save(path)
    whole = np.asarray(load_image(path))
    monkeypatch.setattr(pp, "_BLOCK_PIXELS", 37 * 4)  # strips of 4 rows
    np.testing.assert_array_equal(np.asarray(load_image(path)), whole)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("block", [None, 37 * 4])  # the whole image at once; strips of 4 rows
def test_exif_orientation_in_strips_equals_exif_transpose(tmp_path, monkeypatch, orientation, block):
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "oriented.png"
    noise_image(37, 30, "RGBA", seed=orientation).save(path, exif=exif)
    expected = ImageOps.exif_transpose(Image.open(path))
    expected = Image.alpha_composite(Image.new("RGBA", expected.size, (255, 255, 255, 255)), expected).convert("RGB")
    if block:
        monkeypatch.setattr(pp, "_BLOCK_PIXELS", block)
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(expected))
    rgb = tmp_path / "oriented.jpg"
    noise_image(37, 30, seed=orientation).save(rgb, exif=exif, quality=90)
    np.testing.assert_array_equal(np.asarray(load_image(rgb)), np.asarray(ImageOps.exif_transpose(Image.open(rgb))))


def test_file_scan_lists_each_file_once_and_follows_no_folder_link(tmp_path, caplog):
    root = tmp_path / "root"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    for name in ("a/1.png", "a/deep/2.jpg", "b/3.png", "a/notes.txt", "a/.hidden.png"):
        (root / name).write_bytes(b"x")
    (root / "a" / "loop").symlink_to(".")  # os.walk(followlinks=True) and some Path.rglob never end here
    (root / "a" / "up").symlink_to("..")
    (root / "b" / "link.png").symlink_to(root / "a" / "1.png")
    (root / "link-b").symlink_to("b")
    scan = pp.FileScan()
    assert [p.name for p in scan.folders(root)] == ["a", "b"]
    listed = [p.relative_to(root).as_posix() for p in scan.files(root / "a")]
    assert listed == ["a/1.png", "a/deep/2.jpg", "a/notes.txt"]
    assert [p.relative_to(root).as_posix() for p in scan.images(root / "b")] == ["b/3.png"]  # link.png: a/1.png again
    assert scan.files(root / "a") == []  # all listed already
    assert (scan.skipped_links, scan.duplicates) == (3 + 2, 4)
    with caplog.at_level("INFO", logger="edgeft.preprocess"):
        assert [p.name for p in pp.image_files(root)] == ["1.png", "2.jpg", "3.png"]
    expected = f"{root}: skipped 3 symlinked folders (never followed) and 1 files listed twice"
    assert [r.getMessage() for r in caplog.records] == [expected]

"""edgeft predict and Predictor: onnxruntime only, every kind of image users have, the same
probabilities as the checkpoint evaluated in PyTorch."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgeft.checkpoint import load_checkpoint
from edgeft.config import ExportConfig
from edgeft.export import export
from edgeft.models import model_from_checkpoint
from edgeft.predict import Predictor
from edgeft.preprocess import Preprocess, preprocess_image

from conftest import edgeft_command, formats_here, offline_env, one_line_error, run_edgeft, time_limit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def onnx_model(digits_exports) -> str:
    return digits_exports["onnx"].path


def _digit(rng, size=(24, 24)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def real_world_folder(tmp_path_factory):
    """Good files of every common kind, and broken ones; returns (folder, good names, bad names)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = _digit(rng)
    rgb.save(folder / "rgb.jpg", quality=95)
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.quantize(colors=8).save(folder / "palette.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)))
    rgba.save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (24, 24), dtype=np.uint16)).save(folder / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    _digit(rng, (30, 20)).save(folder / "exif.jpg", exif=exif)
    rgb.save(folder / "image.webp")
    rgb.save(folder / "image.bmp")
    rgb.save(folder / "image.tiff")
    frames = [_digit(rng) for _ in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    Image.new("L", (1, 1), 200).save(folder / "one.png")
    _digit(rng, (2000, 3)).save(folder / "wide.png")
    good = sorted(p.name for p in folder.iterdir())
    (folder / "empty.png").write_bytes(b"")
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "text.png").write_text("not an image\n")
    Image.new("1", (12_000, 12_000)).save(folder / "bomb.png")  # 144 M pixels in a few kB
    bad = ["bomb.png", "empty.png", "text.png", "truncated.png"]
    return folder, good, bad


def test_predictor_probabilities_equal_pytorch_on_real_world_files(onnx_model, digits_checkpoint, real_world_folder):
    folder, good, _ = real_world_folder
    checkpoint = load_checkpoint(digits_checkpoint)
    model = model_from_checkpoint(checkpoint)
    spec = Preprocess.from_dict(checkpoint["preprocess"])
    predictions = Predictor(onnx_model, device="cpu").predict([folder / name for name in good], top_k=10)
    for name, prediction in zip(good, predictions):
        assert prediction.error is None, prediction.error
        with torch.inference_mode():
            expected = torch.softmax(model(torch.from_numpy(preprocess_image(folder / name, spec))[None]), 1)[0]
        got = np.zeros(10)
        for label in prediction.top_k:
            got[label.index] = label.prob
        assert np.abs(got - expected.numpy()).max() <= 1e-4, name
        assert [label.prob for label in prediction.top_k] == sorted(
            (label.prob for label in prediction.top_k), reverse=True
        )


@pytest.mark.parametrize("fmt", formats_here())
def test_cli_reads_a_folder_reports_bad_files_and_exits_2(fmt, digits_exports, real_world_folder, tmp_path):
    folder, good, bad = real_world_folder
    model = digits_exports[fmt.name].path
    provider = fmt.open(Path(model)).provider
    proc = run_edgeft(
        ["predict", str(folder), "--model", model, "--json", "--top-k", "3", "--batch-size", "4"],
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    by_name = {r["file"].rsplit("/", 1)[-1]: r for r in records}
    assert sorted(by_name) == sorted(good + bad)
    assert [r["file"] for r in records] == sorted(r["file"] for r in records)  # input order kept
    for name in good:
        assert len(by_name[name]["top_k"]) == 3 and by_name[name]["provider"] == provider
    for name in bad:
        assert set(by_name[name]) == {"file", "error"} and "\n" not in by_name[name]["error"]
    assert "bomb" in by_name["bomb.png"]["error"] or "pixel" in by_name["bomb.png"]["error"]
    assert "Traceback" not in proc.stderr


def test_default_model_is_the_newest_export_and_is_named(onnx_model, tmp_path):
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "model.onnx").write_bytes(open(onnx_model, "rb").read())
    image = tmp_path / "x.png"
    Image.new("L", (8, 8), 128).save(image)
    proc = run_edgeft(["predict", str(image)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "exported/model.onnx" in proc.stderr and "x.png" in proc.stdout


def test_cuda_request_without_cuda_is_an_error(onnx_model, tmp_path):
    image = tmp_path / "x.png"
    Image.new("L", (8, 8), 128).save(image)
    proc = run_edgeft(["predict", str(image), "--model", onnx_model, "--device", "cuda"], cwd=tmp_path)
    if proc.returncode == 0:
        pytest.skip("this machine has a CUDA-capable onnxruntime")
    assert proc.returncode == 2
    assert "CUDA" in one_line_error(proc.stderr)


def test_predict_never_imports_torch(onnx_model, tmp_path):
    image = tmp_path / "x.png"
    Image.new("L", (8, 8), 128).save(image)
    script = (
        "import sys\n"
        "for name in ('torch', 'torchvision'): sys.modules[name] = None  # importing them now fails\n"
        "from edgeft.predict import Predictor\n"
        f"print(Predictor({onnx_model!r}).predict([{str(image)!r}])[0].top_k[0].label)\n"
        f"sys.argv = ['edgeft', 'predict', {str(image)!r}, '--model', {onnx_model!r}, '--json']\n"
        "from edgeft.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=time_limit(60)
    )
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert json.loads(second)["top_k"][0]["label"] == first


# --- hostile and careless input -----------------------------------------------------------------


def _with_metadata_text(source, target, text: str | None):
    """A copy of an exported ONNX file whose edgeft metadata is replaced by `text` (None: removed)."""
    import onnx

    model = onnx.load(str(source))
    del model.metadata_props[:]
    if text is not None:
        onnx.helper.set_model_props(model, {"edgeft": text})
    onnx.save(model, str(target))
    return target


def _gray(path, value=128, size=(8, 8)):
    Image.new("L", size, value).save(path)
    return path


def test_markup_in_file_names_is_shown_as_written(onnx_model, tmp_path):
    (tmp_path / "a[").mkdir()
    names = ["[red]x.png", "a[/]b.png", ":smile:.png", "[bold]"]
    (tmp_path / "[bold]").mkdir()  # an empty folder whose name is markup: its error row is shown as written too
    for name in names[:3]:
        _gray(tmp_path / name)
    proc = run_edgeft(
        ["predict", *names, "--model", onnx_model], cwd=tmp_path, env=offline_env(tmp_path, COLUMNS="200")
    )
    assert proc.returncode == 2, proc.stderr  # the empty folder
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == names
    assert "[bold]: a folder with no image files" in rows[3]


@pytest.mark.parametrize(
    ("option", "word"),
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--top-k", "0"], "--top-k"),
        (["--device", "cuda:x"], "cuda:x"),
        (["--device", "tpu"], "tpu"),
    ],
)
def test_bad_option_values_exit_2_with_one_line(onnx_model, tmp_path, option, word):
    proc = run_edgeft(["predict", str(_gray(tmp_path / "x.png")), "--model", onnx_model, *option], cwd=tmp_path)
    assert proc.returncode == 2
    assert word in one_line_error(proc.stderr)
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("text", "word"),
    [("{not json", "JSON"), ("[1, 2]", "list"), ('{"arch": "resnet18"}', "classes"), (None, "metadata")],
)
@pytest.mark.parametrize("fmt", formats_here())
def test_broken_metadata_is_one_line_and_exit_2(fmt, digits_exports, unsealed, tmp_path, text, word):
    """A file whose edgeft metadata is broken (None: absent, as the format's writer leaves it)."""
    source = unsealed(fmt, None) if text is None else Path(digits_exports[fmt.name].path)
    broken = tmp_path / f"broken{fmt.suffixes[0]}"
    for part, target in zip(fmt.files(source), fmt.files(broken)):
        shutil.copy(part, target)
    if text is not None:
        fmt.write_metadata(broken, text)
    proc = run_edgeft(["predict", str(_gray(tmp_path / "x.png")), "--model", str(broken)], cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line_error(proc.stderr)
    assert broken.name in line and word in line


def test_empty_folder_is_reported_and_the_other_images_predicted(onnx_model, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "notes.txt").write_text("not an image")
    _gray(tmp_path / "x.png")
    proc = run_edgeft(["predict", "empty", "x.png", "no_images", "--model", onnx_model, "--json"], cwd=tmp_path)
    assert proc.returncode == 2
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["file"] for r in records] == ["empty", "x.png", "no_images"]
    assert "no image files" in records[0]["error"] and "no image files" in records[2]["error"]
    assert records[1]["top_k"]
    assert "2 input(s) could not be read" in proc.stderr and "Traceback" not in proc.stderr


def test_long_thin_images_get_one_error_and_the_others_are_predicted(onnx_model, tmp_path):
    for name, size in {"thin.png": (2_000_000, 1), "tall.png": (1, 200_000), "wide.png": (200_000, 1)}.items():
        Image.new("1", size).save(tmp_path / name)
    _gray(tmp_path / "x.png")
    proc = run_edgeft(
        ["predict", "thin.png", "x.png", "tall.png", "wide.png", "--model", onnx_model, "--json"], cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    records = {r["file"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert records["x.png"]["top_k"]
    for name in ("thin.png", "tall.png", "wide.png"):
        assert "too long and thin" in records[name]["error"]


def _exported_with_junk(onnx_model, folder):
    """exported/ as a killed export and a forced one leave it: a good file, then newer junk."""
    import time

    from edgeft.artifact import read_metadata, write_metadata

    folder.mkdir()
    good = folder / "good.onnx"
    good.write_bytes(open(onnx_model, "rb").read())
    time.sleep(0.01)
    data = good.read_bytes()
    forced = folder / "forced.onnx"
    forced.write_bytes(data)
    metadata = read_metadata(forced)
    write_metadata(forced, {**metadata, "validation": {"passed": False, "reason": "accuracy dropped by 12.0 points"}})
    (folder / ".good.k2j3h4.onnx").write_bytes(b"")  # killed before writing
    (folder / ".good.a8d7f6.onnx").write_bytes(data[: len(data) // 2])  # killed while writing
    _with_metadata_text(onnx_model, folder / ".good.q9w8e7.onnx", None)  # killed before the metadata
    (folder / "broken.onnx").write_bytes(data[:1000])
    return good, forced


def test_newest_model_skips_temporaries_and_failed_files(onnx_model, tmp_path):
    from edgeft.errors import InputError
    from edgeft.predict import newest_model

    good, forced = _exported_with_junk(onnx_model, tmp_path / "exported")
    assert newest_model(tmp_path / "exported") == good
    good.unlink()
    with pytest.raises(InputError, match="--model .*forced.onnx"):
        newest_model(tmp_path / "exported")
    forced.unlink()
    with pytest.raises(InputError, match=r"no usable \.onnx\S* file .*1 unreadable"):
        newest_model(tmp_path / "exported")


def test_predict_without_model_uses_the_good_file_and_forced_files_warn(onnx_model, tmp_path):
    good, forced = _exported_with_junk(onnx_model, tmp_path / "exported")
    _gray(tmp_path / "x.png")
    proc = run_edgeft(["predict", "x.png", "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "using exported/good.onnx" in proc.stderr and "warning" not in proc.stderr
    proc = run_edgeft(["predict", "x.png", "--json", "--model", str(forced)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "--force" in warning[0] and "accuracy dropped by 12.0 points" in warning[0]
    assert json.loads(proc.stdout)["top_k"]


def test_ctrl_c_exits_130_and_says_what_was_kept(onnx_model, tmp_path):
    import signal

    image = str(_gray(tmp_path / "x.png"))
    cmd = [*edgeft_command(), "predict", *[image] * 5000, "--model", onnx_model, "--json"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=offline_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert json.loads(proc.stdout.readline())["top_k"]  # running
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=time_limit(60))
    assert proc.returncode == 130
    assert len(out.splitlines()) < 4999  # it stopped
    assert err.strip().splitlines()[-1] == "edgeft: interrupted; the predictions printed above are complete"
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def model_224(digits_checkpoint, tmp_path_factory):
    """The digits model exported for 224 px inputs (resized to 256 first), as ImageNet models are."""
    from edgeft.checkpoint import save_checkpoint
    from edgeft.data import default_preprocess

    folder = tmp_path_factory.mktemp("model_224")
    (folder / "r18-224").mkdir()
    content = {
        **load_checkpoint(digits_checkpoint),
        "preprocess": default_preprocess(size=224, channels=1, resize=256).to_dict(),
    }
    source = save_checkpoint(folder / "r18-224" / "best.pt", content)
    return export(ExportConfig(checkpoint=str(source), out=str(folder), validate=False)).files[0].path


# Runs a command and prints its peak RSS (kB). A child's peak counts the memory of the process it
# was forked from, so the command is started from this small interpreter, never from pytest.
_MEASURE = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code, file=sys.stderr)"
)


def _peak_rss_mb(args: list[str], cwd) -> tuple[float, int]:
    """Peak resident memory (MB) and exit code of one `edgeft` run; its stdout in cwd/stdout.txt."""
    with open(cwd / "stdout.txt", "w") as out:
        measured = subprocess.run(
            [sys.executable, "-c", _MEASURE, *edgeft_command(), *args],
            cwd=cwd,
            env=offline_env(cwd),
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            timeout=time_limit(120),
        )
    peak_kb, code = measured.stderr.split()[-2:]
    return int(peak_kb) / 1024, int(code)


def test_peak_memory_per_image_on_a_224_px_model(model_224, tmp_path):
    refused = {
        "thin.png": (2_000_000, 1),
        "tall.png": (1, 200_000),
        "wide.png": (20_000, 1),
        "wider.png": (200_000, 1),
        "strip.png": (3000, 10),
        "bomb.png": (10_000, 9_500),
    }
    for name, size in refused.items():
        Image.new("1", size).save(tmp_path / name)
    Image.new("L", (1000, 40), 90).save(tmp_path / "banner.png")  # 6400 x 256 once resized: fine
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: decoded, then turned
    Image.new("RGB", (8000, 6000), (30, 60, 90)).save(tmp_path / "photo.jpg", exif=exif)  # 48 M pixels
    for name in [*refused, "banner.png", "photo.jpg"]:
        peak, code = _peak_rss_mb(["predict", name, "--model", model_224, "--json"], tmp_path)
        assert peak < 600, f"{name}: {peak:.0f} MB"
        record = json.loads((tmp_path / "stdout.txt").read_text())
        assert (code, "error" in record) == ((2, True) if name in refused else (0, False)), (name, record)


def test_a_folder_of_large_photos_needs_the_memory_of_one(model_224, tmp_path):
    (tmp_path / "photos").mkdir()
    for i in range(4):  # 48 M pixels each: decoded side by side by the 4 decoder threads, ~800 MB
        Image.new("RGB", (8000, 6000), (40 * i, 60, 90)).save(tmp_path / "photos" / f"{i}.jpg")
    peak, code = _peak_rss_mb(["predict", "photos", "--model", model_224, "--json"], tmp_path)
    assert code == 0
    assert len((tmp_path / "stdout.txt").read_text().splitlines()) == 4
    assert peak < 600, f"{peak:.0f} MB"


def test_collect_images_follows_no_folder_link_and_lists_a_file_once(tmp_path):
    from edgeft.predict import collect_images

    (tmp_path / "photos" / "deep").mkdir(parents=True)
    for name in ("photos/a.png", "photos/deep/b.jpg", "outside.png"):
        Image.new("L", (4, 4)).save(tmp_path / name)
    (tmp_path / "photos" / "s").symlink_to(".")  # used to loop (Path.rglob follows links on some Pythons)
    (tmp_path / "photos" / "up").symlink_to("..")
    (tmp_path / "photos" / "twin.png").symlink_to("a.png")
    (tmp_path / "empty").mkdir()
    found = collect_images([tmp_path / "photos", tmp_path / "outside.png", tmp_path / "photos", tmp_path / "empty"])
    photos = tmp_path / "photos"
    assert found == [photos / "a.png", photos / "deep" / "b.jpg", tmp_path / "outside.png", photos, tmp_path / "empty"]

"""Shared fixtures: an offline, empty torch hub cache; synthetic image folders; the `edgeft`
command run as a real subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# `PYTHONPATH=src python -m pytest` (a checkout's code, not the installed one) must mean the same
# folder in the subprocesses the tests start in other working folders.
if os.environ.get("PYTHONPATH"):
    os.environ["PYTHONPATH"] = os.pathsep.join(map(os.path.abspath, os.environ["PYTHONPATH"].split(os.pathsep)))

# Any download attempt is refused at once (nothing listens on port 9), so "offline" behaves the
# same on a machine that happens to have a network.
OFFLINE_PROXY = "http://127.0.0.1:9"


def offline_env(torch_home: Path, **extra: str) -> dict[str, str]:
    """Environment for an `edgeft` subprocess: private TORCH_HOME, no network, wide console."""
    env = dict(os.environ)
    for key in ("no_proxy", "NO_PROXY"):
        env.pop(key, None)
    env.update(
        TORCH_HOME=str(torch_home),
        http_proxy=OFFLINE_PROXY,
        https_proxy=OFFLINE_PROXY,
        HTTP_PROXY=OFFLINE_PROXY,
        HTTPS_PROXY=OFFLINE_PROXY,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session", autouse=True)
def private_file_cache(tmp_path_factory) -> Path:
    """Every test (and every edgeft it starts) caches bench files in a folder of this session,
    never in the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("edgeft-cache")
    os.environ["EDGEFT_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def sigint_delivered() -> None:
    """A suite started in the background without job control (`cmd &` in a script) inherits SIGINT
    ignored, and edgeft rightly keeps an ignored SIGINT ignored; the interrupt tests need it
    delivered as from a terminal, in this process and the ones it starts."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME for this test, with downloads refused, so the user's cache is never
    read and nothing is fetched."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    for key in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(key, raising=False)
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(key, OFFLINE_PROXY)
    monkeypatch.setattr(urllib.request, "_opener", None)  # rebuilt with the proxy settings above
    import torch.hub

    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # torch.hub.get_dir() follows TORCH_HOME
    return home


_HIDING_SITECUSTOMIZE = """
import os, sys
_HIDDEN = tuple(os.environ["EDGEFT_TEST_HIDDEN_MODULES"].split(","))

class _Hidden:
    def find_spec(self, name, path=None, target=None):
        if name in _HIDDEN or name.startswith(tuple(h + "." for h in _HIDDEN)):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Hidden())
"""


def env_without_modules(tmp_path: Path, *modules: str) -> dict[str, str]:
    """An `edgeft` subprocess environment in which `modules` (and their submodules) cannot be
    imported, as if their extra were not installed."""
    shadow = tmp_path / "hide-modules"
    shadow.mkdir(exist_ok=True)
    (shadow / "sitecustomize.py").write_text(_HIDING_SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(shadow), os.environ.get("PYTHONPATH")) if p)
    return offline_env(tmp_path / ".torch_home", PYTHONPATH=path, EDGEFT_TEST_HIDDEN_MODULES=",".join(modules))


def time_limit(seconds: float) -> float:
    """A subprocess time limit: `seconds` on an idle machine, times EDGEFT_TEST_TIMEOUT_SCALE
    (default 3) for a loaded one. A limit only stops a hung test; no test asserts a duration."""
    return seconds * float(os.environ.get("EDGEFT_TEST_TIMEOUT_SCALE", "3"))


def edgeft_command() -> list[str]:
    exe = shutil.which("edgeft")
    return [exe] if exe else [sys.executable, "-m", "edgeft"]


def run_edgeft(args: list[str], *, cwd: Path, timeout: float = 300, env: dict | None = None):
    """Run the real `edgeft` console script; returns the CompletedProcess (text mode). `timeout`
    is scaled by `time_limit`."""
    env = env if env is not None else offline_env(Path(cwd) / ".torch_home")
    return subprocess.run(
        [*edgeft_command(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=time_limit(timeout)
    )


def export_through_cli(checkpoint: Path, out: Path, fmt: str, precision: str):
    """`edgeft export CHECKPOINT --format FMT --precision PRECISION --out OUT`, as a user runs it:
    (the file it keeps when it passes, the CompletedProcess)."""
    from edgeft import formats

    proc = run_edgeft(
        ["export", str(checkpoint), "--format", fmt, "--precision", precision, "--out", str(out)], cwd=out
    )
    stem = checkpoint.parent.name + ("" if precision == "fp32" else f"-{precision}")
    return out / f"{stem}{formats.get(fmt).suffixes[0]}", proc


def class_image(label: int, *, size: int, mode: str, rng: np.random.Generator) -> Image.Image:
    """A noisy image whose class is visible: a bright block in a label-dependent place and a
    label-dependent colour (grayscale: brightness)."""
    pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    half = size // 2
    top, left = (label % 2) * half, (label // 2 % 2) * half
    colour = np.array([[255, 60, 60], [60, 255, 60], [60, 60, 255], [255, 255, 60]][label % 4], dtype=np.uint8)
    pixels[top : top + half, left : left + half] = colour
    img = Image.fromarray(pixels, "RGB")
    if mode == "RGB":
        return img
    if mode == "P":
        return img.quantize(colors=16)
    return img.convert(mode)


def make_image_folder(
    root: Path,
    counts: dict[str, int],
    *,
    size: int = 20,
    modes: tuple[str, ...] = ("RGB",),
    ext: str = ".png",
    seed: int = 0,
) -> Path:
    """root/<class>/<n><ext> for each class in `counts`; images cycle through `modes`."""
    rng = np.random.default_rng(seed)
    for label, (name, n) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mode = modes[i % len(modes)]
            class_image(label, size=size, mode=mode, rng=rng).save(folder / f"{i:03d}{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Three learnable RGB classes of 12 images each, in one folder (no train/val split)."""
    return make_image_folder(tmp_path / "shapes", {"a": 12, "b": 12, "c": 12})


def one_line_error(stderr: str) -> str:
    """The stderr of a failed command: exactly one line, starting with 'edgeft: error:'."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("edgeft: error:"), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A resnet18 trained briefly on digits at 16 px (shared by the export, validate and predict
    tests): runs/<name>/best.pt inside a session folder."""
    from edgeft.train import TrainConfig, train

    out = tmp_path_factory.mktemp("trained") / "runs"
    config = TrainConfig(img_size=16, epochs=3, batch_size=64, patience=0, out=str(out), name="r18")
    return Path(train(config).best_checkpoint)


def formats_here() -> list:
    """Every registered format as a pytest param (`edgeft.formats.all_formats()`: a new format
    joins by being registered); one whose extra is not installed here is skipped, saying which."""
    from edgeft import formats

    params = []
    for fmt in formats.all_formats():
        missing = fmt.missing(write=True)
        params.append(
            pytest.param(fmt, id=fmt.name, marks=pytest.mark.skipif(missing is not None, reason=str(missing)))
        )
    return params


@pytest.fixture(scope="session")
def digits_exports(digits_checkpoint) -> dict:
    """The fp32 file of every format installed here, exported from `digits_checkpoint` and gated,
    in exported/ beside its runs/ folder: format name -> ExportedFile. Shared: copy before changing."""
    from edgeft.config import ExportConfig
    from edgeft.export import export

    out = digits_checkpoint.parent.parent.parent / "exported"
    result = export(ExportConfig(checkpoint=str(digits_checkpoint), format="all", out=str(out)))
    assert result.passed, [f.validation for f in result.files]
    return {f.format: f for f in result.files}


# How weights are changed after export, for every format: name -> (state_dict key, change)
TAMPERS = {
    "classifier x3": ("fc.weight", lambda w: w * 3),
    "one bias +0.3": ("fc.bias", lambda b: b + 0.3 * (np.arange(len(b)) == 0)),
    "a conv perturbed": ("conv1.weight", lambda w: w + 0.05 * np.random.default_rng(0).standard_normal(w.shape)),
}


@pytest.fixture(scope="session")
def unsealed(digits_checkpoint, tmp_path_factory):
    """`unsealed(fmt, tamper)`: a file written by `fmt`'s own writer, without edgeft's metadata, of the
    digits checkpoint's model with one of TAMPERS applied (None: as trained); written once, shared."""
    import torch

    from edgeft.checkpoint import load_checkpoint
    from edgeft.config import ExportConfig
    from edgeft.formats import WriteRequest
    from edgeft.models import model_from_checkpoint
    from edgeft.preprocess import Preprocess

    checkpoint, folder, written = load_checkpoint(digits_checkpoint), tmp_path_factory.mktemp("unsealed"), {}

    def write(fmt, tamper: str | None) -> Path:
        if (fmt.name, tamper) not in written:
            state = dict(checkpoint["state_dict"])
            if tamper:
                key, change = TAMPERS[tamper]
                state[key] = torch.from_numpy(change(state[key].numpy()).astype(np.float32))
            model = model_from_checkpoint({**checkpoint, "state_dict": state}).eval()
            spec = Preprocess.from_dict(checkpoint["preprocess"])
            config = ExportConfig(checkpoint="", format=fmt.name)
            path = folder / f"{fmt.name}-{tamper or 'as-trained'}{fmt.suffixes[0]}".replace(" ", "_")
            workdir = folder / f"{path.name}.work"
            workdir.mkdir()
            fmt.write(WriteRequest(model, spec, "fp32", "cpu", config, workdir), path)
            written[(fmt.name, tamper)] = path
        return written[(fmt.name, tamper)]

    return write

"""Shared fixtures: an offline, empty torch hub cache; synthetic image folders; the `edgeft`
command run as a real subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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

"""`edgeft predict` on CPU: cold start of the whole command, against the same prediction through a
torch + torchvision script, and throughput on a folder against a bare onnxruntime loop.

The model is a resnet18 (10 classes, 3 channels, 224 px, eval resize 256: the ImageNet recipe)
exported to fp32 ONNX by edgeft; the images are 320 x 240 JPEGs.

- cold start: one `edgeft predict img.jpg --model m.onnx --json` process, wall time and peak
  resident memory, measured by a small launcher process (Linux carries ru_maxrss over from the
  parent across fork + exec, so the launcher must be small); the baseline is a torch +
  torchvision script giving the same probabilities (checkpoint, torchvision transforms, softmax).
- folder: `Predictor.predict` on 500 files (decode on threads + batches of 32) against a bare
  `InferenceSession.run` loop over the same images already decoded and preprocessed, same batch.

Run: python -m pytest benchmarks/test_predict.py --benchmark-only \
         --benchmark-json benchmarks/results/predict-cpu.pytest-benchmark.json
It writes benchmarks/results/predict-cpu.json (medians, ratios, machine).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeft.checkpoint import save_checkpoint
from edgeft.config import ExportConfig
from edgeft.data import default_preprocess
from edgeft.export import export
from edgeft.models import get_model

SUMMARY = Path(__file__).parent / "results" / "predict-cpu.json"
ROUNDS = 5
FOLDER_IMAGES = 500
BATCH = 32

# Runs argv, waits with wait4 and prints {"wall_s", "max_rss_mb", "returncode"}: a small parent,
# so the child's ru_maxrss is its own.
LAUNCHER = r"""
import json, os, sys, time
start = time.perf_counter()
quiet = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_WRONLY, 0) for fd in (1, 2)]
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ, file_actions=quiet)
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall_s": time.perf_counter() - start, "max_rss_mb": usage.ru_maxrss / 1024,
                  "returncode": os.waitstatus_to_exitcode(status)}))
"""

TORCH_SCRIPT = r"""
import sys, torch, torchvision
from PIL import Image
from torchvision import transforms
checkpoint = torch.load(sys.argv[1], weights_only=True)
model = torchvision.models.resnet18(num_classes=10)
model.load_state_dict(checkpoint["state_dict"])
model.eval()
p = checkpoint["preprocess"]
transform = transforms.Compose([transforms.Resize(p["resize"]), transforms.CenterCrop(p["size"]), transforms.ToTensor(),
                                transforms.Normalize(p["mean"], p["std"])])
with torch.inference_mode():
    probs = torch.softmax(model(transform(Image.open(sys.argv[2]).convert("RGB"))[None]), 1)[0]
top = probs.topk(5)
print([(checkpoint["classes"][i], float(v)) for v, i in zip(top.values, top.indices)])
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict_bench")
    spec = default_preprocess(size=224, channels=3, resize=256)
    model = get_model("resnet18", num_classes=10, in_chans=3)
    checkpoint = folder / "best.pt"
    save_checkpoint(
        checkpoint,
        {
            "arch": "resnet18",
            "num_classes": 10,
            "in_chans": 3,
            "classes": [f"class{i}" for i in range(10)],
            "preprocess": spec.to_dict(),
            "state_dict": model.state_dict(),
        },
    )
    onnx_path = export(ExportConfig(checkpoint=str(checkpoint), out=str(folder), validate=False)).files[0].path
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(FOLDER_IMAGES):
        base = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # smooth content, like a photo compresses
        Image.fromarray(base).resize((320, 240), Image.Resampling.BICUBIC).save(images / f"{i:04d}.jpg", quality=90)
    return {"checkpoint": checkpoint, "onnx": onnx_path, "images": images, "image": images / "0000.jpg"}


def _launch(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["returncode"] == 0, argv
    return result


@pytest.fixture(scope="module")
def results(machine):
    collected: dict = {}
    yield collected
    if {"cold_edgeft", "cold_torch", "folder_predictor", "folder_bare"} <= set(collected):
        cold_e, cold_t = collected["cold_edgeft"], collected["cold_torch"]
        summary = {
            "machine": machine,
            "model": "resnet18 fp32 ONNX, 224 px, 10 classes",
            "cold_start": {
                "edgeft_wall_s_median": statistics.median(r["wall_s"] for r in cold_e),
                "edgeft_max_rss_mb_median": statistics.median(r["max_rss_mb"] for r in cold_e),
                "torch_script_wall_s_median": statistics.median(r["wall_s"] for r in cold_t),
                "torch_script_max_rss_mb_median": statistics.median(r["max_rss_mb"] for r in cold_t),
                "speedup": statistics.median(r["wall_s"] for r in cold_t)
                / statistics.median(r["wall_s"] for r in cold_e),
                "rounds": {"edgeft": cold_e, "torch_script": cold_t},
            },
            "folder": {
                "images": FOLDER_IMAGES,
                "batch": BATCH,
                "predictor_images_per_s_median": statistics.median(collected["folder_predictor"]),
                "bare_onnxruntime_images_per_s_median": statistics.median(collected["folder_bare"]),
                "ratio": statistics.median(collected["folder_predictor"]) / statistics.median(collected["folder_bare"]),
            },
            "command": "python -m pytest benchmarks/test_predict.py --benchmark-only "
            "--benchmark-json benchmarks/results/predict-cpu.pytest-benchmark.json",
        }
        SUMMARY.parent.mkdir(parents=True, exist_ok=True)
        SUMMARY.write_text(json.dumps(summary, indent=2) + "\n")


def test_cold_start_edgeft_predict(benchmark, setup, results):
    edgeft = str(Path(sys.executable).with_name("edgeft"))
    argv = [edgeft, "predict", str(setup["image"]), "--model", setup["onnx"], "--json"]
    _launch(argv)  # warm the page cache
    runs = results.setdefault("cold_edgeft", [])
    benchmark.pedantic(lambda: runs.append(_launch(argv)), rounds=ROUNDS, iterations=1)
    benchmark.extra_info["wall_s_median"] = statistics.median(r["wall_s"] for r in runs)
    benchmark.extra_info["max_rss_mb_median"] = statistics.median(r["max_rss_mb"] for r in runs)


def test_cold_start_torch_script(benchmark, setup, results):
    argv = [sys.executable, "-c", TORCH_SCRIPT, str(setup["checkpoint"]), str(setup["image"])]
    _launch(argv)
    runs = results.setdefault("cold_torch", [])
    benchmark.pedantic(lambda: runs.append(_launch(argv)), rounds=ROUNDS, iterations=1)
    benchmark.extra_info["wall_s_median"] = statistics.median(r["wall_s"] for r in runs)
    benchmark.extra_info["max_rss_mb_median"] = statistics.median(r["max_rss_mb"] for r in runs)


def test_folder_predictor(benchmark, setup, results):
    from edgeft.predict import Predictor, collect_images

    predictor = Predictor(setup["onnx"], device="cpu")
    files = collect_images([setup["images"]])
    rates = results.setdefault("folder_predictor", [])

    def run():
        start = time.perf_counter()
        predictions = predictor.predict(files, batch_size=BATCH)
        rates.append(len(predictions) / (time.perf_counter() - start))
        assert all(p.error is None for p in predictions)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_s_median"] = statistics.median(rates)


def test_folder_bare_onnxruntime(benchmark, setup, results):
    import onnxruntime as ort

    from edgeft.predict import Predictor, collect_images
    from edgeft.preprocess import preprocess_image

    spec = Predictor(setup["onnx"], device="cpu").preprocess
    arrays = np.stack([preprocess_image(p, spec) for p in collect_images([setup["images"]])])  # decoded beforehand
    session = ort.InferenceSession(setup["onnx"], providers=["CPUExecutionProvider"])
    rates = results.setdefault("folder_bare", [])

    def run():
        start = time.perf_counter()
        for i in range(0, len(arrays), BATCH):
            session.run(None, {"input": arrays[i : i + BATCH]})
        rates.append(len(arrays) / (time.perf_counter() - start))

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_s_median"] = statistics.median(rates)

"""GPU acceptance, in one command (`python -m pytest -m gpu`): CUDA training with bf16 autocast
and channels_last against the CPU's accuracy, the GPU-resident data path, fp16 TorchScript
through the export gate, onnxruntime's CUDA provider against its CPU one, --compile, and a
one-process NCCL run under torchrun. Every test skips where no CUDA device is usable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeft.checkpoint import load_checkpoint
from edgeft.data import TensorImages, iterate_batches, load_data
from edgeft.train import TrainConfig, autocast_dtype, train

from conftest import make_image_folder, offline_env, time_limit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")


def digits_config(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(img_size=32, epochs=4, batch_size=64, patience=0, workers=0, out=str(tmp_path / "runs"))
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    """resnet18 on digits at 32 px, 4 epochs, with CUDA's defaults (bf16 autocast, channels_last)."""
    tmp = tmp_path_factory.mktemp("cuda")
    return train(digits_config(tmp, device="cuda", name="cuda"))


def test_cuda_defaults_are_bf16_and_channels_last(cuda_run):
    assert cuda_run.device.startswith("cuda")
    assert autocast_dtype(CUDA, None) == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    config = load_checkpoint(Path(cuda_run.run_dir) / "last.pt")["config"]
    assert config["amp"] is None and config["channels_last"] is None  # the CUDA defaults applied


def test_cuda_training_reaches_the_cpu_accuracy(cuda_run, tmp_path):
    cpu = train(digits_config(tmp_path, device="cpu", name="cpu"))
    assert cuda_run.best_val_acc >= cpu.best_val_acc - 0.03
    assert cuda_run.best_val_acc > 0.8


def test_gpu_resident_data_gives_the_cpu_batches():
    """In-memory data on the GPU: the eval batches equal the CPU's, augmented ones stay on the GPU."""
    bundle = load_data("digits", img_size=32)
    on_gpu = TensorImages(bundle.val.images.to(CUDA), bundle.val.labels.to(CUDA))
    gpu_x = torch.cat(
        [x for x, _ in iterate_batches(on_gpu, batch_size=100, preprocess=bundle.preprocess, device=CUDA)]
    )
    cpu_x = torch.cat(
        [
            x
            for x, _ in iterate_batches(
                bundle.val, batch_size=100, preprocess=bundle.preprocess, device=torch.device("cpu")
            )
        ]
    )
    assert gpu_x.device.type == "cuda" and torch.allclose(gpu_x.cpu(), cpu_x, atol=1e-6)
    x, y = next(
        iterate_batches(
            on_gpu, batch_size=64, preprocess=bundle.preprocess, device=CUDA, shuffle=True, augment="standard", seed=3
        )
    )
    assert x.device.type == y.device.type == "cuda" and torch.isfinite(x).all()


def test_fp16_torchscript_export_passes_the_gate(cuda_run, tmp_path):
    from edgeft.config import ExportConfig
    from edgeft.export import export

    result = export(
        ExportConfig(
            checkpoint=cuda_run.best_checkpoint,
            format="torchscript",
            precision="fp16",
            device="cuda",
            out=str(tmp_path / "exported"),
        )
    )
    assert result.passed and all(f.kept for f in result.files)
    assert Path(result.files[0].path).suffix == ".ts"


def test_onnxruntime_cuda_provider_matches_the_cpu(cuda_run, tmp_path):
    import onnxruntime as ort

    from edgeft.config import ExportConfig
    from edgeft.export import export
    from edgeft.predict import Predictor

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    (path,) = [f.path for f in export(ExportConfig(checkpoint=cuda_run.best_checkpoint, out=str(tmp_path))).files]
    images = make_image_folder(tmp_path / "images", {"a": 4}, size=40)
    files = sorted((images / "a").iterdir())
    on_gpu, on_cpu = Predictor(path, device="cuda"), Predictor(path, device="cpu")
    assert on_gpu.provider == "CUDAExecutionProvider"
    gpu, cpu = on_gpu.predict(files, top_k=3), on_cpu.predict(files, top_k=3)
    for a, b in zip(gpu, cpu):
        assert a.error is None and b.error is None
        assert a.top_k[0].label == b.top_k[0].label
        assert np.allclose([label.prob for label in a.top_k], [label.prob for label in b.top_k], atol=1e-3)


def test_compiled_cuda_training(tmp_path):
    result = train(digits_config(tmp_path, device="cuda", compile=True, epochs=2, name="compiled"))
    state = load_checkpoint(result.best_checkpoint)["state_dict"]
    assert not any(key.startswith(("_orig_mod.", "module.")) for key in state)
    assert result.best_val_acc > 0.5


def test_one_process_nccl_run(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        "-m",
        "edgeft",
        "train",
        "--device",
        "cuda",
        "--img-size",
        "32",
        "--epochs",
        "2",
        "--name",
        "nccl",
    ]
    proc = subprocess.run(
        command,
        cwd=tmp_path,
        env=offline_env(tmp_path / ".torch_home"),
        capture_output=True,
        text=True,
        timeout=time_limit(600),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "nccl" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["ranks_identical"] is True and summary["device"].startswith("cuda")

"""One benchmark row, measured in a fresh process so load time and peak memory are its own, and
no other session's threads share the cores: `python -m edgeft.timing '<json spec>'` prints one
JSON result (`run_measurement` starts it). `edgeft bench` times its rows and `--precision auto`
its candidates this way. An exported file is opened by its format exactly as the gate and
`edgeft predict` open it, so a timing process imports only that runtime (torch only for the
PyTorch runtimes and ExecuTorch's). The peaks `% peak` divides by are measured here too, one
runtime's matrix products per process (`edgeft.peak`)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["measure", "run_measurement"]


def _load(spec: dict) -> Callable[[np.ndarray], object]:
    """A function running one batch to completion (results synchronized to the host): an exported
    file opened by its format, as `edgeft predict` and the gate open it, or a checkpoint run eagerly."""
    if spec["runtime"] != "eager":
        from edgeft import formats

        runner = formats.by_runtime(spec["runtime"]).open(
            Path(spec["file"]), device=spec["device"], threads=spec["threads"]
        )
        spec["provider"] = runner.provider
        return runner.infer
    return _load_eager(spec)


def _load_eager(spec: dict) -> Callable[[np.ndarray], object]:
    """A checkpoint's model in PyTorch eager mode (fp16 on CUDA)."""
    import torch

    from edgeft.checkpoint import load_checkpoint
    from edgeft.models import model_from_checkpoint

    device = spec["device"]
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    module = model_from_checkpoint(load_checkpoint(spec["file"])).to(device)
    dtype = torch.float16 if spec["precision"] == "fp16" else torch.float32
    module = module.to(dtype)
    spec["provider"] = f"torch-{device}"

    def run(x: np.ndarray):
        with torch.inference_mode():
            out = module(torch.from_numpy(x).to(device, dtype))
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            return out

    return run


def measure(spec: dict) -> list[dict]:
    """Load once, then per batch size: first inference, `warmup` untimed and up to `iterations`
    timed runs (stopping early past `budget_s`, after at least 5); latencies in milliseconds.
    Peak memory is the process's, after all batch sizes."""
    started = time.perf_counter()
    run = _load(spec)
    load_s = time.perf_counter() - started
    results = [_time_batch(run, spec, batch) for batch in spec["batches"]]
    peak = _peak_rss_mb()
    return [{**r, "provider": spec["provider"], "load_s": load_s, "peak_rss_mb": peak} for r in results]


def _peak_rss_mb() -> float:
    """This process's resident peak. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the
    parent across fork and exec, so a child of a big process would report its parent's size."""
    try:
        with open("/proc/self/status") as status:
            line = next(entry for entry in status if entry.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time_batch(run: Callable[[np.ndarray], object], spec: dict, batch: int) -> dict:
    x = np.random.default_rng(0).standard_normal(
        (batch, spec["channels"], spec["size"], spec["size"]), dtype=np.float32
    )
    t = time.perf_counter()
    run(x)
    first_ms = 1000 * (time.perf_counter() - t)
    for _ in range(spec["warmup"]):
        run(x)
    latencies = []
    budget_end = time.perf_counter() + spec["budget_s"]
    while len(latencies) < spec["iterations"] and (len(latencies) < 5 or time.perf_counter() < budget_end):
        t = time.perf_counter()
        run(x)
        latencies.append(1000 * (time.perf_counter() - t))
    ms = np.asarray(latencies)
    return {
        "batch": batch,
        "first_ms": first_ms,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "images_per_s": batch * 1000 / float(ms.mean()),
        "iterations": len(latencies),
    }


def run_measurement(spec: dict, timeout: float) -> list[dict] | dict | str:
    """Run `spec` (a row; {"measure": "gemms", ...}: a runtime's matrix products; {"measure":
    "bandwidth", ...}: the memory bandwidth) in a fresh `python -m edgeft.timing` process; its
    results, or the reason it failed."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "edgeft.timing", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return lines[-1] if lines else f"exit status {proc.returncode}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(request: dict) -> object:
    """What the request asks, measured in this process."""
    what = request.pop("measure", None)
    if what is None:
        return measure(request)
    from edgeft import peak

    return peak.memory_bandwidth(**request) if what == "bandwidth" else peak.measure_gemms(**request)


if __name__ == "__main__":
    print(json.dumps(_main(json.loads(sys.argv[1]))))

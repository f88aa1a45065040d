"""Shared pieces of the benchmark suites: the machine description that goes into every saved result,
and the summary JSON a suite writes when it ends.

The suites here are collected only when `benchmarks/` is named on the command line (pyproject's
`testpaths` is `tests`), so `python -m pytest` never runs them.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo on Linux, else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict:
    """CPU model, cores, OS, Python, torch and torchvision versions, torch threads, date (UTC)."""
    import torch
    import torchvision

    import edgeft

    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "edgeft": edgeft.__version__,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def pytest_benchmark_update_machine_info(config, machine_info):  # noqa: ARG001 - pytest-benchmark hook
    """Name the machine in pytest-benchmark's own JSON too (`machine_info.edgeft_machine`)."""
    machine_info["edgeft_machine"] = describe_machine()


@pytest.fixture(scope="session")
def machine() -> dict:
    """The machine a benchmark ran on, for the summaries the suites write."""
    return describe_machine()


def _saved_summary(path: Path, summarize: Callable[[dict], dict], *, merge: bool = False) -> Iterator[dict]:
    """Yields a dict for the results of a suite's tests; when the suite ends, writes
    `summarize(results)` to `path` as indented JSON. With `merge`, always, over what the file holds
    already (a single test can be re-run); without, only when a test put something in."""
    results: dict = {}
    yield results
    if results or merge:
        saved = json.loads(path.read_text()) if merge and path.exists() else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**saved, **summarize(results)}, indent=2) + "\n")


@pytest.fixture(scope="session")
def saved_summary():
    """For a suite's module fixture: `yield from saved_summary(path, summarize, merge=False)`."""
    return _saved_summary


# The timing loop of the plain scripts that check `edgeft bench`: p50(run) in ms, the median of 30
# runs after 3 warm-up runs.
P50_SCRIPT = r"""
import statistics, time
def p50(run):
    for _ in range(3):
        run()
    times = []
    for _ in range(30):
        t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)
"""

ONNXRUNTIME_SCRIPT = (
    P50_SCRIPT
    + r"""
import json, sys
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
feed = session.get_inputs()[0]
x = np.random.default_rng(1).standard_normal([1, *feed.shape[1:]], dtype=np.float32)
print(json.dumps({"p50_ms": p50(lambda: session.run(None, {feed.name: x}))}))
"""
)


# Each runtime's own loop, nothing from edgeft: how a user would check a reported number. The
# OpenVINO loop takes the compile config as JSON; {"recorded": true} uses the precision the file pins.
OPENVINO_SCRIPT = (
    P50_SCRIPT
    + r"""
import json, sys
import numpy as np, openvino as ov
core = ov.Core()
model = core.read_model(sys.argv[1])
config = json.loads(sys.argv[2])
if config.pop("recorded", False):
    config["INFERENCE_PRECISION_HINT"] = model.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str)
compiled = core.compile_model(model, "CPU", config)
shape = [1, *(d.get_length() for d in list(model.inputs[0].partial_shape)[1:])]
x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
request = compiled.create_infer_request()
print(json.dumps({"p50_ms": p50(lambda: request.infer({0: x}))}))
"""
)

LITERT_SCRIPT = (
    P50_SCRIPT
    + r"""
import json, os, sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter
interpreter = Interpreter(model_path=sys.argv[1], num_threads=os.cpu_count())
interpreter.allocate_tensors()
(source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
x = np.random.default_rng(1).standard_normal(source["shape"], dtype=np.float32)
if source["dtype"] != np.float32:
    scale, zero = source["quantization"]
    x = np.clip(np.round(x / scale) + zero, -128, 127).astype(source["dtype"])
def run():
    interpreter.set_tensor(source["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(target["index"])
print(json.dumps({"p50_ms": p50(run)}))
"""
)

EXECUTORCH_SCRIPT = (
    P50_SCRIPT
    + r"""
import json, os, sys
import torch
from executorch.extension.pybindings import portable_lib
from executorch.runtime import Runtime
portable_lib._unsafe_reset_threadpool(os.cpu_count())
method = Runtime.get().load_program(sys.argv[1]).load_method("forward")
x = torch.randn([1, *method.metadata.input_tensor_meta(0).sizes()[1:]], generator=torch.Generator().manual_seed(1))
print(json.dumps({"p50_ms": p50(lambda: method.execute((x,)))}))
"""
)

PLAIN_LOOPS = {
    "onnx": ONNXRUNTIME_SCRIPT,
    "openvino": OPENVINO_SCRIPT,
    "litert": LITERT_SCRIPT,
    "executorch": EXECUTORCH_SCRIPT,
}


def script_p50(script: str, path: str | Path, *args: str) -> float:
    """The p50 in ms a timing script prints (its last line, JSON) for a file, run in a fresh process."""
    out = subprocess.run([sys.executable, "-c", script, str(path), *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["p50_ms"]


def plain_p50(fmt: str, path: str | Path, *args: str) -> float:
    """Batch-1 p50 in ms of a `fmt` file timed by its runtime's plain loop in a fresh process."""
    return script_p50(PLAIN_LOOPS[fmt], path, *args)


def independent_onnxruntime_p50(path: str | Path) -> float:
    """Batch-1 p50 in ms of an ONNX file timed by a plain onnxruntime script in a fresh process,
    with onnxruntime's default session options."""
    return plain_p50("onnx", path)

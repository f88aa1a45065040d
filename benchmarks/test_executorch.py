"""ExecuTorch (XNNPACK) in `edgeft bench`, checked against an independent measurement, and what each
mission backbone runs outside the XNNPACK delegate.

- agreement: resnet18 at 224 px, batch 1, random weights: executorch fp32 and int8 p50 from
  `edgeft bench` against a plain script in a fresh process (torchvision's resnet18, static-shape
  `torch.export`, its own PT2E int8, `to_edge_transform_and_lower`, `executorch.runtime`, a timing
  loop), and the executorch / onnxruntime fp32 ratios from both.
- backbones: `edgeft bench` rows for onnxruntime and executorch, fp32 and int8, batch 1 and 8, for
  resnet18, resnext50_32x4d and densenet121; the report is kept as results/bench-executorch-cpu.*.
- delegation: `edgeft.formats.executorch.write_pte` on each backbone, fp32 and int8: lowering seconds, file size,
  the operators left outside the delegate, and from ExecuTorch's event trace (ETDump) the time a
  batch-1 run spends outside the delegate calls and in each of those operators.

Run: python -m pytest benchmarks/test_executorch.py --benchmark-only \
         --benchmark-json benchmarks/results/executorch-cpu.pytest-benchmark.json
It writes benchmarks/results/executorch-cpu.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import P50_SCRIPT

pytest.importorskip("executorch.runtime")

RESULTS = Path(__file__).parent / "results"
SUMMARY = RESULTS / "executorch-cpu.json"
EDGEFT = str(Path(sys.executable).with_name("edgeft"))
BACKBONES = ("resnet18", "resnext50_32x4d", "densenet121")


@pytest.fixture(scope="module")
def summary(machine, saved_summary):
    """Results of the tests that ran, merged into the saved summary (a single test can be re-run)."""
    from edgeft.cpu import cpu_features

    yield from saved_summary(
        SUMMARY, lambda results: {**results, "machine": {**machine, "cpu_features": cpu_features()}}, merge=True
    )


# A plain script, in a fresh process like each bench row: nothing from edgeft.
INDEPENDENT = (
    P50_SCRIPT
    + r"""
import json, os, statistics, sys, time
import numpy as np, onnxruntime as ort, torch, torchvision
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
from executorch.exir import to_edge_transform_and_lower
from executorch.extension.pybindings import portable_lib
from executorch.runtime import Runtime
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
folder, threads = sys.argv[1], os.cpu_count()
portable_lib._unsafe_reset_threadpool(threads)
model = torchvision.models.resnet18().eval()
x = torch.randn(1, 3, 224, 224)
def lower(module, name):
    program = to_edge_transform_and_lower(torch.export.export(module, (x,)), partitioner=[XnnpackPartitioner()])
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(program.to_executorch().buffer)
    return Runtime.get().load_program(path).load_method("forward")
fp32 = lower(model, "independent-fp32.pte")
quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
with torch.no_grad():
    for _ in range(8):
        prepared(torch.randn(1, 3, 224, 224))
int8 = lower(convert_pt2e(prepared), "independent-int8.pte")
onnx_path = os.path.join(folder, "independent.onnx")
torch.onnx.export(model, (x,), onnx_path, input_names=["input"], dynamo=True, external_data=False)
options = ort.SessionOptions(); options.intra_op_num_threads = threads
session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
xn = x.numpy()
result = {"onnxruntime_fp32_p50_ms": p50(lambda: session.run(None, {"input": xn})),
          "executorch_fp32_p50_ms": p50(lambda: fp32.execute((x,))),
          "executorch_int8_p50_ms": p50(lambda: int8.execute((x,)))}
print(json.dumps(result))
"""
)


def _bench(models: tuple[str, ...], batches: str, out: Path) -> dict:
    """`edgeft bench` for onnxruntime and executorch, fp32 and int8: (model, runtime, precision, batch) -> row."""
    subprocess.run(
        [
            EDGEFT,
            "bench",
            "--models",
            ",".join(models),
            "--runtimes",
            "onnxruntime,executorch",
            "--precisions",
            "fp32,int8",
            "--batch-sizes",
            batches,
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    report = sorted(out.glob("bench-*.json"))[-1]
    rows = json.loads(report.read_text())["rows"]
    return {(r["model"], r["runtime"], r["precision"], r["batch"]): r for r in rows}


def _agreement_pair(folder: Path) -> dict:
    rows = _bench(("resnet18",), "1", folder)
    ours = {
        f"{runtime}_{precision}_p50_ms": rows[("resnet18", runtime, precision, 1)]["p50_ms"]
        for runtime, precision in (("onnxruntime", "fp32"), ("executorch", "fp32"), ("executorch", "int8"))
    }
    out = subprocess.run([sys.executable, "-c", INDEPENDENT, str(folder)], check=True, capture_output=True, text=True)
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    for result in (ours, theirs):
        result["int8_speedup_vs_onnxruntime_fp32"] = (
            result["onnxruntime_fp32_p50_ms"] / result["executorch_int8_p50_ms"]
        )
    return {"edgeft_bench": ours, "independent": theirs}


def test_executorch_bench_agrees_with_an_independent_measurement(benchmark, tmp_path, summary):
    pairs = []
    benchmark.pedantic(lambda: pairs.append(_agreement_pair(tmp_path)), rounds=2, iterations=1)
    disagreement = {
        key: [abs(p["edgeft_bench"][key] / p["independent"][key] - 1) for p in pairs]
        for key in ("executorch_fp32_p50_ms", "executorch_int8_p50_ms")
    }
    summary["executorch_resnet18_b1_agreement"] = {"pairs": pairs, "relative_disagreement": disagreement}
    benchmark.extra_info["relative_disagreement"] = disagreement


def test_executorch_bench_rows_for_the_mission_backbones(benchmark, tmp_path, summary):
    rows = {}
    benchmark.pedantic(lambda: rows.update(_bench(BACKBONES, "1,8", tmp_path)), rounds=1, iterations=1)
    for report in tmp_path.glob("bench-*"):
        shutil.copy(report, RESULTS / f"bench-executorch-cpu{report.suffix}")
    table = {}
    for model in BACKBONES:
        for batch in (1, 8):
            cells = {
                f"{runtime}_{precision}": rows[(model, runtime, precision, batch)]
                for runtime in ("onnxruntime", "executorch")
                for precision in ("fp32", "int8")
            }
            table[f"{model}_b{batch}"] = {
                key: {k: row[k] for k in ("p50_ms", "load_s", "file_mb", "peak_rss_mb", "status")}
                for key, row in cells.items()
            }
    summary["bench_rows"] = table


def _time_outside_delegate(path: Path, size: int, runs: int = 10) -> dict:
    """ExecuTorch's own event trace (ETDump) of `runs` batch-1 runs: per-run p50 milliseconds of the
    whole method, of the XNNPACK delegate calls, and of each operator that ran outside them."""
    import torch
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(path, enable_etdump=True)
    method = program.load_method("forward")
    for _ in range(runs):
        method.execute((torch.randn(1, 3, size, size),))
    trace = path.with_suffix(".etdp")
    program.write_etdump_result_to_file(str(trace), None)
    totals: dict[str, float] = {}
    for block in Inspector(etdump_path=str(trace)).event_blocks:
        for event in block.events:
            if event.perf_data is not None and (
                event.name.startswith("native_call") or event.name in ("DELEGATE_CALL", "Method::execute")
            ):
                totals[event.name] = totals.get(event.name, 0.0) + float(event.perf_data.p50)
    execute, delegate = totals.pop("Method::execute"), totals.pop("DELEGATE_CALL")
    return {
        "execute_ms": execute,
        "delegate_calls_ms": delegate,
        "outside_ms": execute - delegate,
        "outside_share": 1 - delegate / execute,
        "native_ops_ms": totals,
    }


def test_delegation_of_the_mission_backbones(benchmark, tmp_path, summary):
    import numpy as np

    from edgeft.data import default_preprocess
    from edgeft.formats.executorch import write_pte
    from edgeft.models import get_model

    spec = default_preprocess(size=224, channels=3)
    calibration = np.random.default_rng(0).standard_normal((8, 3, 224, 224), dtype=np.float32)
    found = {}

    def lower_all():
        for name in BACKBONES:
            model = get_model(name, num_classes=1000, in_chans=3)
            for precision in ("fp32", "int8"):
                path = tmp_path / f"{name}-{precision}.pte"
                started = time.perf_counter()
                delegation = write_pte(model, spec, path, precision=precision, calibration=calibration)
                found[f"{name}_{precision}"] = {
                    "lowering_s": time.perf_counter() - started,
                    "file_mb": os.path.getsize(path) / 2**20,
                    "delegation": delegation,
                    "batch1_trace": _time_outside_delegate(path, 224),
                }

    benchmark.pedantic(lower_all, rounds=1, iterations=1)
    summary["delegation"] = found

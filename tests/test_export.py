"""edgeft export / validate / info: files that run like the checkpoint, carry their metadata, and
are kept only when they pass their accuracy gate."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from edgeft.artifact import read_metadata
from edgeft.checkpoint import load_checkpoint
from edgeft.config import OPSETS, ExportConfig
from edgeft.data import iterate_batches, load_checkpoint_data
from edgeft.export import export
from edgeft.models import model_from_checkpoint

from conftest import formats_here, one_line_error, run_edgeft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(digits_checkpoint, digits_exports, tmp_path_factory):
    """fp32, fp16 and int8 ONNX and an fp32 TorchScript of the digits checkpoint."""
    out = tmp_path_factory.mktemp("exported")
    files = {(name, "fp32"): digits_exports[name] for name in ("onnx", "torchscript")}
    for precision in ("fp16", "int8"):
        result = export(ExportConfig(checkpoint=str(digits_checkpoint), precision=precision, out=str(out)))
        assert result.passed, [f.validation for f in result.files]
        files[("onnx", precision)] = result.files[0]
    return files


def _val_inputs(checkpoint_path):
    checkpoint = load_checkpoint(checkpoint_path)
    bundle = load_checkpoint_data(checkpoint)
    batches = list(iterate_batches(bundle.val, batch_size=64, preprocess=bundle.preprocess, device=torch.device("cpu")))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return checkpoint, x, y


def test_onnx_fp32_is_one_file_with_dynamic_batch_and_matches_pytorch(exported, digits_checkpoint):
    path = exported[("onnx", "fp32")].path
    folder_files = {p.name for p in __import__("pathlib").Path(path).parent.iterdir()}
    assert not any(name.endswith(".data") for name in folder_files)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # the batch is dynamic
    assert [d.dim_value for d in dims[1:]] == [1, 16, 16]  # channels, height, width are fixed
    checkpoint, x, _ = _val_inputs(digits_checkpoint)
    reference = model_from_checkpoint(checkpoint)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch in (x[:1], x[:5]):
        with torch.inference_mode():
            expected = reference(batch).numpy()
        np.testing.assert_allclose(session.run(None, {"input": batch.numpy()})[0], expected, atol=1e-4, rtol=1e-4)


def test_metadata_describes_the_file(exported, digits_checkpoint):
    checkpoint = load_checkpoint(digits_checkpoint)
    sha = hashlib.sha256(digits_checkpoint.read_bytes()).hexdigest()
    for (fmt, precision), f in exported.items():
        meta = read_metadata(f.path)
        assert meta["arch"] == "resnet18" and meta["precision"] == precision
        assert meta["classes"] == checkpoint["classes"]
        assert meta["preprocess"] == checkpoint["preprocess"]
        assert meta["source_checkpoint"]["sha256"] == sha
        assert meta["input"]["name"] == "input" and meta["input"]["layout"] == "NCHW"
        assert meta["validation"]["passed"] is True
        assert meta["validation"]["batch_sizes"][0] == 1 and meta["validation"]["batch_sizes"][1] > 1
        runs_it = {"onnx": {"onnx", "onnxruntime"}, "torchscript": set()}[fmt]  # beyond torch, which wrote it
        assert {"edgeft", "torch", "torchvision", *runs_it} <= set(meta["versions"])
        assert (meta["opset"] is not None) == (fmt == "onnx")


def test_fp16_keeps_float32_io_and_int8_is_small_and_quantized(exported):
    fp32 = exported[("onnx", "fp32")]
    fp16, int8 = exported[("onnx", "fp16")], exported[("onnx", "int8")]
    model16 = onnx.load(fp16.path)
    assert model16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model16.graph.initializer)
    assert fp16.size_bytes < 0.6 * fp32.size_bytes
    assert int8.size_bytes <= 0.3 * fp32.size_bytes
    ops = {node.op_type for node in onnx.load(int8.path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    for f in (fp16, int8):
        assert f.validation.acc_drop <= {"fp16": 0.1, "int8": 1.0}[f.precision]


def test_torchscript_matches_pytorch_and_carries_metadata(exported, digits_checkpoint):
    path = exported[("torchscript", "fp32")].path
    extra = {"edgeft.json": ""}
    module = torch.jit.load(path, _extra_files=extra)
    assert json.loads(extra["edgeft.json"])["classes"] == [str(d) for d in range(10)]
    checkpoint, x, _ = _val_inputs(digits_checkpoint)
    with torch.inference_mode():
        torch.testing.assert_close(module(x[:7]), model_from_checkpoint(checkpoint)(x[:7]), atol=1e-4, rtol=1e-4)


def test_validate_json_matches_an_independent_onnxruntime_evaluation(exported, digits_checkpoint, tmp_path):
    path = exported[("onnx", "int8")].path
    proc = run_edgeft(["validate", path, "--reference", str(digits_checkpoint), "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    checkpoint, x, y = _val_inputs(digits_checkpoint)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {"input": x[i : i + 1].numpy()})[0] for i in range(len(x))])
    with torch.inference_mode():
        ref_logits = model_from_checkpoint(checkpoint)(x).numpy()
    exported_acc = float((logits.argmax(1) == y.numpy()).mean())
    reference_acc = float((ref_logits.argmax(1) == y.numpy()).mean())
    assert report["n_images"] == len(y)
    assert report["exported_acc"] == pytest.approx(exported_acc, abs=1 / len(y) + 1e-9)
    assert report["reference_acc"] == pytest.approx(reference_acc)
    assert report["acc_drop"] == pytest.approx(100 * (report["reference_acc"] - report["exported_acc"]))
    assert report["top1_agreement"] >= float((logits.argmax(1) == ref_logits.argmax(1)).mean()) - 1 / len(y) - 1e-9
    assert report["max_abs_logit_diff"] >= float(np.abs(logits - ref_logits).max()) - 1e-5
    assert report["passed"] is True


def test_altered_weights_are_refused_as_modified(exported, tmp_path):
    model = onnx.load(exported[("onnx", "fp32")].path)
    conv = max(model.graph.initializer, key=lambda t: np.prod(t.dims))  # the largest weight tensor
    weights = numpy_helper.to_array(conv)
    conv.CopyFrom(
        numpy_helper.from_array(np.random.default_rng(0).permutation(weights.ravel()).reshape(weights.shape), conv.name)
    )
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, tampered)
    for command in (["validate", str(tampered)], ["predict", "--model", str(tampered), str(tampered)]):
        proc = run_edgeft(command, cwd=tmp_path)
        assert proc.returncode == 2
        assert "modified after export" in one_line_error(proc.stderr)


def test_failed_gate_removes_the_file_and_keeps_an_older_good_one(digits_checkpoint, tmp_path):
    out = tmp_path / "out"
    ok = run_edgeft(["export", str(digits_checkpoint), "--out", str(out)], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    good = out / "r18.onnx"
    good_bytes = good.read_bytes()
    failing = run_edgeft(["export", str(digits_checkpoint), "--out", str(out), "--max-acc-drop", "-1"], cwd=tmp_path)
    assert failing.returncode == 1
    one_line_error(failing.stderr)
    assert good.read_bytes() == good_bytes  # the earlier, good file is untouched
    assert sorted(p.name for p in out.iterdir()) == ["r18.onnx"]  # no temporary left behind
    forced = run_edgeft(
        ["export", str(digits_checkpoint), "--out", str(out), "--max-acc-drop", "-1", "--force"], cwd=tmp_path
    )
    assert forced.returncode == 1
    assert read_metadata(good)["validation"]["passed"] is False  # kept, and marked failed


def test_info_prints_the_metadata(exported, tmp_path):
    proc = run_edgeft(["info", exported[("onnx", "int8")].path, "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["precision"] == "int8"


def test_refuses_foreign_checkpoints_and_unsafe_files(tmp_path, digits_checkpoint):
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    assert "not an edgeft checkpoint" in one_line_error(run_edgeft(["export", str(plain)], cwd=tmp_path).stderr)

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "edgeft.checkpoint/1", "x": Payload()}, unsafe)
    proc = run_edgeft(["export", str(unsafe)], cwd=tmp_path)
    assert proc.returncode == 2 and "code ran" not in proc.stdout
    assert "weights-only" in one_line_error(proc.stderr)

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["input"], ["logits"])],
        "g",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1])],
        initializer=[onnx.helper.make_tensor("w", onnx.TensorProto.FLOAT, [1], [0.0])],
    )
    outside = onnx.helper.make_model(graph)
    tensor = outside.graph.initializer[0]
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../etc/passwd")
    onnx.helper.set_model_props(outside, {"edgeft": json.dumps({"classes": ["a"]})})
    bad = tmp_path / "model" / "bad.onnx"
    bad.parent.mkdir()
    onnx.save(outside, bad)
    for command in (["validate", str(bad)], ["predict", "--model", str(bad), str(bad)]):
        proc = run_edgeft(command, cwd=tmp_path)
        assert proc.returncode == 2
        assert "metadata" in one_line_error(proc.stderr)  # refused before any tensor data is read


def test_small_stem_checkpoint_exports_and_passes(tmp_path):
    from edgeft.train import TrainConfig, train

    best = train(
        TrainConfig(img_size=16, epochs=1, stem="small", out=str(tmp_path / "runs"), name="small")
    ).best_checkpoint
    assert load_checkpoint(best)["stem"] == "small"
    result = export(ExportConfig(checkpoint=best, out=str(tmp_path / "exported")))
    assert result.passed and result.files[0].validation.top1_agreement == 1.0


@pytest.mark.parametrize("opset", list(OPSETS))
def test_each_supported_opset_is_the_opset_written(tmp_path, opset):
    """The exporter itself, on a tiny network (the backbone does not matter to the opset)."""
    from edgeft.data import default_preprocess
    from edgeft.formats.onnx import write_onnx

    class Tiny(torch.nn.Module):  # forward(x), as torchvision's models
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.conv(x).relu().mean((2, 3)))

    torch.manual_seed(0)
    write_onnx(Tiny().eval(), default_preprocess(size=8, channels=1), tmp_path / "tiny.onnx", opset=opset)
    model = onnx.load(tmp_path / "tiny.onnx")
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {opset}


def test_a_chosen_opset_is_written_and_recorded(digits_checkpoint, tmp_path):
    result = export(ExportConfig(checkpoint=str(digits_checkpoint), out=str(tmp_path), opset=OPSETS[0], validate=False))
    model = onnx.load(result.files[0].path)
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {OPSETS[0]}
    assert read_metadata(result.files[0].path)["opset"] == OPSETS[0]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--opset", str(OPSETS[0] - 1)], "--opset must be between"),
        (["--opset", str(OPSETS[-1] + 1)], "--opset must be between"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--device", "cuda:x"], "is not a device"),
        (["--device", "tpu"], "is not a device"),
        (["--out", "a-file"], "is a file, not a folder"),
        (["--name", "../outside"], "--name must be a plain name"),
    ],
)
def test_bad_export_options_are_one_line_and_exit_2(digits_checkpoint, tmp_path, options, message):
    (tmp_path / "a-file").write_text("x")
    proc = run_edgeft(["export", str(digits_checkpoint), *options], cwd=tmp_path)
    assert proc.returncode == 2
    assert message in one_line_error(proc.stderr)
    assert not (tmp_path / "exported").exists()


def test_stale_temporaries_of_dead_exports_are_removed(digits_checkpoint, tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".r18.{dead.pid}.edgeft-tmp.onnx"
    live = tmp_path / f".r18.{os.getppid()}.edgeft-tmp.onnx"  # a running process: maybe another export
    other = tmp_path / ".r18.notes.onnx"  # not edgeft's naming
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    export(ExportConfig(checkpoint=str(digits_checkpoint), out=str(tmp_path), validate=False))
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "r18.onnx").is_file()


def _with_delays(param, delays) -> list:
    return [pytest.param(*param.values, d, id=f"{param.id}-{d}", marks=param.marks) for d in delays]


# every format killed as its file appears; ONNX also later
KILL_DELAYS = [
    case for i, f in enumerate(formats_here()) for case in _with_delays(f, (0.0, 1.0, 3.0) if i == 0 else (0.0,))
]


@pytest.mark.parametrize("fmt, delay", KILL_DELAYS)
def test_killed_export_leaves_the_last_good_file_in_use(fmt, delay, digits_checkpoint, digits_exports, tmp_path):
    """SIGKILL `delay` s after the export's temporary file appears: the earlier file is intact, the
    new one is absent or complete, and predict uses one of them."""
    import signal
    import subprocess
    import time

    from conftest import edgeft_command, offline_env, time_limit

    out = tmp_path / "exported"
    out.mkdir()
    earlier = Path(digits_exports[fmt.name].path)
    for part in fmt.files(earlier):
        shutil.copy(part, out / part.name)
    good = earlier.read_bytes()
    proc = subprocess.Popen(
        [
            *edgeft_command(),
            "export",
            str(digits_checkpoint),
            "--format",
            fmt.name,
            "--out",
            str(out),
            "--name",
            "newer",
        ],
        cwd=tmp_path,
        env=offline_env(tmp_path / ".torch_home"),
    )
    deadline = time.monotonic() + time_limit(120)
    while not list(out.glob(f".newer.*{fmt.suffixes[0]}")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # until the temporary file appears
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / earlier.name).read_bytes() == good
    newer = out / f"newer{fmt.suffixes[0]}"
    assert not newer.exists() or read_metadata(newer)  # never a half-written final file
    if not fmt.torch_free:
        return
    image = Path(__file__).parent.parent / "examples" / "digits" / "3.png"
    predicted = run_edgeft(["predict", str(image), "--json"], cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    used = predicted.stderr.split("using ", 1)[1].split()[0]
    assert Path(used).name in (earlier.name, newer.name)


def _machine_paths() -> list[bytes]:
    """Folders of this machine that an exported file must never name."""
    import site
    import tempfile

    found = {
        Path.home(),
        Path(tempfile.gettempdir()),
        Path(__file__).resolve().parent.parent,
        *map(Path, site.getsitepackages()),
    }
    return sorted({str(p).encode() for p in found if len(str(p)) > 4})


def test_exported_files_name_no_folder_of_the_exporting_machine(exported, digits_exports):
    from edgeft import formats

    for f in [*exported.values(), *digits_exports.values()]:
        data = b"".join(p.read_bytes() for p in formats.get(f.format).files(Path(f.path)))
        if f.format == "torchscript":
            import zipfile

            with zipfile.ZipFile(f.path) as archive:
                data = b"".join(archive.read(info) for info in archive.infolist())  # deflated entries too
        assert [p for p in _machine_paths() if p in data] == [], f.path


def test_a_killed_int8_export_leaves_nothing_outside_the_output_folder(digits_checkpoint, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import edgeft_command, offline_env, time_limit

    system_tmp, out = tmp_path / "system-tmp", tmp_path / "out"
    system_tmp.mkdir()
    env = offline_env(tmp_path / ".th", TMPDIR=str(system_tmp))
    subprocess.run(
        [sys.executable, "-c", "import onnxruntime"], env=env, check=True
    )  # it keeps a small .ses file there
    baseline = set(system_tmp.iterdir())
    args = [
        "export",
        str(digits_checkpoint),
        "--precision",
        "int8",
        "--calib-size",
        "16",
        "--no-validate",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen([*edgeft_command(), *args], cwd=tmp_path, env=env)
    deadline = time.monotonic() + time_limit(300)
    while not list(out.glob(".*.work")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # until calibration starts
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(out.glob(".*.work")), "calibration wrote its files elsewhere"
    assert set(system_tmp.iterdir()) == baseline
    export(
        ExportConfig(checkpoint=str(digits_checkpoint), precision="int8", out=str(out), calib_size=16, validate=False)
    )
    assert sorted(p.name for p in out.iterdir()) == ["r18-int8.onnx"]  # the dead export's temporaries removed


def test_calibration_folder_follows_no_folder_link_and_reads_a_file_once(tmp_path):
    from edgeft.export import _folder_batches
    from edgeft.preprocess import Preprocess

    (tmp_path / "calib").mkdir()
    for i in range(3):
        Image.new("L", (8, 8), 40 * i).save(tmp_path / "calib" / f"{i}.png")
    Image.new("L", (8, 8)).save(tmp_path / "outside.png")
    (tmp_path / "calib" / "s").symlink_to(".")  # used to loop
    (tmp_path / "calib" / "up").symlink_to("..")
    (tmp_path / "calib" / "twin.png").symlink_to("0.png")
    spec = Preprocess(size=8, resize=8, mean=(0.5,), std=(0.25,), channels=1)
    batches = list(_folder_batches(tmp_path / "calib", 100, spec))
    assert [b.shape for b in batches] == [(3, 1, 8, 8)]

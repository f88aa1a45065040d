"""The contract every registered format passes (`edgeft.formats`): a new format gets these tests by
being registered. Write through `edgeft export` -> the metadata round-trips -> a modified file is
refused -> the runner agrees with the checkpoint within the fp32 bounds -> the gate passed ->
what it cannot do is one line, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeft import formats
from edgeft.artifact import content_digest, read_metadata, write_metadata
from edgeft.checkpoint import load_checkpoint
from edgeft.config import PRECISIONS
from edgeft.errors import InputError
from edgeft.models import model_from_checkpoint
from edgeft.predict import Predictor
from edgeft.validate import FP32_LOGIT_RTOL

from conftest import formats_here, one_line_error, run_edgeft

_SOME_OPTIONS = {
    "opset": ["--opset", "19"],
    "calib_method": ["--calib-method", "entropy"],
    "fallback": ["--no-fallback"],
}


@pytest.fixture(scope="module")
def written(digits_exports) -> dict[str, tuple[Path, object]]:
    """Each format's fp32 file of the digits checkpoint, gated, and its export result."""
    return {name: (Path(f.path), f) for name, f in digits_exports.items()}


def test_the_registry_finds_every_format_module_and_maps_names_paths_and_runtimes():
    every = formats.all_formats()
    assert [f.name for f in every][:3] == ["onnx", "torchscript", "executorch"]
    for fmt in every:
        assert formats.get(fmt.name) is fmt and formats.by_runtime(fmt.runtime) is fmt
        assert all(formats.for_path(Path("x") / f"model{s.upper()}") is fmt for s in fmt.suffixes)
        assert set(fmt.precisions) <= set(PRECISIONS) and fmt.rank >= 0
    with pytest.raises(InputError, match="unknown format 'tflite2'; choose from onnx"):
        formats.get("tflite2")


@pytest.mark.parametrize("fmt", formats_here())
def test_written_files_pass_the_fp32_gate_and_carry_the_metadata(written, fmt, digits_checkpoint):
    path, result = written[fmt.name]
    assert result.kept and result.validation.passed and result.validation.n_images > 0
    metadata = read_metadata(path)
    checkpoint = load_checkpoint(digits_checkpoint)
    assert metadata["classes"] == list(checkpoint["classes"]) and metadata["precision"] == "fp32"
    assert metadata["validation"]["passed"] is True and metadata["content_sha256"] == content_digest(path)
    assert all(p.is_file() for p in fmt.files(path))


@pytest.mark.parametrize("fmt", formats_here())
def test_metadata_round_trips_without_changing_the_digest(written, fmt, tmp_path):
    source, _ = written[fmt.name]
    path = tmp_path / source.name
    for src, dst in zip(fmt.files(source), fmt.files(path)):
        shutil.copy(src, dst)
    before = read_metadata(path)
    write_metadata(path, {**before, "note": "rewritten ✓"})
    after = read_metadata(path)
    assert after == {**before, "note": "rewritten ✓"} and content_digest(path) == before["content_sha256"]
    proc = run_edgeft(["info", str(path), "--json"], cwd=tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout) == after


@pytest.mark.parametrize("fmt", formats_here())
def test_a_changed_byte_of_the_model_is_refused(written, fmt, tmp_path):
    source, _ = written[fmt.name]
    path = tmp_path / source.name
    for src, dst in zip(fmt.files(source), fmt.files(path)):
        shutil.copy(src, dst)
    largest = max(fmt.files(path), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the weights
    largest.write_bytes(bytes(data))
    with pytest.raises(InputError):
        read_metadata(path)
    for command in (["info", str(path)], ["predict", "--model", str(path), str(path)]):
        proc = run_edgeft(command, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        one_line_error(proc.stderr)


@pytest.mark.parametrize("fmt", formats_here())
def test_the_runner_agrees_with_the_checkpoint_within_the_fp32_bounds(written, fmt, digits_checkpoint):
    path, _ = written[fmt.name]
    predictor = Predictor(path, device="cpu")
    model = model_from_checkpoint(load_checkpoint(digits_checkpoint)).eval()
    spec = predictor.preprocess
    x = np.random.default_rng(0).standard_normal((3, spec.channels, spec.size, spec.size), dtype=np.float32)
    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()
    logits = predictor.logits(x)
    assert logits.shape == reference.shape
    assert (np.abs(logits - reference) / np.maximum(1.0, np.abs(reference))).max() <= FP32_LOGIT_RTOL


@pytest.mark.parametrize("fmt", formats.all_formats(), ids=lambda f: f.name)
def test_what_a_format_cannot_do_is_one_line_and_exit_2(fmt, digits_checkpoint, tmp_path):
    reason = fmt.unavailable("fp64", "cpu")
    assert reason and "\n" not in reason and "fp64" in reason
    cases = [["--precision", p] for p in PRECISIONS if fmt.unavailable(p, "cpu")]
    cases += [arguments for option, arguments in _SOME_OPTIONS.items() if option not in fmt.options]
    for case in cases:
        proc = run_edgeft(["export", str(digits_checkpoint), "--format", fmt.name, *case, "--out", "out"], cwd=tmp_path)
        assert proc.returncode == 2, (case, proc.stderr)
        assert fmt.name in one_line_error(proc.stderr)
        assert not (tmp_path / "out").exists()


_SRC = Path(__file__).resolve().parent.parent / "src"
_RUNTIMES = ("onnxruntime", "openvino", "executorch", "ai_edge_litert", "litert_torch", "nncf")


def _imports() -> dict[str, set[str]]:
    """Every edgeft module and the edgeft modules it imports, lazy imports included."""
    import ast

    modules = {".".join(f.relative_to(_SRC).with_suffix("").parts).removesuffix(".__init__"): f
               for f in _SRC.rglob("*.py")}  # fmt: skip
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                found |= {base, *(f"{base}.{a.name}" for a in node.names)}
        graph[name] = found
    return graph


def test_no_import_cycle_among_edgeft_modules_lazy_imports_included():
    graph = _imports()
    edges = {m: {t for t in found if t in graph and t != m and not m.startswith(f"{t}.")} for m, found in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in edges[module]:
            assert state.get(target) != 1, f"import cycle: {' -> '.join([*path, target])}"
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in edges:
        if module not in state:
            visit(module, [module])


def test_only_format_modules_import_runtimes_or_call_exporters():
    import re

    exporters = re.compile(r"torch\.(jit|onnx|export)\.")
    for path in _SRC.rglob("*.py"):
        if "formats" in path.parts:
            continue
        text = path.read_text()
        imported = re.findall(r"^\s*(?:from|import) (\w+)", text, flags=re.M)
        assert not set(imported) & set(_RUNTIMES), path
        assert not exporters.search(text), path
